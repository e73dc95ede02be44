r"""GLNet-STL on ImageNet-1k: the official recipe (top-1 82.5 in the paper).

  python train.py --config=configs/glnet_stl.py --workdir=WORKDIR
  python train.py --config=configs/glnet_stl.py:runlocal --workdir=/tmp/run

The same as ``configs/glnet.py:variant=stl`` (the other sizes are variants of
that file): 300 epochs at global batch 2048, AdamW lr 2e-3, weight decay 0.05,
drop path 0.1 (official README), EMA 0.9999.
"""

from configs import common, glnet


def get_config(arg=None):
  args = common.parse_arg(arg, runlocal=False)
  return glnet.get_config('variant=stl,runlocal' if args.runlocal
                          else 'variant=stl')
