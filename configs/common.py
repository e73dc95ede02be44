"""The shared pieces of the training recipes, as plain ml_collections.

Each recipe file (``glnet.py``, ``acmix_swin.py``, ``acmix_resnet50.py``)
reads like a row of the paper's recipe table: it calls ``glnet_recipe`` (or
the ACmix ones) with the variant's model name and drop-path rate.
Field names follow the papers' tables; values come from the official training
code (GLMix ``main_cx2.py`` and ``ConvNextV2/optim_factory.py``; the Swin pipeline
in ACmix ``Swin-Transformer/``; ACmix ``ResNet/main.py``), with every
deviation commented.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def imagenet_data() -> ml_collections.ConfigDict:
  """ImageNet-1k from TFDS, with the timm/DeiT evaluation protocol."""
  return ml_collections.ConfigDict(dict(
      dataset='imagenet2012',
      # None: $TFDS_DATA_DIR or ~/tensorflow_datasets (a placeholder, so that
      # --config.data.data_dir=... can set it)
      data_dir=config_dict.placeholder(str),
      train_split='train',
      num_classes=1000,
      image_size=224,
      eval_crop_pct=0.875,  # resize shorter side to 224 / 0.875 = 256, crop 224
      interpolation='bicubic',
      mean=IMAGENET_MEAN,
      std=IMAGENET_STD,
      # Decoding and augmentation: worker processes (-1: one per core of
      # this process, less an eighth for the trainer; 0: in this process),
      # threads in each, and whole batches made ahead.
      num_workers=-1,
      num_threads=2,
      prefetch=2,
  ))


def imagenet_evals() -> ml_collections.ConfigDict:
  """The named evaluations (big_vision's ``config.evals``): each reads a
  ``split`` of a prepared TFDS ``dataset`` ('': ``data.dataset``) through the
  evaluation transform. ``every_steps``: in training, 0 runs it at the end, N
  also every N steps, -1 never; ``eval.py`` runs those training runs, or the
  ones ``--evals`` names (``--evals=val,v2,real``).
  """
  return ml_collections.ConfigDict(dict(
      val=dict(dataset='', split='validation', every_steps=0),
      # ImageNet-V2 matched-frequency (Recht et al. 2019).
      v2=dict(dataset='imagenet_v2', split='test', every_steps=-1),
      # ImageNet-ReaL (Beyer et al. 2020): also ``real_top1``.
      real=dict(dataset='imagenet2012_real', split='validation',
                every_steps=-1),
      # Few-shot linear probes on the pre-logit features (glmix_jax.fewshot,
      # big_vision's fewshot_lsr): k shots per class of train_split, scored
      # on split; ``eval.py --evals=fewshot``.
      fewshot=few_shot(),
  ))


def few_shot(dataset: str = '', train_split: str = 'train',
             split: str = 'validation', every_steps: int = -1) -> dict:
  """A few-shot probe entry of ``config.evals`` (1, 5, 10, 25 shots; the
  ridge's l2 as big_vision's default, 2^10)."""
  return dict(type='fewshot', dataset=dataset, train_split=train_split,
              split=split, shots=(1, 5, 10, 25), l2_reg=2.0**10,
              every_steps=every_steps)


def loop(**overrides) -> dict:
  """Bookkeeping of a run: where it starts, logging, evaluation and
  checkpoint cadence."""
  return dict(
      # Fine-tuning (glmix_jax.transfer): a model checkpoint or a train.py
      # workdir whose weights the first step starts from ('' = from
      # scratch), its 'raw' or 'ema' weights, and the classifier: 'auto'
      # re-creates it when num_classes differs, 'reinit' always;
      # freeze_backbone: train the classifier alone (a linear probe).
      init_from='',
      init_weights='raw',
      init_head='auto',
      freeze_backbone=False,
      total_steps=0,  # > 0 overrides total_epochs
      log_steps=100,
      # Global batch of every evaluation; 0: that of one training forward
      # pass (global_batch_size / grad_accum_steps).
      eval_batch_size=0,
      checkpoint_steps=1000,
      keep_checkpoints=3,
      keep_checkpoint_every=0,  # also keep every N-th step; 0: none
      max_bad_steps=0,  # non-finite steps skipped before the run stops
      grad_accum_steps=1,  # > 1: global_batch_size over this many passes
      # (data, fsdp) devices; F = fsdp > 1 shards parameters, optimizer
      # state and EMA over groups of F devices (FSDP); -1: the rest.
      mesh_shape=(-1, 1),
      **overrides)


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """The arguments of ``--config=FILE.py:ARG`` (big_vision's ``parse_arg``).

  ``ARG`` is comma-separated ``key=value`` pairs and bare ``key``s (True);
  ``defaults`` name the keys a config file accepts and give each its default
  and type: ``parse_arg('variant=4g,runlocal', variant='stl',
  runlocal=False)`` is ``{'variant': '4g', 'runlocal': True}``.
  """
  args = ml_collections.ConfigDict(defaults)
  given = set()
  for item in (arg or '').split(','):
    if not item:
      continue
    key, has_value, value = item.partition('=')
    if key not in defaults:
      raise ValueError(f'Unknown config argument {key!r}; known: '
                       f'{", ".join(sorted(defaults)) or "none"}.')
    if key in given:
      raise ValueError(f'Config argument {key!r} is given twice.')
    given.add(key)
    kind = type(defaults[key])
    if kind is bool:
      if has_value and value not in ('True', 'False'):
        raise ValueError(f'Config argument {key!r} is True or False, '
                         f'not {value!r}.')
      args[key] = not has_value or value == 'True'
    elif not has_value:
      raise ValueError(f'Config argument {key!r} needs a value: {key}=...')
    else:
      try:
        args[key] = kind(value)
      except ValueError:
        raise ValueError(f'Config argument {key}={value!r} is not of type '
                         f'{kind.__name__}.') from None
  return args


def variant_config(arg: str | None, *, family: str, variants, default: str,
                   recipe) -> ml_collections.ConfigDict:
  """A recipe file's config for ``ARG`` = ``variant=V[,runlocal]``:
  ``recipe(V)``, V one of ``variants`` (``default`` if not given), shrunk by
  ``run_locally`` with ``runlocal``."""
  args = parse_arg(arg, variant=default, runlocal=False)
  if args.variant not in variants:
    raise ValueError(f'Unknown {family} variant {args.variant!r}; known: '
                     f'{", ".join(variants)}.')
  config = recipe(args.variant)
  return run_locally(config) if args.runlocal else config


def run_locally(config: ml_collections.ConfigDict
                ) -> ml_collections.ConfigDict:
  """The ``runlocal`` argument: the same model and recipe, shrunk to a laptop
  CPU: a synthetic mini-ImageNet (made in WORKDIR/data) at the config's image
  size, batch 16, 20 steps without warm-up, float32, progress every step.
  """
  config.data.update(
      synthetic=dict(classes=10, images_per_class=40,
                     image_size=config.data.image_size),
      num_classes=10, train_split='train[:90%]')
  config.evals.val.split = 'train[90%:]'
  config.evals.fewshot.update(train_split='train[:90%]', split='train[90%:]')
  config.augmentation.update(repeated_augmentation=1, mix_group_size=2)
  config.model.dtype = 'float32'
  config.update(total_steps=20, warmup_epochs=0, global_batch_size=16,
                log_steps=1, checkpoint_steps=10)
  return config


def synthetic_demo(config: ml_collections.ConfigDict,
                   image_size: int) -> ml_collections.ConfigDict:
  """Points a recipe at the demos' synthetic mini-ImageNet (made in
  WORKDIR/data: 10 classes x 260 images, 10 % held out for validation) with
  light augmentation: crops of 70-100 % of the image and flips only, since
  Mixup/CutMix, RandAugment and erasing are too strong for 2,340 images.
  Float32 on the CPU, no EMA.
  """
  config.model.dtype = 'float32'
  config.data.update(
      synthetic=dict(classes=10, images_per_class=260, image_size=80),
      num_classes=10, image_size=image_size, train_split='train[:90%]')
  config.evals.val.split = 'train[90%:]'
  config.evals.fewshot.update(train_split='train[:90%]', split='train[90%:]')
  config.augmentation.update(
      random_resized_crop_scale=(0.7, 1.0), randaugment='', random_erasing=0.0,
      mixup_alpha=0.0, cutmix_alpha=0.0, repeated_augmentation=1)
  config.update(global_batch_size=64, ema_decay=0.0, log_steps=50,
                checkpoint_steps=200)
  return config


def deit_augmentation() -> ml_collections.ConfigDict:
  """timm ``create_transform`` + Mixup/CutMix as in DeiT / ConvNeXt training."""
  return ml_collections.ConfigDict(dict(
      random_resized_crop_scale=(0.08, 1.0),
      hflip=0.5,
      randaugment='rand-m9-mstd0.5-inc1',  # colour jitter off when RA is on
      random_erasing=0.25,  # pixel mode, one box
      mixup_alpha=0.8,
      cutmix_alpha=1.0,
      mix_prob=1.0,
      mix_switch_prob=0.5,  # Mixup or CutMix per group
      # timm mixes within each GPU's batch: groups of this many consecutive
      # examples (128 per GPU in the recipes); must divide the per-device
      # batch (glmix_jax.data.mix).
      mix_group_size=128,
      label_smoothing=0.1,  # folded into the mixed targets, as timm does
      label_smoothing_spread='eps_over_k',  # timm: eps / K to every class
      repeated_augmentation=3,  # DeiT RASampler: 3 augmented copies per image
  ))


def glnet_recipe(model_name: str, drop_path_rate: float,
                 **model_overrides) -> ml_collections.ConfigDict:
  """GLNet's ImageNet-1k recipe (``main_cx2.py``, Zhu et al. 2024, Tab. 8/9).

  Args:
    model_name: a registered GLNet name.
    drop_path_rate: the official README value for this size.
    **model_overrides: further model fields.
  """
  return ml_collections.ConfigDict(dict(
      **loop(),
      model_name=model_name,
      model=dict(
          drop_path_rate=drop_path_rate,
          dtype='bfloat16',  # bf16 compute replaces fp16 AMP
          # Memory / speed trades that leave the function unchanged: recompute
          # block activations in the backward pass ('none', 'full',
          # 'dots_saveable', 'dots_with_no_batch_dims_saveable'), and run a
          # stage's repeated blocks as one nn.scan. On XLA:CPU only the two
          # together lower peak memory (2.3x for glnet_stl); see
          # glnet.REMAT_POLICIES and BENCHMARKS.md.
          remat='none',
          scan_blocks=False,
          **model_overrides),
      data=imagenet_data(),
      evals=imagenet_evals(),
      augmentation=deit_augmentation(),
      total_epochs=300,
      warmup_epochs=5,  # linear from 0, per step; then half-cosine to min_lr
      global_batch_size=2048,  # 128 per GPU x 16 GPUs
      optimizer=dict(
          name='adamw',  # torch convention: decay multiplied by the lr
          lr=2e-3,  # blr 2.5e-4 x 2048 / 256 ...
          lr_batch_size=2048,  # ... scaled linearly for other batch sizes
          schedule='warmup_cosine',
          warmup_lr=0.0,
          min_lr=1e-5,
          b1=0.9, b2=0.999, eps=1e-8,
          weight_decay=0.05,
          # ConvNeXt-V2 helper: no decay for 1-D params and names ending in
          # bias/gamma/beta, so slot_scale (0-D) and init_slots ARE decayed.
          weight_decay_rule='convnextv2',
          grad_clip_norm=5.0,
          # Fine-tuning: each layer's lr x layer_decay^(L + 1 - layer)
          # (optim.layer_decay); 1: none, as in pre-training.
          layer_decay=1.0,
      ),
      ema_decay=0.9999,  # ModelEma, evaluated alongside the raw weights
      seed=0,
  ))


def acmix_swin_recipe(model_name: str,
                      drop_path_rate: float) -> ml_collections.ConfigDict:
  """ACmix-Swin's recipe: the Microsoft Swin pipeline, unchanged (ACmix
  ``Swin-Transformer/config.py`` defaults and
  ``configs/acmix_swin_{tiny,small}_patch4_window7_224.yaml``).

  Base learning rates are the Swin config's per-512 values scaled linearly to
  the README's global batch of 1024 (8 GPUs x 128).
  """
  augmentation = deit_augmentation()
  augmentation.repeated_augmentation = 1  # Swin has no RASampler
  return ml_collections.ConfigDict(dict(
      **loop(),
      model_name=model_name,
      model=dict(drop_path_rate=drop_path_rate, dtype='bfloat16'),  # Apex O1
      data=imagenet_data(),  # bicubic resize 256 -> centre crop 224
      evals=imagenet_evals(),
      augmentation=augmentation,
      total_epochs=300,
      warmup_epochs=20,
      global_batch_size=1024,
      optimizer=dict(
          name='adamw',
          lr=1e-3,  # 5e-4 x 1024 / 512 ...
          lr_batch_size=1024,  # ... scaled linearly for other batch sizes
          warmup_lr=1e-6,  # 5e-7 x 1024 / 512
          min_lr=1e-5,  # 5e-6 x 1024 / 512
          # timm CosineLRScheduler per step, t_initial = all 300 epochs and no
          # warm-up prefix: the ramp replaces the first 20 epochs of a cosine
          # measured from step 0 (glmix_jax.optim.timm_cosine).
          schedule='timm_cosine',
          b1=0.9, b2=0.999, eps=1e-8,
          weight_decay=0.05,
          # No decay for 1-D params (norms, rate1/rate2), biases and the
          # relative position tables; fc and dep_conv kernels ARE decayed.
          weight_decay_rule='swin',
          grad_clip_norm=5.0,
          # Fine-tuning: each layer's lr x layer_decay^(L + 1 - layer)
          # (optim.layer_decay); 1: none, as in pre-training.
          layer_decay=1.0,
      ),
      ema_decay=0.0,  # no EMA in the Swin pipeline
      seed=0,
  ))


def acmix_resnet_recipe(model_name: str) -> ml_collections.ConfigDict:
  """ACmix-ResNet's recipe: ACmix ``ResNet/main.py``'s argument
  defaults.

  The released script cannot run as written (a missing import,
  undefined scheduler), so this is its *intended* schedule; whether the paper
  used exactly these settings is not confirmed.
  """
  data = imagenet_data()
  data.interpolation = 'bilinear'  # torchvision defaults
  return ml_collections.ConfigDict(dict(
      **loop(),
      model_name=model_name,
      model=dict(dtype='float32'),  # fp32 training, no drop path
      data=data,
      evals=imagenet_evals(),
      augmentation=dict(  # RandomResizedCrop + flip only
          random_resized_crop_scale=(0.08, 1.0),
          hflip=0.5,
          randaugment='',
          random_erasing=0.0,
          mixup_alpha=0.0,
          cutmix_alpha=0.0,
          mix_prob=0.0,
          mix_switch_prob=0.0,
          mix_group_size=128,
          # main.py smooth_loss: 1 - eps on the target and eps / (K - 1) on
          # every other class, not timm's eps / K spread.
          label_smoothing=0.1,
          label_smoothing_spread='eps_over_k_minus_1',
          repeated_augmentation=1,
      ),
      total_epochs=90,
      warmup_epochs=5,
      global_batch_size=128,  # README: one DataParallel process, 128 images
      optimizer=dict(
          name='sgd',  # torch SGD: coupled L2 added before momentum
          lr=0.1,
          lr_batch_size=128,
          # Per step: linear from lr / 4 to lr over 5 epochs, then a half
          # cosine to 0 over the other 85 (glmix_jax.optim.warmup_cosine).
          schedule='warmup_cosine',
          warmup_lr=0.025,
          min_lr=0.0,
          momentum=0.9,  # no Nesterov
          weight_decay=1e-4,
          weight_decay_rule='all',  # rates, BN and biases decayed too
          grad_clip_norm=0.0,
          # Fine-tuning: each layer's lr x layer_decay^(L + 1 - layer)
          # (optim.layer_decay); 1: none, as in pre-training.
          layer_decay=1.0,
      ),
      ema_decay=0.0,
      seed=0,  # main.py default is no seed
  ))
