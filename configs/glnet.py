r"""GLNet on ImageNet-1k: the official recipe, one row per size.

  python train.py --config=configs/glnet.py:variant=4g --workdir=WORKDIR
  python train.py --config=configs/glnet.py:variant=16g,runlocal --workdir=/tmp/run

``variant``: ``stl`` (the default; also ``configs/glnet_stl.py``), ``4g``,
``9g`` or ``16g``. 300 epochs at global batch 2048, AdamW lr 2e-3, weight
decay 0.05, EMA 0.9999 (``main_cx2.py``; Zhu et al. 2024, Tab. 8/9); drop path
as the official README gives it per size, not the 0.1 that
``scripts/train_cx2.sh`` passes for 4G and 9G. ``runlocal``: see
``common.run_locally``.
"""

from configs import common

# Drop path per size, from the official README.
VARIANTS = {'stl': 0.1, '4g': 0.15, '9g': 0.3, '16g': 0.4}


def get_config(arg=None):
  return common.variant_config(
      arg, family='GLNet', variants=VARIANTS, default='stl',
      recipe=lambda v: common.glnet_recipe(
          f'glnet_{v}', drop_path_rate=VARIANTS[v]))
