r"""Prepares a TFDS dataset from manually downloaded files, offline.

  python -m glmix_jax.data.prepare --dataset=imagenet2012 \
      --manual_dir=DIR_WITH_TARS --data_dir=~/tensorflow_datasets

For ImageNet, ``--manual_dir`` holds ``ILSVRC2012_img_train.tar`` and/or
``ILSVRC2012_img_val.tar`` exactly as downloaded from image-net.org (or as
written by ``python -m glmix_jax.data.synthetic``). The dataset is written in
the ArrayRecord format, which the input pipeline reads with random access.
"""

from __future__ import annotations

from etils import epath

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


def main(argv):
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  prepare(f.dataset, data_dir=f.data_dir, manual_dir=f.manual_dir)
  print(f'Prepared {f.dataset} in {f.data_dir or "the TFDS default data_dir"}')


if __name__ == '__main__':
  from absl import flags  # pylint: disable=g-import-not-at-top
  from glmix_jax import cli  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string('dataset', 'imagenet2012', 'TFDS dataset name.')
  flags.DEFINE_string('manual_dir', None, 'Directory of the downloaded files.')
  flags.DEFINE_string('data_dir', None, 'TFDS data_dir to write into.')
  cli.run(main, errors=(ValueError, FileNotFoundError))
