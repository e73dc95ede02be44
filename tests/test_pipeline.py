"""The input pipeline on a real TFDS imagenet2012 built from synthetic tars:
labels end to end, exact resume, per-process splits, padded evaluation."""

import functools
import io
import multiprocessing
import os
import tarfile
import threading
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from glmix_jax import sharding, train_lib
from glmix_jax.data import pipeline, synthetic


def decode(data, rng=None):
  del rng
  return np.asarray(Image.open(io.BytesIO(data)).convert('RGB'), np.float32)


def decode_uint8(data):
  return np.asarray(Image.open(io.BytesIO(data)).convert('RGB'), np.uint8)


def labelled(data, rng):
  """Decoded image plus a random offset: shows which rng a position used."""
  return decode(data) + rng.integers(0, 1000)


@pytest.fixture(name='train')
def _train(label_dataset):
  return pipeline.open_split('imagenet2012', 'train', label_dataset)


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def test_labels_survive_the_real_builder_end_to_end(label_dataset, train):
  wnids = synthetic.wordnet_ids()
  for batch in pipeline.eval_batches(train, decode, local_batch=16):
    for image, label, mask in zip(batch['image'], batch['label'],
                                  batch['mask']):
      if mask:
        assert synthetic.label_from_pixels(image) == label < 12
  val = pipeline.open_split('imagenet2012', 'validation', label_dataset)
  expected = [wnids.index(w) for w in synthetic.validation_wnids()[:30]]
  seen = []
  for batch in pipeline.eval_batches(val, decode, local_batch=7):
    for image, label, mask in zip(batch['image'], batch['label'],
                                  batch['mask']):
      if mask:
        assert synthetic.label_from_pixels(image) == label
        seen.append(int(label))
  assert sorted(seen) == sorted(expected)


def test_training_stream_resumes_exactly(train):
  stream = take(pipeline.train_batches(train, labelled, seed=3,
                                       global_batch=8), 6)
  resumed = take(pipeline.train_batches(train, labelled, seed=3,
                                        global_batch=8, start_step=4), 2)
  for a, b in zip(stream[4:], resumed):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])
  other_seed = next(pipeline.train_batches(train, labelled, seed=4,
                                           global_batch=8))
  assert not np.array_equal(other_seed['image'], stream[0]['image'])


@pytest.mark.parametrize('processes', [2, 3])
def test_processes_share_the_single_process_stream(train, processes):
  single = take(pipeline.train_batches(train, labelled, seed=0,
                                       global_batch=12, start_step=2), 2)
  parts = [take(pipeline.train_batches(
      train, labelled, seed=0, global_batch=12, start_step=2,
      process_index=k, process_count=processes), 2) for k in range(processes)]
  for step in range(2):
    for key in ('image', 'label'):
      np.testing.assert_array_equal(
          np.concatenate([p[step][key] for p in parts]), single[step][key])


def _recipe(size=32):
  """The full training transform (RandAugment, erasing) at ``size``."""
  from configs import common  # pylint: disable=g-import-not-at-top
  from glmix_jax.data import augment  # pylint: disable=g-import-not-at-top
  cfg = common.imagenet_data()
  cfg.image_size = size
  cfg.augmentation = common.deit_augmentation()
  return functools.partial(augment.train_transform, cfg=cfg)


def test_batches_are_the_same_for_any_worker_and_thread_count(train):
  """Worker processes, threads, prefetch and chunking change how the
  stream is made, never what it holds: uint8 images, erasing boxes, labels,
  bitwise, also from a resumed step and for evaluation."""
  transform = _recipe()
  expected = take(pipeline.train_batches(train, transform, seed=5,
                                         global_batch=12, start_step=3), 3)
  assert expected[0]['image'].dtype == np.uint8  # a quarter of float32
  assert expected[0]['erase_box'].shape == (12, 4)
  eval_expected = list(pipeline.eval_batches(train, decode_uint8,
                                             local_batch=24))
  for workers, threads, prefetch in [(0, 3, 1), (2, 2, 3)]:
    parallelism = dict(num_workers=workers, num_threads=threads,
                       prefetch=prefetch)
    stream = pipeline.train_batches(train, transform, seed=5, global_batch=12,
                                    start_step=3, **parallelism)
    batches = take(stream, 3)
    stream.close()  # stops the workers
    for got, want in zip(batches, expected):
      assert got.keys() == want.keys()
      for key in want:
        np.testing.assert_array_equal(got[key], want[key])
    evaluated = list(pipeline.eval_batches(train, decode_uint8,
                                           local_batch=24, **parallelism))
    assert len(evaluated) == len(eval_expected)
    for got, want in zip(evaluated, eval_expected):
      for key in want:
        np.testing.assert_array_equal(got[key], want[key])


def _comm(process) -> str:
  """The name a worker took (``pipeline._worker_setup``)."""
  with open(f'/proc/{process.pid}/comm', encoding='utf-8') as f:
    return f.read().strip()


def decode_unless(stop_file, data, rng):
  """``decode``, but blocks while ``stop_file`` exists: a worker stuck in a
  record (a hung file system, a pathological image)."""
  while os.path.exists(stop_file):
    time.sleep(0.05)
  return decode_uint8(data)


def test_closing_ends_workers_stuck_in_a_record(train, tmp_path, monkeypatch,
                                                capsys):
  """Grain's own close would wait for ever on a worker stuck in a record
  (google/grain#1372); ours kills that pipeline's workers after
  CLOSE_TIMEOUT_S, and only that pipeline's."""
  monkeypatch.setattr(pipeline, 'CLOSE_TIMEOUT_S', 2.0)
  stop_file = tmp_path / 'stuck'
  parallelism = dict(num_workers=2, num_threads=1, prefetch=1)
  other = pipeline.train_batches(train, decode, seed=1, global_batch=8,
                                 **parallelism)
  expected = take(pipeline.train_batches(train, decode, seed=1,
                                         global_batch=8), 2)
  try:
    np.testing.assert_array_equal(next(other)['image'], expected[0]['image'])
    other_name = _comm(next(iter(multiprocessing.active_children())))
    stream = pipeline.train_batches(
        train, functools.partial(decode_unless, str(stop_file)), seed=0,
        global_batch=8, **parallelism)
    next(stream)
    deadline = time.time() + 120  # until all four workers have started
    while len(multiprocessing.active_children()) < 4 and time.time() < deadline:
      time.sleep(0.1)
    others = {p for p in multiprocessing.active_children()
              if _comm(p) == other_name}
    workers = set(multiprocessing.active_children()) - others
    assert len(workers) == len(others) == 2
    stop_file.touch()  # the workers, making the next chunks, block
    time.sleep(1.0)
    closing = threading.Thread(target=stream.close, daemon=True)
    closing.start()
    closing.join(120)  # a hang detector, not a speed limit
    hung = closing.is_alive()
    stop_file.unlink()  # frees the workers, should the close have hung
    assert not hung, 'close() hung on the stuck workers'
    assert 'had not stopped 2 s after the input was closed' in (
        capsys.readouterr().err)
    for p in workers:
      p.join(30)  # the killed ones are gone; the others exit on the unlink
    assert not [p for p in workers if p.is_alive()]
    assert all(p.is_alive() for p in others)
    np.testing.assert_array_equal(next(other)['image'], expected[1]['image'])
  finally:
    other.close()


def test_prefetch_holds_a_few_batches_whatever_the_batch_size(train):
  """With the loop stalled (device-bound), the pipeline makes at most the
  batch handed out, ``prefetch`` ready ones, one being joined and a chunk
  per reading thread: a bound in batches, not in images."""
  for batch, prefetch in [(8, 1), (64, 2)]:
    made = []

    def counted(data, rng, made=made):
      made.append(1)
      return decode(data, rng)

    stream = pipeline.train_batches(train, counted, seed=0,
                                    global_batch=batch, num_threads=2,
                                    prefetch=prefetch)
    next(stream)
    time.sleep(1.5)  # ample time to run ahead, were it unbounded
    chunk = pipeline.chunk_size(batch)
    assert len(made) <= (2 + prefetch) * batch + 2 * chunk, (batch, prefetch)
    stream.close()


def test_each_epoch_reads_every_record_once():
  n = 240
  epoch0 = [pipeline.train_record_index(p, seed=1, num_records=n)
            for p in range(n)]
  epoch1 = [pipeline.train_record_index(p, seed=1, num_records=n)
            for p in range(n, 2 * n)]
  assert sorted(epoch0) == sorted(epoch1) == list(range(n))
  assert epoch0 != epoch1  # reshuffled every epoch
  repeated = [pipeline.train_record_index(p, seed=1, num_records=n, repeats=3)
              for p in range(n)]
  assert repeated[0::3] == repeated[1::3] == repeated[2::3]
  assert len(set(repeated)) == n // 3


@pytest.mark.parametrize('processes', [1, 2, 3])
@pytest.mark.parametrize('local_batch', [5, 16])
def test_eval_counts_every_example_exactly_once(train, processes,
                                                local_batch):
  labels, steps = [], set()
  for k in range(processes):
    batches = list(pipeline.eval_batches(
        train, decode, local_batch=local_batch, process_index=k,
        process_count=processes))
    steps.add(len(batches))
    for batch in batches:
      labels += list(batch['label'][batch['mask']])
  assert len(steps) == 1  # every process runs the same number of steps
  assert len(labels) == len(train)
  assert sorted(labels) == sorted(train[i]['label'] for i in range(len(train)))


def test_global_batch_is_sharded_over_all_devices(train):
  mesh = sharding.make_mesh()
  local = next(pipeline.train_batches(train, decode, seed=0, global_batch=16))
  batch = next(sharding.device_batches(iter([local]), mesh))
  assert batch['image'].shape == (16, 48, 48, 3)
  assert batch['image'].sharding.spec == jax.sharding.PartitionSpec(
      ('data', 'fsdp'))
  assert len(batch['label'].addressable_shards) == 8
  np.testing.assert_array_equal(np.asarray(batch['label']), local['label'])


def test_bad_input_is_a_clear_error(tmp_path, label_dataset):
  with pytest.raises(pipeline.DatasetError, match='prepare --dataset=imagenet2012'):
    pipeline.open_split('imagenet2012', 'train', str(tmp_path))
  with pytest.raises(pipeline.DatasetError, match="Unknown TFDS dataset 'imagenet3000'"):
    pipeline.open_split('imagenet3000', 'train', str(tmp_path))
  with pytest.raises(pipeline.DatasetError, match="Split 'test'"):
    pipeline.open_split('imagenet2012', 'test', label_dataset)
  with pytest.raises(ValueError, match='not divisible by the 8 devices'):
    pipeline.check_batch_size(20, process_count=2, local_device_count=4)
  assert pipeline.check_batch_size(32, process_count=2, local_device_count=4) == 16


class _Damaged:
  """A random-access source: record ``unreadable`` raises as a damaged
  file does, record ``undecodable`` holds bytes that are no image."""

  def __init__(self, good: dict, unreadable=None, undecodable=None):
    self._good, self._unreadable, self._undecodable = (good, unreadable,
                                                       undecodable)

  def __len__(self):
    return 12

  def __getitem__(self, index):
    if index == self._unreadable:
      raise RuntimeError('Corrupted Riegeli/records file: chunk header hash '
                         'mismatch')
    if index == self._undecodable:
      return dict(self._good, image=b'\xff\xd8 truncated', file_name=b'x.JPEG')
    return self._good


@pytest.mark.parametrize('which', ['train', 'eval'])
def test_a_record_that_fails_is_named(train, which):
  good = train[0]

  def batches(source):
    if which == 'train':
      return take(pipeline.train_batches(source, decode, seed=0,
                                         global_batch=12, num_threads=2), 2)
    return list(pipeline.eval_batches(source, decode, local_batch=6,
                                      num_threads=2))

  assert len(batches(_Damaged(good))) == 2
  with pytest.raises(pipeline.DatasetError,
                     match=r'Cannot read record 7 of the dataset '
                           r'\(RuntimeError: Corrupted Riegeli'):
    batches(_Damaged(good, unreadable=7))
  with pytest.raises(pipeline.DatasetError,
                     match=r'Cannot decode the image of record 5 of the '
                           r'dataset \(x\.JPEG\) \(UnidentifiedImageError'):
    batches(_Damaged(good, undecodable=5))


def test_synthetic_archive_has_the_imagenet_layout(tmp_path):
  synthetic.write_dataset(tmp_path, classes=3, images_per_class=2,
                          image_size=32)
  wnids = synthetic.wordnet_ids()[:3]
  with tarfile.open(tmp_path / synthetic.TRAIN_TAR) as outer:
    assert outer.getnames() == [f'{w}.tar' for w in wnids]
    inner = tarfile.open(fileobj=outer.extractfile(f'{wnids[1]}.tar'))
    assert inner.getnames() == [f'{wnids[1]}_0.JPEG', f'{wnids[1]}_1.JPEG']
  with tarfile.open(tmp_path / synthetic.VAL_TAR) as val:
    assert val.getnames()[:2] == ['ILSVRC2012_val_00000001.JPEG',
                                  'ILSVRC2012_val_00000002.JPEG']
  with pytest.raises(ValueError, match='1 to 10 classes'):
    synthetic.write_dataset(tmp_path, classes=11)


def test_drawn_classes_differ_by_shape_and_side():
  # Same seed per class: only the class changes what is drawn.
  images = [np.asarray(synthetic.draw_object_pair(
      label, 64, np.random.default_rng(7)), np.float32) for label in range(10)]
  for a in range(10):
    for b in range(a + 1, 10):
      assert np.abs(images[a] - images[b]).max() > 50


def test_labels_survive_the_real_transforms(train):
  import ml_collections  # pylint: disable=g-import-not-at-top
  from configs import common  # pylint: disable=g-import-not-at-top
  from glmix_jax.data import augment  # pylint: disable=g-import-not-at-top
  data = common.imagenet_data()
  cfg = ml_collections.ConfigDict(dict(
      image_size=32, interpolation='bicubic', mean=data.mean, std=data.std,
      eval_crop_pct=0.875, augmentation=dict(
          random_resized_crop_scale=(0.08, 1.0), hflip=0.5, randaugment='',
          random_erasing=0.0)))

  def read(images):
    assert images.dtype == np.uint8  # normalised on the device
    return [synthetic.label_from_pixels(x) for x in images]

  batch = next(pipeline.train_batches(
      train, lambda b, rng: augment.train_transform(b, rng, cfg), seed=0,
      global_batch=16))
  assert batch['image'].shape == (16, 32, 32, 3)
  assert read(batch['image']) == list(batch['label'])
  for batch in pipeline.eval_batches(
      train, lambda b: augment.eval_transform(b, cfg), local_batch=64):
    mask = batch['mask']
    assert read(batch['image'][mask]) == list(batch['label'][mask])


class _Predict(nn.Module):
  """Logits that pick the class written in pixel [0, 0, 0]."""
  num_classes: int = 6

  @nn.compact
  def __call__(self, images, train=False):
    del train
    # The step normalises with mean 0, std 1: the class is x / 255.
    return jax.nn.one_hot(jnp.round(images[:, 0, 0, 0] * 255).astype(
        jnp.int32), self.num_classes)


@pytest.mark.parametrize('processes', [1, 2])
def test_real_labels_score_every_rated_image_once(processes):
  """imagenet2012_real records (``original_label``, variable ``real_label``
  sets, some empty) give ReaL top-1 over the rated images only."""
  predictions = [0, 1, 2, 3, 4, 5, 0, 1, 2]
  real_sets = [[0], [2, 1], [3], [], [4, 5, 0], [], [1], [1], [2]]
  source = [dict(image=np.full((4, 4, 3), p, np.uint8), original_label=p,
                 real_label=np.asarray(r, np.int64))
            for p, r in zip(predictions, real_sets)]
  batches = []
  for k in range(processes):
    batches += pipeline.eval_batches(source, lambda x: x, local_batch=4,
                                     process_index=k, process_count=processes)
  assert all(b['real_labels'].shape == (4, pipeline.MAX_REAL_LABELS)
             for b in batches)
  mesh = jax.make_mesh((4,), (sharding.DATA_AXIS,), devices=jax.devices()[:4])
  eval_fn = jax.jit(functools.partial(
      train_lib.eval_step, model=_Predict(),
      pixels=train_lib.PixelStats(mean=(0.0,) * 3, std=(1.0,) * 3)))
  scores = train_lib.evaluate(eval_fn, {}, {}, batches, mesh)
  # Rated: 7 images; the prediction is among the real labels for 5 of them.
  assert scores['real_count'] == 7 and scores['count'] == 9
  assert scores['real_top1'] == pytest.approx(5 / 7)
  assert scores['top1'] == 1.0


def _png(array) -> bytes:
  out = io.BytesIO()
  Image.fromarray(array).save(out, format='PNG')
  return out.getvalue()


def test_a_catalog_style_dataset_gives_its_classes_and_is_upsampled(tmp_path):
  """A TFDS dataset shaped like a catalog one (``oxford_iiit_pet``'s
  features: a segmentation mask beside the image, a second ClassLabel;
  splits train and test) of 32 px PNGs, like CIFAR's: ``num_classes=0``
  takes the builder's 3 classes, the mask is never decoded, and the crops
  upsample to the model's 64 px (the official CIFAR path's resize)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from configs import finetune, tiny  # pylint: disable=g-import-not-at-top
  from glmix_jax.data import input as data_input  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  features = tfds.features.FeaturesDict({
      'image': tfds.features.Image(),
      'label': tfds.features.ClassLabel(names=['abyssinian', 'beagle', 'pug']),
      'species': tfds.features.ClassLabel(names=['cat', 'dog']),
      'segmentation_mask': tfds.features.Image(shape=(None, None, 1)),
      'file_name': tfds.features.Text()})

  def examples(count):
    for i in range(count):
      yield str(i), {
          'image': _png(rng.integers(0, 256, (32, 32, 3), np.uint8)),
          'label': i % 3, 'species': int(i % 3 > 0),
          'segmentation_mask': _png(np.zeros((32, 32), np.uint8)),
          'file_name': f'{i}.png'}

  tfds.dataset_builders.store_as_tfds_dataset(
      name='pets_like', version='1.0.0', features=features,
      data_dir=str(tmp_path), split_datasets={'train': examples(12),
                                              'test': examples(6)},
      file_format='array_record', disable_shuffling=True)
  config = tiny.get_config()
  del config.data['synthetic']
  config.data.update(dataset='pets_like', data_dir=str(tmp_path),
                     num_classes=0, image_size=64, train_split='train')
  assert finetune.SPLITS['oxford_iiit_pet'] == ('train', 'test')
  resolved = data_input.with_class_count(config, str(tmp_path))
  assert resolved.data.num_classes == 3 and config.data.num_classes == 0
  source = pipeline.open_split('pets_like', 'test', str(tmp_path))
  assert isinstance(source[0]['segmentation_mask'], bytes)  # left encoded
  batch = next(data_input.eval_batches(resolved, source, global_batch=8))
  assert batch['image'].shape == (8, 64, 64, 3)
  train = next(data_input.train_batches(
      resolved, pipeline.open_split('pets_like', 'train', str(tmp_path)),
      start_step=0, global_batch=8))
  assert train['image'].shape == (8, 64, 64, 3)
  assert set(train['label'].tolist()) <= {0, 1, 2}
  with pytest.raises(pipeline.DatasetError,
                     match=r"Split 'validation' of pets_like \(its splits: "
                     r'(train, test|test, train)\)'):
    pipeline.open_split('pets_like', 'validation', str(tmp_path))
