r"""Evaluates a model on the whole validation split (every image exactly once).

  python eval.py --config=configs/glnet_stl.py --workdir=DIR      # a training run: raw + EMA
  python eval.py --config=configs/glnet_stl.py --checkpoint=DIR   # from glmix_jax.convert

Other splits or datasets by config, where prepared (``python -m
glmix_jax.data.prepare --dataset=NAME``): ``--config.data.dataset=imagenet_v2
--config.data.eval_split=test``, or ``--config.data.dataset=imagenet2012_real``
(validation split), which also reports ReaL top-1 (``real_top1``, over the
images that have ReaL labels).
"""

from absl import flags
from ml_collections import config_flags

from glmix_jax import cli, launch

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'A train.py workdir.')
_CHECKPOINT = flags.DEFINE_string('checkpoint', None,
                                  'A model checkpoint directory.')


def main(argv):
  del argv
  # Imported here, not above: the input worker processes start by importing
  # this file (Python's spawn), and need none of the trainer.
  from glmix_jax import train_lib  # pylint: disable=g-import-not-at-top
  train_lib.evaluate_checkpoint(_CONFIG.value, workdir=_WORKDIR.value,
                                model_checkpoint=_CHECKPOINT.value)


if __name__ == '__main__':
  launch.initialize()
  cli.run(main)
