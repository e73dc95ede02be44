"""The input pipeline: TFDS ArrayRecord -> per-process examples -> batches.

Design: Grain over ``tfds.data_source`` (random access to ArrayRecord files)
rather than tf.data. Random access lets the training stream be a *pure
function of (seed, step)*:

* global example position p = step * global_batch + j (j < global_batch);
* epoch e = p // N and i = p % N; the record is ``perm(seed, e)[i // repeats]``
  (a seeded permutation per epoch; with ``repeats`` > 1 consecutive positions
  repeat an image, DeiT's repeated augmentation);
* the augmentation of position p draws from ``np.random.default_rng([seed,
  p])``.

So resuming at step s needs nothing but s (the checkpoint stores the step; no
iterator state), re-reads nothing, and gives bitwise the batches an
uninterrupted run sees. Each JAX process reads only its own slice j in
[process_index * local_batch, (process_index + 1) * local_batch) of every
global batch, so the global batch, and therefore training, does not depend on
how many processes share it.

Evaluation gives process k the contiguous shard k of ``even_split`` of the
split, pads every process to the same number of batches, and marks padding
with ``mask = False``: each example counts exactly once, for any batch size
and process count. Datasets with ImageNet-ReaL labels (``imagenet2012_real``)
also yield ``'real_labels'``, each example's set of plausible classes padded
with -1 to ``MAX_REAL_LABELS``.

Decoding and augmentation run in ``num_workers`` Grain worker processes
(``mp_prefetch``; 0 runs them in this process), with ``num_threads`` threads
in each. A worker makes whole chunks of consecutive examples (at most
``MAX_CHUNK``, dividing the batch), worker w the chunks w, w + W, ...; this
process interleaves them in order and joins them into batches, so the batches
are the same for any worker and thread count, and a worker holds a chunk per
thread plus the one it hands over, not batches, whatever the batch size.
``prefetch`` whole batches wait ready, no more.
"""

from __future__ import annotations

import ctypes
import functools
import math
import multiprocessing
import os
import secrets
import signal
import sys
import threading
from typing import Any, Callable, Iterator

import grain
import numpy as np
from absl import flags

from glmix_jax.errors import DatasetError, reason

Batch = dict[str, np.ndarray]
# A transform returns the image, or a dict of fields that includes 'image'
# (e.g. ``augment.train_transform``'s erasing box).
TrainTransform = Callable[[bytes, np.random.Generator], Any]
EvalTransform = Callable[[bytes], Any]

# ImageNet-ReaL (Beyer et al. 2020) gives an image at most 10 plausible
# classes; an empty set marks an image the raters could not label.
MAX_REAL_LABELS = 10

# The most examples a worker makes per hand-over: large enough that the hand-
# over (a shared-memory copy and a pickle) costs little per image, small
# enough that W workers hold W chunks, not W batches, of host memory.
MAX_CHUNK = 32

# How long closing a pipeline waits for its workers to stop before it kills
# them (``_close``): far longer than a worker takes to finish a chunk.
CLOSE_TIMEOUT_S = 30.0


def _prepared_builder(dataset: str, data_dir: str | None):
  """The TFDS builder of a prepared dataset, or a DatasetError naming how
  to prepare it."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    builder = tfds.builder(dataset, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise DatasetError(f'Unknown TFDS dataset {dataset!r}; see '
                       'https://www.tensorflow.org/datasets/catalog.') from e
  if not builder.is_prepared():
    raise DatasetError(
        f'{dataset} is not prepared in {builder.data_dir}. Put the downloaded '
        'files (for imagenet2012: ILSVRC2012_img_train.tar and '
        'ILSVRC2012_img_val.tar) in a directory DIR and run: python -m '
        f'glmix_jax.data.prepare --dataset={dataset} --manual_dir=DIR '
        f'--data_dir={data_dir or "DATA_DIR"}')
  return builder


def open_split(dataset: str, split: str, data_dir: str | None = None):
  """Random-access records ``{'image': JPEG bytes, 'label': int, ...}`` of a
  split (``imagenet2012_real`` names its label ``'original_label'``); every
  image feature (e.g. a segmentation mask too) is left encoded.

  Raises:
    DatasetError: naming the dataset and how to prepare it.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = _prepared_builder(dataset, data_dir)
  encoded = {name: tfds.decode.SkipDecoding()
             for name, feature in builder.info.features.items()
             if isinstance(feature, tfds.features.Image)}
  try:
    return builder.as_data_source(split=split, decoders=encoded)
  except NotImplementedError as e:  # prepared as TFRecord
    raise DatasetError(
        f'{dataset} in {builder.data_dir} is not in the ArrayRecord format; '
        'prepare it again with python -m glmix_jax.data.prepare into a new '
        '--data_dir.') from e
  except ValueError as e:  # a split that does not exist or parse
    raise DatasetError(f'Split {split!r} of {dataset} (its splits: '
                       f'{", ".join(builder.info.splits)}): {e}') from e


def class_count(dataset: str, data_dir: str | None) -> int:
  """The classes of a prepared dataset's label, from its TFDS builder."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  features = _prepared_builder(dataset, data_dir).info.features
  label = next((features[k] for k in ('label', 'original_label')
                if k in features), None)
  if not isinstance(label, tfds.features.ClassLabel):
    raise DatasetError(f'{dataset} has no class label (a ClassLabel feature '
                       "'label'); set --config.data.num_classes=K.")
  return label.num_classes


def check_batch_size(global_batch: int, process_count: int,
                     local_device_count: int) -> int:
  """The per-process batch; the global batch must split evenly over devices."""
  devices = process_count * local_device_count
  if global_batch % devices:
    raise ValueError(f'Global batch size {global_batch} is not divisible by '
                     f'the {devices} devices; use a multiple of {devices}.')
  return global_batch // process_count


@functools.lru_cache(maxsize=4)
def _epoch_permutation(seed: int, epoch: int, num_records: int) -> np.ndarray:
  return np.random.default_rng([seed, epoch]).permutation(num_records)


def train_record_index(position: int, *, seed: int, num_records: int,
                       repeats: int = 1) -> int:
  """The record read at global stream position ``position``."""
  epoch, i = divmod(position, num_records)
  return int(_epoch_permutation(seed, epoch, num_records)[i // repeats])


def train_batches(source, transform: TrainTransform, *, seed: int,
                  global_batch: int, start_step: int = 0,
                  process_index: int = 0, process_count: int = 1,
                  repeats: int = 1, num_workers: int = 0,
                  num_threads: int = 2, prefetch: int = 2) -> Iterator[Batch]:
  """Endless training batches of this process, from ``start_step`` on.

  Yields:
    ``{'image': (local_batch, ...), 'label': (local_batch,)}`` and any other
    fields the transform returns, stacked.
  """
  if global_batch % process_count:
    raise ValueError(f'Global batch size {global_batch} is not divisible by '
                     f'the {process_count} processes.')
  local = global_batch // process_count
  num_records = len(source)
  if num_records == 0:
    raise DatasetError('The training split is empty.')

  def example(k: int) -> Batch:
    step, j = divmod(k, local)
    position = (start_step + step) * global_batch + process_index * local + j
    index = train_record_index(position, seed=seed, num_records=num_records,
                               repeats=repeats)
    record = read_record(source, index)
    fields = _decoded(source, index, record, transform,
                      np.random.default_rng([seed, position]))
    return {**fields, 'label': np.asarray(record['label'], np.int64)}

  examples = grain.MapDataset.range(2**62).map(example)
  yield from _batched(examples, local, num_workers=num_workers,
                      num_threads=num_threads, prefetch=prefetch)


def eval_batches(source, transform: EvalTransform, *, local_batch: int,
                 process_index: int = 0, process_count: int = 1,
                 num_workers: int = 0, num_threads: int = 2,
                 prefetch: int = 2) -> Iterator[Batch]:
  """This process's evaluation batches, padded, with a ``'mask'``.

  Every process yields ``eval_steps(len(source), ...)`` batches, so all of
  them run the same number of (collective) eval steps.
  """
  num_records = len(source)
  start, stop = even_split(num_records, process_count)[process_index]
  steps = eval_steps(num_records, local_batch, process_count)
  padding = None

  def example(k: int) -> Batch:
    nonlocal padding
    if start + k < stop:
      return eval_example(source, start + k, transform)
    if padding is None:  # shaped like a real example, masked out
      padding = _padding(eval_example(source, 0, transform))
    return padding

  examples = grain.MapDataset.range(steps * local_batch).map(example)
  yield from _batched(examples, local_batch, num_workers=num_workers,
                      num_threads=num_threads, prefetch=prefetch)


def eval_example(source, index: int, transform: EvalTransform) -> Batch:
  """Record ``index`` as an evaluation example: ``image``, ``label``,
  ``mask`` (True) and, where the record has ImageNet-ReaL labels,
  ``real_labels`` padded with -1."""
  record = read_record(source, index)
  label = record['label'] if 'label' in record else record['original_label']
  example = {**_decoded(source, index, record, transform),
             'label': np.asarray(label, np.int64), 'mask': np.asarray(True)}
  if 'real_label' in record:
    real = np.asarray(record['real_label'], np.int64).reshape(-1)
    if real.size > MAX_REAL_LABELS:
      raise DatasetError(f'A record has {real.size} ReaL labels, more than '
                         f'MAX_REAL_LABELS={MAX_REAL_LABELS}.')
    example['real_labels'] = np.pad(real, (0, MAX_REAL_LABELS - real.size),
                                    constant_values=-1)
  return example


def read_record(source, index: int) -> dict:
  """``source[index]``; a record that cannot be read (a damaged or vanished
  file) is a DatasetError naming it."""
  try:
    return source[index]
  except Exception as e:  # riegeli / file-system errors of any type
    raise DatasetError(
        f'Cannot read {_record_name(source, index)} ({reason(e)}); its '
        f'files{_data_dir(source)} are damaged or gone. Prepare the dataset '
        'again (python -m glmix_jax.data.prepare) into a new data_dir.'
    ) from e


def _decoded(source, index: int, record: dict, transform,
             *args) -> dict[str, np.ndarray]:
  """``transform(record['image'], *args)`` as a dict of fields; an image
  Pillow cannot decode is a DatasetError naming its record."""
  try:
    out = transform(record['image'], *args)
    return out if isinstance(out, dict) else {'image': out}
  except (OSError, SyntaxError, ValueError) as e:  # Pillow's decode errors
    raise DatasetError(
        f'Cannot decode the image of {_record_name(source, index, record)} '
        f'({reason(e)}). Replace or remove that image in the source files '
        'and prepare the dataset again into a new data_dir.') from e


def _record_name(source, index: int, record: dict | None = None) -> str:
  """E.g. ``record 17 of imagenet2012 train[:90%] (n01440764_17.JPEG)``."""
  info = getattr(source, 'dataset_info', None)
  split = getattr(source, 'split', None)
  where = f'{info.name} {split}' if info is not None else 'the dataset'
  name = f'record {index} of {where}'
  file_name = (record or {}).get('file_name')
  if file_name is not None:
    if isinstance(file_name, bytes):
      file_name = file_name.decode(errors='replace')
    name += f' ({file_name})'
  return name


def _data_dir(source) -> str:
  info = getattr(source, 'dataset_info', None)
  return f' in {info.data_dir}' if info is not None else ''


def _padding(example: Batch) -> Batch:
  """A masked-out example with the shapes of ``example``."""
  padding = {name: np.zeros_like(value) for name, value in example.items()}
  if 'real_labels' in padding:
    padding['real_labels'] -= 1
  return padding


def even_split(num_records: int, parts: int) -> list[tuple[int, int]]:
  """``parts`` contiguous [start, stop) ranges covering ``num_records``."""
  bounds = [num_records * k // parts for k in range(parts + 1)]
  return list(zip(bounds[:-1], bounds[1:]))


def eval_steps(num_records: int, local_batch: int, process_count: int) -> int:
  """Eval batches per process: enough for the largest process shard."""
  largest = max(b - a for a, b in even_split(num_records, process_count))
  return max(1, math.ceil(largest / local_batch))


def chunk_size(batch: int) -> int:
  """The examples a worker makes at a time: the largest divisor of the
  batch up to ``MAX_CHUNK``."""
  return max(d for d in range(1, min(batch, MAX_CHUNK) + 1) if batch % d == 0)


def _worker_setup(name: str, worker_index: int, worker_count: int) -> None:
  """In each worker: SIGTERM / SIGINT sent to the whole process group (a
  preemption, Ctrl-C) are the trainer's to handle, so the workers keep the
  input flowing until it saves and closes them; a trainer that dies without
  closing them (SIGKILL, the OOM killer) takes them with it (Linux's
  parent-death signal), rather than leaving them blocked on a full buffer;
  and the process takes its pipeline's ``name`` (what ``top`` shows), by
  which ``_close`` finds it."""
  del worker_index, worker_count
  signal.signal(signal.SIGTERM, signal.SIG_IGN)
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  if sys.platform.startswith('linux'):
    pr_set_pdeathsig, pr_set_name = 1, 15
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
    libc.prctl(pr_set_name, ctypes.c_char_p(name.encode()))


def _workers_named(name: str) -> list[int]:
  """The pids of this process's input workers that took ``name``."""
  pids = []
  for child in multiprocessing.active_children():
    try:
      with open(f'/proc/{child.pid}/comm', encoding='utf-8') as f:
        if f.read().strip() == name:
          pids.append(child.pid)
    except OSError:  # exited meanwhile, or no /proc
      pass
  return pids


def _close(iterator, name: str) -> None:
  """Closes a pipeline's iterator, its threads and its workers, in bounded
  time.

  Grain's close (0.2.18) stops each prefetch thread before the source it
  reads (google/grain#1372); a thread waiting on a worker that is stuck in
  one record (a hung file system, a pathological image) would wait for
  ever, and the close with it: the run would never reach its final
  evaluation or exit. So after ``CLOSE_TIMEOUT_S`` the pipeline's own
  workers are killed; the waits then end with Grain's "worker process was
  terminated" error, and the close completes.
  """
  errors = []

  def close():
    try:
      iterator.close()
    except Exception as e:  # pylint: disable=broad-except
      errors.append(e)

  closing = threading.Thread(target=close, daemon=True, name=f'close {name}')
  closing.start()
  closing.join(CLOSE_TIMEOUT_S)
  if closing.is_alive():
    _kill_stuck(closing, name)
  if errors:  # as if closed in this thread
    raise errors[0]


def _kill_stuck(closing: threading.Thread, name: str) -> None:
  """Kills the workers named ``name`` and waits for ``closing`` to end."""
  stuck = _workers_named(name)
  print(f'warning: the input workers {stuck} had not stopped '
        f'{CLOSE_TIMEOUT_S:.0f} s after the input was closed (one stuck '
        'reading or decoding a record?); killing them.', file=sys.stderr,
        flush=True)
  for pid in stuck:
    try:
      os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
      pass
  closing.join()


def _join(chunks: list[Batch]) -> Batch:
  return {name: np.concatenate([c[name] for c in chunks])
          for name in chunks[0]}


def _batched(examples: grain.MapDataset, batch: int, *, num_workers: int,
             num_threads: int, prefetch: int) -> Iterator[Batch]:
  """Batches of consecutive examples, made as described in the module
  docstring."""
  if num_workers < 0 or num_threads < 1 or prefetch < 1:
    raise ValueError(
        f'num_workers={num_workers}, num_threads={num_threads}, '
        f'prefetch={prefetch}: use num_workers >= 0 (0: in this process), '
        'num_threads >= 1 and prefetch >= 1.')
  chunk = chunk_size(batch)
  name = f'glmix-in-{secrets.token_hex(3)}'  # Linux keeps 15 characters
  # Each reading thread keeps one chunk ready.
  chunks = examples.batch(chunk, drop_remainder=True).to_iter_dataset(
      grain.ReadOptions(num_threads=num_threads,
                        prefetch_buffer_size=num_threads))
  if num_workers:
    # Arrays of a few bytes (labels, masks, boxes) travel pickled; only the
    # images go through shared memory.
    chunks = grain.experimental.WithOptionsIterDataset(
        chunks, grain.experimental.DatasetOptions(min_shm_size=1 << 16))
    if not flags.FLAGS.is_parsed():
      # Grain's workers read its absl flags; outside an absl app (a notebook,
      # a test) they are unparsed, and their defaults are what we want.
      flags.FLAGS.mark_as_parsed()
    chunks = chunks.mp_prefetch(
        grain.MultiprocessingOptions(num_workers=num_workers,
                                     per_worker_buffer_size=1),
        worker_init_fn=functools.partial(_worker_setup, name))
  batches = grain.experimental.ThreadPrefetchIterDataset(
      chunks.batch(batch // chunk, drop_remainder=True, batch_fn=_join),
      prefetch_buffer_size=prefetch)
  iterator = iter(batches)
  try:
    # Not ``yield from``: closing this generator would close ``iterator``
    # directly, without ``_close``'s deadline.
    for ready in iterator:
      yield ready
  finally:  # stops the workers at once, not when garbage-collected
    _close(iterator, name)
