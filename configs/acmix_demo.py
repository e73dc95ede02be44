r"""The ACmix demo: a small ACmix-Swin learns the synthetic mini-ImageNet.

  python train.py --config=configs/acmix_demo.py --workdir=/tmp/acmix_demo

As ``configs/demo.py`` (same dataset and recipe, held-out 10 %), with a
one-block-per-stage ACmix-Swin of width 32 and 4x4 windows at 64 px (token
maps 16, 8, 4, 2: the official window layout rules hold at this size).
"""

from configs import demo


def get_config():
  config = demo.get_config()
  config.model_name = 'acmix_swin_t'
  config.model = dict(embed_dim=32, depths=(1, 1, 1, 1),
                      num_heads=(1, 2, 4, 8), window_size=4,
                      drop_path_rate=0.0, dtype='float32')
  config.data.image_size = 64
  config.optimizer.weight_decay_rule = 'swin'
  return config
