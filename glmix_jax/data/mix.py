"""Mixup / CutMix with label smoothing, on device inside the train step.

Reproduces timm ``Mixup(mode='batch', correct_lam=True)`` as the DeiT /
ConvNeXt / GLNet recipes use it (mixup 0.8, cutmix 1.0, prob 1.0, switch 0.5,
label smoothing 0.1): each batch is paired with itself reversed (image i with
image B-1-i); one coin decides whether the batch is mixed at all, one whether
it is CutMix or Mixup, one lambda ~ Beta(alpha, alpha) and one box serve the
whole batch; the targets are timm's smoothed one-hots (off value eps/K, on
value 1 - eps + eps/K) blended with the same lambda, where for CutMix lambda
is recomputed from the box actually pasted after clipping at the borders.

Why on device: mixing is one elementwise blend (or select) over a batch that
is already on the accelerator, so it costs next to nothing there, while on the
host it would need the whole batch assembled in one process and another full
pass over it in numpy. Being batch-level, it does not fit the per-image host
transforms anyway. Under ``jit`` with the batch sharded over devices, reversing
the batch is a collective permute that XLA inserts.

The randomness comes from a JAX key, so a step's mixing is reproducible from
(key, batch).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


LABEL_SMOOTHING_SPREADS = ('eps_over_k', 'eps_over_k_minus_1')


def smooth_targets(labels: jax.Array, num_classes: int,
                   label_smoothing: float,
                   spread: str = 'eps_over_k') -> jax.Array:
  """Smoothed one-hot targets, float32 (B, num_classes); rows sum to 1.

  ``spread='eps_over_k'`` (timm, DeiT, Swin, GLNet): every class gets eps/K
  and the true class 1 - eps + eps/K. ``'eps_over_k_minus_1'`` (the ACmix
  ResNet script's ``smooth_loss``): the true class gets 1 - eps and each of
  the K - 1 others eps/(K - 1).
  """
  if spread == 'eps_over_k':
    off_value = label_smoothing / num_classes
    on_value = 1.0 - label_smoothing + off_value
  elif spread == 'eps_over_k_minus_1':
    off_value = label_smoothing / (num_classes - 1)
    on_value = 1.0 - label_smoothing
  else:
    raise ValueError(f'Unknown label smoothing spread {spread!r}; choose from '
                     f'{LABEL_SMOOTHING_SPREADS}.')
  one_hot = labels[:, None] == jnp.arange(num_classes)
  return jnp.where(one_hot, on_value, off_value).astype(jnp.float32)


def _cutmix_box(key: jax.Array, lam: jax.Array, height: int,
                width: int) -> tuple[jax.Array, jax.Array]:
  """timm ``rand_bbox`` mask (H, W) and lambda corrected to its area.

  Box sides int(side * sqrt(1 - lam)), centre uniform over the pixels, then
  clipped to the image: half-sides are floored, so an odd side loses a pixel,
  as in timm.
  """
  ratio = jnp.sqrt(1.0 - lam)
  cut_h = jnp.floor(height * ratio).astype(jnp.int32)
  cut_w = jnp.floor(width * ratio).astype(jnp.int32)
  key_y, key_x = jax.random.split(key)
  cy = jax.random.randint(key_y, (), 0, height)
  cx = jax.random.randint(key_x, (), 0, width)
  y0 = jnp.clip(cy - cut_h // 2, 0, height)
  y1 = jnp.clip(cy + cut_h // 2, 0, height)
  x0 = jnp.clip(cx - cut_w // 2, 0, width)
  x1 = jnp.clip(cx + cut_w // 2, 0, width)
  rows = jnp.arange(height)[:, None]
  cols = jnp.arange(width)[None, :]
  mask = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)
  area = ((y1 - y0) * (x1 - x0)).astype(jnp.float32)
  return mask, 1.0 - area / (height * width)


def mix_batch(key: jax.Array, images: jax.Array, labels: jax.Array, *,
              num_classes: int, mixup_alpha: float, cutmix_alpha: float,
              mix_prob: float, switch_prob: float,
              label_smoothing: float,
              label_smoothing_spread: str = 'eps_over_k'
              ) -> tuple[jax.Array, jax.Array]:
  """timm batch-mode Mixup/CutMix with label smoothing folded into targets.

  The keyword arguments are Python numbers (static under ``jit``): which of
  Mixup and CutMix exist is decided while tracing, as timm decides it in
  ``__init__``.

  Args:
    key: randomness for this batch.
    images: (B, H, W, C), B even (timm requires it); any float dtype, mixed
      in float32 and returned in the input dtype.
    labels: (B,) integer class ids.
    num_classes: K.
    mixup_alpha: Beta(alpha, alpha) for Mixup; <= 0 disables Mixup.
    cutmix_alpha: Beta(alpha, alpha) for CutMix; <= 0 disables CutMix.
    mix_prob: chance that the batch is mixed at all.
    switch_prob: chance of CutMix rather than Mixup when both are enabled.
    label_smoothing: eps of ``smooth_targets``.
    label_smoothing_spread: ``smooth_targets``' spread of eps.

  Returns:
    (mixed images, float32 (B, K) targets with rows summing to 1).

  Raises:
    ValueError: odd batch, or neither Mixup nor CutMix enabled.
  """
  batch, height, width = images.shape[:3]
  if batch % 2:
    raise ValueError(f'mix_batch needs an even batch size, got {batch}')
  if mixup_alpha <= 0 and cutmix_alpha <= 0:
    raise ValueError('mix_batch needs mixup_alpha > 0 or cutmix_alpha > 0; '
                     'use smooth_targets when mixing is off')
  key_apply, key_switch, key_mixup, key_cutmix, key_box = jax.random.split(
      key, 5)
  apply = jax.random.uniform(key_apply) < mix_prob
  if mixup_alpha > 0 and cutmix_alpha > 0:
    use_cutmix = jax.random.uniform(key_switch) < switch_prob
  else:
    use_cutmix = jnp.asarray(cutmix_alpha > 0)
  # Only the enabled Beta is ever selected; a disabled one is a dummy 1.
  lam_mixup = (jax.random.beta(key_mixup, mixup_alpha, mixup_alpha)
               if mixup_alpha > 0 else jnp.float32(1.0))
  lam_cutmix = (jax.random.beta(key_cutmix, cutmix_alpha, cutmix_alpha)
                if cutmix_alpha > 0 else jnp.float32(1.0))
  lam = jnp.where(apply, jnp.where(use_cutmix, lam_cutmix, lam_mixup), 1.0)
  mask, lam_box = _cutmix_box(key_box, lam, height, width)
  cutmix = apply & use_cutmix
  lam = jnp.where(cutmix, lam_box, lam)

  x = images.astype(jnp.float32)
  partner = x[::-1]
  blended = lam * x + (1.0 - lam) * partner
  pasted = jnp.where(mask[None, :, :, None], partner, x)
  mixed = jnp.where(cutmix, pasted, blended).astype(images.dtype)

  targets = smooth_targets(labels, num_classes, label_smoothing,
                           label_smoothing_spread)
  targets = lam * targets + (1.0 - lam) * targets[::-1]
  return mixed, targets
