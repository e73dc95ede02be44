r"""ACmix-ResNet-50 on ImageNet-1k: the official recipe (top-1 77.8 in the
README).

  python train.py --config=configs/acmix_resnet50.py --workdir=WORKDIR
  python train.py --config=configs/acmix_resnet50.py:runlocal --workdir=/tmp/run

90 epochs (5 warm-up from lr / 4) at batch 128, SGD momentum 0.9, lr 0.1,
weight decay 1e-4 on every parameter, label smoothing 0.1; see
configs/common.py.
"""

from configs import common


def get_config(arg=None):
  args = common.parse_arg(arg, runlocal=False)
  config = common.acmix_resnet_recipe('acmix_resnet50')
  return common.run_locally(config) if args.runlocal else config
