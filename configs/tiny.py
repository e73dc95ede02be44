r"""The smallest run that exercises the whole training path (tests, smoke).

  python train.py --config=configs/tiny.py --workdir=/tmp/glmix_tiny

The demo config shrunk further: a 4-class synthetic set of 24 images per class
at 32 px, a one-block-per-stage GLNet-STL, 12 steps of batch 16, a checkpoint
every 4 steps, metrics every step. Input in this process (no worker
processes to start), so that it starts in seconds.
"""

from configs import demo


def get_config():
  config = demo.get_config()
  config.model.update(dims=(32, 32, 32, 32), depths=(1, 1, 1, 1))
  config.data.update(synthetic=dict(classes=4, images_per_class=24,
                                    image_size=32, val_images=4),
                     num_classes=4, image_size=32, num_workers=0)
  config.augmentation.update(mixup_alpha=0.8, cutmix_alpha=1.0,
                             mix_group_size=2)
  config.update(total_steps=12, warmup_epochs=1, global_batch_size=16,
                ema_decay=0.99, log_steps=1, checkpoint_steps=4)
  return config
