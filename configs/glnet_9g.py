r"""GLNet-9G on ImageNet-1k: the official recipe (top-1 84.5 in the paper).

  python train.py --config=configs/glnet_9g.py --workdir=WORKDIR
  python train.py --config=configs/glnet_9g.py:runlocal --workdir=/tmp/run

300 epochs at global batch 2048, AdamW lr 2e-3, weight decay 0.05, drop path
0.3 (official README), EMA 0.9999; see configs/common.py.
"""

from configs import common


def get_config(arg=None):
  config = common.glnet_recipe('glnet_9g', drop_path_rate=0.3)
  return common.with_args(config, arg)
