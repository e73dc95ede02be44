r"""ACmix-Swin on ImageNet-1k: the official recipe, one row per size.

  python train.py --config=configs/acmix_swin.py:variant=t --workdir=WORKDIR
  python train.py --config=configs/acmix_swin.py:variant=s,runlocal --workdir=/tmp/run

``variant``: ``t`` (the default; top-1 81.9 in the ACmix README) or ``s``
(83.5). The Microsoft Swin pipeline's recipe (``Swin-Transformer/configs``):
300 epochs (20 warm-up) at global batch 1024, AdamW lr 1e-3, weight decay
0.05, grad clip 5; drop path 0.2 (T) / 0.3 (S). ``runlocal``: see
``common.run_locally``.
"""

from configs import common

VARIANTS = {'t': 0.2, 's': 0.3}  # drop path, from the Swin configs


def get_config(arg=None):
  return common.variant_config(
      arg, family='ACmix-Swin', variants=VARIANTS, default='t',
      recipe=lambda v: common.acmix_swin_recipe(
          f'acmix_swin_{v}', drop_path_rate=VARIANTS[v]))
