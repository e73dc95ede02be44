r"""The demo: a small GLNet learns the synthetic mini-ImageNet on a CPU.

  python train.py --config=configs/demo.py --workdir=/tmp/glmix_demo

The synthetic dataset (10 classes: a target shape above or below a red disc,
see ``glmix_jax/data/synthetic.py``) is written and prepared into
``WORKDIR/data`` on first use; 10 % of its train split is held out for
validation. The paper's recipe (``common.glnet_recipe``), shrunk: a 1-1-2-1
block GLNet-STL at 48 px, batch 64, 35 epochs, no Mixup/CutMix or RandAugment
(too strong for 2,600 images), float32 on the CPU.

On a 2-core CPU it takes about five minutes and reaches about 98 % top-1 on
the held-out images (chance: 10 %); see README.md for the measured run.
"""

from configs import common


def get_config():
  config = common.glnet_recipe(
      'glnet_stl', drop_path_rate=0.0, dims=(32, 64, 96, 128),
      depths=(1, 1, 2, 1))
  config = common.synthetic_demo(config, image_size=48)
  config.update(total_epochs=35, warmup_epochs=2)
  config.optimizer.update(lr=2e-3, lr_batch_size=64)
  return config
