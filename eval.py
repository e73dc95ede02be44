r"""Evaluates a model on whole splits (every image exactly once).

  python eval.py --config=configs/glnet_stl.py --workdir=DIR      # a training run: raw + EMA
  python eval.py --config=configs/glnet_stl.py --checkpoint=DIR   # from glmix_jax.convert

It runs the config's named evaluations (``config.evals``): by default those
that training runs (ImageNet validation, ``val``); ``--evals=val,v2,real`` also
ImageNet-V2 (``v2``) and ImageNet-ReaL (``real``, which also reports
``real_top1`` over the images that have ReaL labels), once prepared
(``python -m glmix_jax.data.prepare --dataset=imagenet_v2``). An evaluation's
split or dataset can be changed like any field:
``--config.evals.val.split=validation[:10%]``.
"""

from absl import flags
from ml_collections import config_flags

from glmix_jax import cli, launch

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'A train.py workdir.')
_CHECKPOINT = flags.DEFINE_string('checkpoint', None,
                                  'A model checkpoint directory.')
_EVALS = flags.DEFINE_list(
    'evals', None, 'Names in config.evals to run (default: those training '
    'runs).')


def main(argv):
  del argv
  config = _CONFIG.value  # a config file that fails to load stops here
  # Imported here, not above: the input worker processes start by importing
  # this file (Python's spawn), and need none of the trainer.
  from glmix_jax import train_lib  # pylint: disable=g-import-not-at-top
  train_lib.evaluate_checkpoint(config, workdir=_WORKDIR.value,
                                model_checkpoint=_CHECKPOINT.value,
                                evals=_EVALS.value)


if __name__ == '__main__':
  launch.initialize()
  cli.run(main)
