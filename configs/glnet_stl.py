r"""GLNet-STL on ImageNet-1k: the official recipe (top-1 82.5 in the paper).

  python train.py --config=configs/glnet_stl.py --workdir=WORKDIR
  python train.py --config=configs/glnet_stl.py:runlocal --workdir=/tmp/run

300 epochs at global batch 2048, AdamW lr 2e-3, weight decay 0.05, drop path
0.1 (official README), EMA 0.9999; see configs/common.py.
"""

from configs import common


def get_config(arg=None):
  config = common.glnet_recipe('glnet_stl', drop_path_rate=0.1)
  return common.with_args(config, arg)
