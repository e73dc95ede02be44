"""An image folder (the official ``data_set=image_folder`` layout) prepared
into a TFDS ArrayRecord dataset, and trained on."""

import io
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from configs import tiny
from conftest import ROOT, subprocess_env
from glmix_jax import train_lib
from glmix_jax.data import prepare
from glmix_jax.errors import DatasetError

# Class folders sort as torchvision's ImageFolder sorts them (by code point).
CLASSES = ['Zebra finch', 'daisy', 'ünïcode-ñame']


def _image(mode: str, fmt: str, colour, size=(40, 36)) -> bytes:
  buffer = io.BytesIO()
  Image.new('RGB', size, colour).convert(mode).save(buffer, fmt)
  return buffer.getvalue()


def make_folder(root, per_class=6):
  """train/ and val/ with RGB, grayscale and CMYK JPEGs, PNGs, odd file
  names, and a hidden file the preparation skips."""
  kinds = [('RGB', 'JPEG', 'a photo.jpg'), ('L', 'JPEG', 'GREY #2.JPG'),
           ('CMYK', 'JPEG', 'cmyk_ö.jpeg'), ('RGB', 'PNG', 'x.png')]
  files = {}
  for split, count in (('train', per_class), ('val', 2)):
    for label, name in enumerate(CLASSES):
      folder = root / split / name
      folder.mkdir(parents=True)
      (folder / '.DS_Store').write_bytes(b'\0\1')
      for i in range(count):
        mode, fmt, file = kinds[i % len(kinds)]
        data = _image(mode, fmt, (80 * label, 255 - 80 * label, 40 * i))
        path = folder / f'{i}-{file}'
        path.write_bytes(data)
        files[str(path.relative_to(root))] = (data, label)
  return files


def test_folder_prepares_every_image_as_it_is(tmp_path):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  files = make_folder(tmp_path / 'folder')
  prepare.prepare_image_folder('my_folder', tmp_path / 'folder',
                               data_dir=str(tmp_path / 'tfds'))
  builder = tfds.builder('my_folder', data_dir=str(tmp_path / 'tfds'))
  assert builder.info.features['label'].names == CLASSES
  assert {k: v.num_examples for k, v in builder.info.splits.items()} == {
      'train': 18, 'validation': 6}
  seen = {}
  for split in ('train', 'validation'):
    source = builder.as_data_source(
        split=split, decoders={'image': tfds.decode.SkipDecoding()})
    for i in range(len(source)):
      record = source[i]
      seen[record['file_name'].decode()] = (record['image'],
                                            int(record['label']))
  assert seen == files  # the bytes as they were, each with its class


@pytest.mark.parametrize('bad', ['truncated', 'text', 'stray'])
def test_a_bad_file_is_named_in_one_line_and_nothing_is_written(tmp_path,
                                                                bad):
  make_folder(tmp_path / 'folder', per_class=2)
  daisy = tmp_path / 'folder' / 'train' / 'daisy'
  if bad == 'truncated':
    path = daisy / 'broken.jpg'
    path.write_bytes(_image('RGB', 'JPEG', (1, 2, 3))[:200])
  elif bad == 'text':
    path = daisy / 'notes.txt'
    path.write_text('not an image')
  else:  # an image beside the class folders
    path = tmp_path / 'folder' / 'val' / 'loose.jpg'
    path.write_bytes(_image('RGB', 'JPEG', (1, 2, 3)))
  done = subprocess.run(
      [sys.executable, '-m', 'glmix_jax.data.prepare', '--dataset=my_folder',
       f'--image_folder={tmp_path / "folder"}',
       f'--data_dir={tmp_path / "tfds"}'],
      capture_output=True, text=True, cwd=ROOT, env=subprocess_env(),
      check=False)
  assert done.returncode == 1
  (line,) = [l for l in done.stderr.splitlines() if l.startswith('error:')]
  assert str(path) in line and 'Nothing was written' in line, line
  assert 'Traceback' not in done.stderr
  assert not (tmp_path / 'tfds' / 'my_folder').exists()


def test_training_on_a_prepared_folder(tmp_path):
  """The tiny recipe on the folder (3 classes, mixed formats) trains and
  evaluates on its validation split."""
  make_folder(tmp_path / 'folder')
  prepare.prepare_image_folder('my_folder', tmp_path / 'folder',
                               data_dir=str(tmp_path / 'tfds'))
  with pytest.raises(FileExistsError, match='my_folder exists'):
    prepare.prepare_image_folder('my_folder', tmp_path / 'folder',
                                 data_dir=str(tmp_path / 'tfds'))
  config = tiny.get_config()
  del config.data['synthetic']  # as in the ImageNet recipes
  config.data.update(dataset='my_folder', num_classes=3,
                     data_dir=str(tmp_path / 'tfds'))
  config.update(total_steps=4, checkpoint_steps=4)
  config.evals.val.split = 'validation'  # the folder's val/, as on ImageNet
  results = train_lib.train_and_evaluate(config, str(tmp_path / 'run'))
  assert results['val_count'] == 6
  assert np.isfinite(results['val_loss'])


def test_a_folder_without_train_is_refused(tmp_path):
  (tmp_path / 'folder' / 'val' / 'daisy').mkdir(parents=True)
  with pytest.raises(DatasetError, match='no train/ folder'):
    prepare.image_folder_splits(tmp_path / 'folder')


def test_the_shapes_task_is_a_folder_of_the_target_shapes(tmp_path):
  """The fine-tuning demo's second task, written by the README's command: an
  image folder with one class folder per target shape, 120 training and 40
  validation images each, that prepares as it is."""
  from glmix_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  done = subprocess.run(
      [sys.executable, '-m', 'glmix_jax.data.synthetic',
       f'--image_folder={tmp_path / "shapes"}', '--image_size=32'],
      capture_output=True, text=True, cwd=ROOT, env=subprocess_env(),
      check=False)
  assert done.returncode == 0, done.stderr[-2000:]
  classes, splits = prepare.image_folder_splits(tmp_path / 'shapes')
  assert classes == sorted(synthetic.SHAPES)
  assert {k: len(v) for k, v in splits.items()} == {'train': 600,
                                                    'validation': 200}
  for path, label in splits['train']:
    assert path.parent.name == classes[label]
