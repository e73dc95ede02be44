r"""ACmix-Swin-S on ImageNet-1k: the official recipe (top-1 83.5 in the README).

  python train.py --config=configs/acmix_swin_s.py --workdir=WORKDIR
  python train.py --config=configs/acmix_swin_s.py:runlocal --workdir=/tmp/run

300 epochs (20 warm-up) at global batch 1024, AdamW lr 1e-3, weight decay
0.05, drop path 0.3, grad clip 5; see configs/common.py.
"""

from configs import common


def get_config(arg=None):
  config = common.acmix_swin_recipe('acmix_swin_s', drop_path_rate=0.3)
  return common.with_args(config, arg)
