r"""The ACmix demo: a small ACmix-ResNet learns the synthetic mini-ImageNet on a CPU.

  python train.py --config=configs/acmix_demo.py --workdir=/tmp/acmix_demo

Same data and protocol as ``configs/demo.py`` (``common.synthetic_demo``): one
bottleneck per stage at a quarter of ResNet-50's inner widths, 64 px, batch
64. The ResNet recipe's SGD learns this small set slowly, so the demo trains
with the GLNet recipe's AdamW (lr 2e-3, warm-up + cosine), keeping the ACmix
ResNet label smoothing (eps/(K-1)).
"""

from configs import common


def get_config():
  config = common.acmix_resnet_recipe('acmix_resnet26')
  config.model.update(depths=(1, 1, 1, 1), width_per_group=16)
  config = common.synthetic_demo(config, image_size=64)
  config.update(total_epochs=8, warmup_epochs=1)
  config.optimizer = common.glnet_recipe('glnet_stl', 0.0).optimizer
  config.optimizer.update(lr=2e-3, lr_batch_size=64)
  return config
