r"""Fine-tuning any backbone on another classification dataset.

  python train.py --workdir=WORKDIR \
      --config=configs/finetune.py:model=glnet_stl,dataset=cifar10,init_from=DIR
  python train.py --workdir=WORKDIR \
      --config=configs/finetune.py:model=acmix_swin_t,dataset=oxford_iiit_pet,init_from=DIR,linear_probe

Arguments: ``model`` (any registered name; its ImageNet recipe is the
start), ``dataset`` (a TFDS catalog dataset prepared with ``python -m
glmix_jax.data.prepare --dataset=NAME``, or an image folder prepared under a
name of yours), ``init_from`` (a converted model checkpoint or a train.py
workdir), ``image_size`` (224; small images such as CIFAR's are upsampled
to it by the crops, as the official ``data_set=CIFAR`` path does),
``linear_probe`` (train the classifier alone, ``freeze_backbone``).

The class count comes from the dataset's builder (``data.num_classes=0``);
the splits from the table below (TFDS catalog split names; an image folder,
or a dataset not in the table, uses ``train`` and ``validation``).

Changes to the ImageNet recipe, as the official ``main_cx2.py --finetune``
makes them: a new classifier (``init_head='reinit'``: N(0, 2e-5^2), bias 0).
Ours, for small datasets (the papers give no transfer recipe): 30 epochs
with 2 of warm-up at global batch 512, a tenth of the recipe's learning rate
(scaled linearly to 512), layer-wise lr decay 0.8, no repeated augmentation,
EMA off, Mixup/CutMix groups of 32. ACmix-Swin takes windows of
``image_size / 32`` (Swin's 12 at 384 px; the relative-position tables of
the pre-trained 7 are resized, ``glmix_jax.transfer``).
"""

from configs import common

# dataset: (train split, validation split), as the TFDS catalog names them.
SPLITS = {
    'cifar10': ('train', 'test'),
    'cifar100': ('train', 'test'),
    'oxford_flowers102': ('train+validation', 'test'),
    'oxford_iiit_pet': ('train', 'test'),
    'food101': ('train', 'validation'),
    'tf_flowers': ('train[:90%]', 'train[90%:]'),  # one split only
}
DEFAULT_SPLITS = ('train', 'validation')  # an image folder's

# A model name's ImageNet recipe, by family.
RECIPES = {
    'glnet_': lambda name: common.glnet_recipe(name, drop_path_rate=0.1),
    'acmix_swin_': lambda name: common.acmix_swin_recipe(name,
                                                         drop_path_rate=0.2),
    'acmix_resnet': common.acmix_resnet_recipe,
}


def get_config(arg=None):
  args = common.parse_arg(arg, model='glnet_stl', dataset='cifar10',
                          init_from='', image_size=224, linear_probe=False)
  family = next((f for f in RECIPES if args.model.startswith(f)), None)
  if family is None:
    raise ValueError(f'No recipe for model {args.model!r}; models: names '
                     f'starting with {", ".join(RECIPES)}.')
  config = RECIPES[family](args.model)
  train_split, val_split = SPLITS.get(args.dataset, DEFAULT_SPLITS)
  config.data.update(dataset=args.dataset, num_classes=0,
                     image_size=args.image_size, train_split=train_split)
  config.evals.val.split = val_split
  config.evals.fewshot.update(train_split=train_split, split=val_split)
  for name in ('v2', 'real'):  # ImageNet's test sets
    del config.evals[name]
  # Mixup/CutMix groups that divide the per-device batch on up to 16 devices.
  config.augmentation.update(repeated_augmentation=1, mix_group_size=32)
  if family == 'acmix_swin_':  # Swin's rule: windows of side/32 (7 at 224,
    # 12 at 384), each bias table resized from the pre-trained one
    config.model.window_size = args.image_size // 32
  batch = 512
  config.optimizer.update(
      lr=config.optimizer.lr / 10 * batch / config.optimizer.lr_batch_size,
      lr_batch_size=batch, layer_decay=0.8)
  config.update(init_from=args.init_from, init_head='reinit',
                freeze_backbone=args.linear_probe, total_epochs=30,
                warmup_epochs=2, global_batch_size=batch, ema_decay=0.0)
  return config
