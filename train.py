r"""Trains a model: ``python train.py --config=configs/glnet_stl.py --workdir=DIR``.

Any config field can be overridden on the command line
(``--config.global_batch_size=1024``). A run restarted with the same workdir
resumes from its latest checkpoint; SIGTERM saves and exits 0.
"""

from absl import flags
from ml_collections import config_flags

from glmix_jax import cli, launch

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None,
                               'Checkpoints, metrics and logs.', required=True)


def main(argv):
  del argv
  config = _CONFIG.value  # a config file that fails to load stops here
  # Imported here, not above: the input worker processes start by importing
  # this file (Python's spawn), and need none of the trainer.
  from glmix_jax import train_lib  # pylint: disable=g-import-not-at-top
  train_lib.train_and_evaluate(config, _WORKDIR.value)


if __name__ == '__main__':
  launch.initialize()
  cli.run(main)
