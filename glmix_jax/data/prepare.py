r"""Prepares a TFDS dataset offline: from downloaded files, or an image folder.

  python -m glmix_jax.data.prepare --dataset=imagenet2012 \
      --manual_dir=DIR_WITH_TARS --data_dir=~/tensorflow_datasets
  python -m glmix_jax.data.prepare --dataset=my_flowers \
      --image_folder=ROOT --data_dir=~/tensorflow_datasets

For ImageNet, ``--manual_dir`` holds ``ILSVRC2012_img_train.tar`` and/or
``ILSVRC2012_img_val.tar`` exactly as downloaded from image-net.org (or as
written by ``python -m glmix_jax.data.synthetic``). An image folder is the
official ``data_set=image_folder`` layout (torchvision ``ImageFolder`` per
split): ``ROOT/train/<class>/<image>`` and ``ROOT/val/<class>/<image>`` (split
``validation``; ``test`` too if present), classes numbered in sorted order
of their folder names. Every dataset is written in the ArrayRecord format,
which the input pipeline reads with random access.
"""

from __future__ import annotations

import io

from etils import epath
from PIL import Image

from glmix_jax.errors import DatasetError

# Files a dataset's builder needs in manual_dir (at least one of them).
MANUAL_FILES = {
    'imagenet2012': ('ILSVRC2012_img_train.tar', 'ILSVRC2012_img_val.tar'),
}


def prepare(dataset: str, *, data_dir: str | None,
            manual_dir: str | None = None) -> None:
  """Builds ``dataset`` into ``data_dir`` (TFDS's default when None)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  if dataset not in tfds.list_builders():
    raise ValueError(f'Unknown TFDS dataset {dataset!r}; see '
                     'https://www.tensorflow.org/datasets/catalog.')
  wanted = MANUAL_FILES.get(dataset.split(':')[0].split('/')[0], ())
  if wanted and not any((epath.Path(manual_dir or '.') / f).exists()
                        for f in wanted):
    raise FileNotFoundError(
        f'{dataset} needs {" and/or ".join(wanted)} in --manual_dir (got '
        f'{manual_dir}); download them from image-net.org, or make a synthetic '
        'set with python -m glmix_jax.data.synthetic --out=DIR.')
  builder = tfds.builder(dataset, data_dir=data_dir)
  tfds.disable_progress_bar()
  builder.download_and_prepare(
      file_format='array_record',
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))


# Split folders of an image folder -> TFDS split names (the official layout
# names the validation split ``val``).
IMAGE_FOLDER_SPLITS = {'train': 'train', 'val': 'validation',
                       'validation': 'validation', 'test': 'test'}


def _image_files(folder: epath.Path) -> list[epath.Path]:
  """The files under ``folder`` at any depth (as torchvision's ImageFolder
  walks), sorted; hidden files and folders (``.DS_Store``) skipped."""
  files = []
  for path in folder.iterdir():
    if path.name.startswith('.'):
      continue
    files.extend(_image_files(path) if path.is_dir() else [path])
  return sorted(files)


def _check_image(path: epath.Path) -> bytes:
  data = path.read_bytes()
  try:
    with Image.open(io.BytesIO(data)) as img:
      img.load()
  except Exception as e:  # pylint: disable=broad-exception-caught
    raise DatasetError(
        f'{path} is not an image that can be decoded ({type(e).__name__}: '
        f'{" ".join(str(e).split())}); remove or replace it. Nothing was '
        'written.') from e
  return data


def image_folder_splits(root: str | epath.Path
                        ) -> tuple[list[str], dict[str, list]]:
  """The class names and, per TFDS split, ``(file, label)`` of every image,
  each file checked to decode. Raises DatasetError naming the problem."""
  root = epath.Path(root)
  if not root.is_dir():
    raise DatasetError(f'Image folder {root} does not exist.')
  folders = {IMAGE_FOLDER_SPLITS[p.name]: p for p in sorted(root.iterdir())
             if p.is_dir() and p.name in IMAGE_FOLDER_SPLITS}
  if 'train' not in folders:
    raise DatasetError(
        f'{root} has no train/ folder: an image folder holds '
        'train/<class>/<image> (and val/<class>/<image>).')
  classes = sorted(p.name for p in folders['train'].iterdir()
                   if p.is_dir() and not p.name.startswith('.'))
  if not classes:
    raise DatasetError(f'{folders["train"]} has no class folders.')
  index = {name: i for i, name in enumerate(classes)}
  splits = {}
  for split, folder in folders.items():
    strays = [p for p in folder.iterdir() if not p.name.startswith('.') and
              (p.is_file() or p.name not in index)]
    if strays:
      raise DatasetError(
          f'{strays[0]} is not a class folder of {folders["train"]} (classes: '
          f'{", ".join(classes[:10])}); every image sits in '
          f'{folder}/<class>/. Nothing was written.')
    splits[split] = [(path, index[path.relative_to(folder).parts[0]])
                     for path in _image_files(folder)]
    for path, _ in splits[split]:
      _check_image(path)
  return classes, splits


def prepare_image_folder(name: str, root: str | epath.Path, *,
                         data_dir: str | None) -> None:
  """Writes the image folder ``root`` as the TFDS dataset ``name``: the
  files' bytes as they are (JPEG, PNG, grayscale, CMYK: the pipeline decodes
  them to RGB), their labels and paths. Every file is checked before anything
  is written."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  root = epath.Path(root)
  if name in tfds.list_builders():
    raise ValueError(f'{name!r} is a TFDS catalog dataset; give the image '
                     'folder another --dataset name.')
  target = epath.Path(data_dir or tfds.core.constants.DATA_DIR) / name
  if target.exists():
    raise FileExistsError(f'{target} exists; choose another --dataset name or '
                          '--data_dir, so that no prepared dataset is '
                          'overwritten.')
  classes, splits = image_folder_splits(root)
  features = tfds.features.FeaturesDict({
      'image': tfds.features.Image(),
      'label': tfds.features.ClassLabel(names=classes),
      'file_name': tfds.features.Text()})
  tfds.disable_progress_bar()
  tfds.dataset_builders.store_as_tfds_dataset(
      name=name, version='1.0.0', features=features, data_dir=data_dir,
      # Generators: one split's files are read as they are written.
      split_datasets={split: (
          (str(i), {'image': path.read_bytes(), 'label': label,
                    'file_name': str(path.relative_to(root))})
          for i, (path, label) in enumerate(files))
                      for split, files in splits.items()},
      description=f'The image folder {root}: {len(classes)} classes.',
      file_format='array_record', disable_shuffling=True)


def main(argv):
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  if f.image_folder:
    prepare_image_folder(f.dataset, f.image_folder, data_dir=f.data_dir)
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    info = tfds.builder(f.dataset, data_dir=f.data_dir).info
    counts = ', '.join(f'{k} {v.num_examples}' for k, v in info.splits.items())
    print(f'{f.dataset}: {info.features["label"].num_classes} classes '
          f'({counts}); train with --config.data.dataset={f.dataset} '
          f'--config.data.num_classes={info.features["label"].num_classes}')
  else:
    prepare(f.dataset, data_dir=f.data_dir, manual_dir=f.manual_dir)
  print(f'Prepared {f.dataset} in {f.data_dir or "the TFDS default data_dir"}')


if __name__ == '__main__':
  from absl import flags  # pylint: disable=g-import-not-at-top
  from glmix_jax import cli  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string('dataset', 'imagenet2012', 'TFDS dataset name.')
  flags.DEFINE_string('manual_dir', None, 'Directory of the downloaded files.')
  flags.DEFINE_string('image_folder', None, 'An image folder ROOT (ROOT/train/'
                      '<class>/<image>, ROOT/val/...) to prepare as the '
                      'dataset named by --dataset.')
  flags.DEFINE_string('data_dir', None, 'TFDS data_dir to write into.')
  cli.run(main, errors=(ValueError, FileNotFoundError, FileExistsError,
                        DatasetError))
