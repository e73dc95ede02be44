"""Mixup / CutMix with label smoothing: drawn on the host, applied on device.

Reproduces timm ``Mixup(mode='batch', correct_lam=True)`` as the DeiT /
ConvNeXt / GLNet recipes use it (mixup 0.8, cutmix 1.0, prob 1.0, switch 0.5,
label smoothing 0.1), where timm runs it on each GPU's batch: here the global
batch is cut into fixed groups of ``group_size`` consecutive examples (timm's
per-GPU batch; the recipes' 128) and each group is one timm batch: image i of
a group is paired with image ``group_size - 1 - i`` of the same group; one
coin decides whether the group is mixed at all, one whether it is CutMix or
Mixup, one lambda ~ Beta(alpha, alpha) and one box serve the whole group; the
targets are timm's smoothed one-hots (off value eps/K, on value
1 - eps + eps/K) blended with the same lambda, where for CutMix lambda is
recomputed from the box actually pasted after clipping at the borders.

Why groups: with the batch split over devices, pairing across the whole batch
(as one timm batch) moves every image shard to another device each step. A
group size that divides the per-device batch keeps each pair on one device,
and, being a config field rather than the device count, keeps the training
function the same on 1 or 64 hosts.

Why drawn on the host: the coins, lambdas and boxes are a few numbers per
group, a pure function of (seed, step) (``draw``), so a step needs no
random-number loops on device (``jax.random.beta`` is a rejection loop, a
device-to-host round trip per iteration on a GPU). The mixing itself is one
element-wise blend or select over a batch already on the accelerator
(``mix_batch``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np


LABEL_SMOOTHING_SPREADS = ('eps_over_k', 'eps_over_k_minus_1')
# The batch fields ``draw`` adds, one row per group.
PARAM_FIELDS = ('mix_lam', 'mix_box', 'mix_cutmix')
# Tells the host's mixing draws apart from the pipeline's other (seed, step)
# streams.
_STREAM = 0x6D6978


@dataclasses.dataclass(frozen=True)
class MixSettings:
  """What timm's ``Mixup(...)`` is constructed with, plus the group size.

  Attributes:
    mixup_alpha: Beta(alpha, alpha) for Mixup; <= 0 disables Mixup.
    cutmix_alpha: Beta(alpha, alpha) for CutMix; <= 0 disables CutMix.
    prob: chance that a group is mixed at all.
    switch_prob: chance of CutMix rather than Mixup when both are enabled.
    label_smoothing: eps of ``smooth_targets``.
    spread: ``smooth_targets``' spread of eps.
    group_size: examples per mixing group (timm's per-GPU batch); even, and
      dividing the per-device batch.
  """
  mixup_alpha: float
  cutmix_alpha: float
  prob: float
  switch_prob: float
  label_smoothing: float
  spread: str = 'eps_over_k'
  group_size: int = 128

  @classmethod
  def from_config(cls, augmentation: ml_collections.ConfigDict
                  ) -> 'MixSettings':
    """From a config's ``augmentation`` block."""
    return cls(mixup_alpha=augmentation.mixup_alpha,
               cutmix_alpha=augmentation.cutmix_alpha,
               prob=augmentation.mix_prob,
               switch_prob=augmentation.mix_switch_prob,
               label_smoothing=augmentation.label_smoothing,
               spread=augmentation.label_smoothing_spread,
               group_size=augmentation.mix_group_size)

  @property
  def enabled(self) -> bool:
    return self.mixup_alpha > 0 or self.cutmix_alpha > 0

  def check(self, per_device_batch: int) -> None:
    """Raises unless the groups tile every device's batch."""
    size = self.group_size
    if size < 2 or size % 2 or per_device_batch % size:
      raise ValueError(
          f'augmentation.mix_group_size={size} must be even and divide the '
          f'per-device batch of {per_device_batch}: set '
          '--config.augmentation.mix_group_size to an even divisor of it '
          '(timm mixes each GPU\'s batch; the recipes use 128).')


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


def rand_bbox(height: int, width: int, lam: np.ndarray, cy: np.ndarray,
              cx: np.ndarray) -> np.ndarray:
  """timm ``rand_bbox``: boxes (..., 4) as (y0, y1, x0, x1), int32.

  Sides int(side * sqrt(1 - lam)) centred at (cy, cx), then clipped to the
  image: half-sides are floored, so an odd side loses a pixel, as in timm.
  """
  ratio = np.sqrt(1.0 - lam)
  half_h = (height * ratio).astype(np.int64) // 2
  half_w = (width * ratio).astype(np.int64) // 2
  return np.stack([np.clip(cy - half_h, 0, height),
                   np.clip(cy + half_h, 0, height),
                   np.clip(cx - half_w, 0, width),
                   np.clip(cx + half_w, 0, width)], axis=-1).astype(np.int32)


def draw(settings: MixSettings, *, seed: int, step: int, batch: int,
         height: int, width: int) -> dict[str, np.ndarray]:
  """The mixing of step ``step``'s global batch, one row per group.

  Returns ``mix_lam`` (float32: the weight of each image itself, 1 where
  the group is not mixed), ``mix_box`` (int32 (y0, y1, x0, x1), the pasted
  box where the group uses CutMix) and ``mix_cutmix`` (bool). Every group
  draws the same numbers in the same order whatever it uses, so the draws of
  a step depend on (seed, step) and the batch size only.
  """
  groups, rest = divmod(batch, settings.group_size)
  if rest:
    raise ValueError(f'A batch of {batch} does not split into mixing groups '
                     f'of {settings.group_size}.')
  rng = np.random.default_rng([seed, step, _STREAM])
  apply = rng.random(groups) < settings.prob
  switch = rng.random(groups) < settings.switch_prob
  lam_mixup, lam_cutmix = (
      rng.beta(alpha, alpha, groups) if alpha > 0 else np.ones(groups)
      for alpha in (settings.mixup_alpha, settings.cutmix_alpha))
  cy, cx = rng.integers(0, height, groups), rng.integers(0, width, groups)
  if settings.mixup_alpha > 0 and settings.cutmix_alpha > 0:
    use_cutmix = switch
  else:
    use_cutmix = np.full(groups, settings.cutmix_alpha > 0)
  cutmix = apply & use_cutmix
  box = rand_bbox(height, width, lam_cutmix, cy, cx)
  box[~cutmix] = 0
  area = (box[:, 1] - box[:, 0]) * (box[:, 3] - box[:, 2])
  lam = np.where(cutmix, 1.0 - area / (height * width),
                 np.where(apply, lam_mixup, 1.0))
  return dict(mix_lam=lam.astype(np.float32), mix_box=box,
              mix_cutmix=cutmix)


def process_slice(params: dict[str, np.ndarray], process_index: int,
                  process_count: int) -> dict[str, np.ndarray]:
  """The groups of this process's part of the global batch (its consecutive
  share, as the pipeline splits the batch)."""
  share = len(params['mix_lam']) // process_count
  return {k: v[process_index * share:(process_index + 1) * share]
          for k, v in params.items()}


def mix_batch(images: jax.Array, labels: jax.Array,
              params: dict[str, jax.Array], settings: MixSettings,
              num_classes: int) -> tuple[jax.Array, jax.Array]:
  """Mixes each group of ``images`` with itself reversed, by ``params``.

  Args:
    images: (B, H, W, C), any float dtype, mixed in float32 and returned in
      the input dtype.
    labels: (B,) integer class ids.
    params: ``draw``'s fields for these B / group_size groups.
    settings: the mixing; ``settings.enabled``.
    num_classes: K.

  Returns:
    (mixed images, float32 (B, K) targets with rows summing to 1).
  """
  batch, height, width = images.shape[:3]
  groups = batch // settings.group_size
  grouped = lambda t: t.reshape(groups, settings.group_size, *t.shape[1:])
  x = grouped(images.astype(jnp.float32))
  partner = x[:, ::-1]  # within each group: no example leaves its device
  lam = params['mix_lam'][:, None, None, None, None]
  y0, y1, x0, x1 = (params['mix_box'][:, i] for i in range(4))
  rows, cols = jnp.arange(height), jnp.arange(width)
  in_rows = (rows >= y0[:, None]) & (rows < y1[:, None])  # (groups, H)
  in_cols = (cols >= x0[:, None]) & (cols < x1[:, None])  # (groups, W)
  box = (in_rows[:, :, None] & in_cols[:, None, :])[:, None, :, :, None]
  cutmix = params['mix_cutmix'][:, None, None, None, None]
  mixed = jnp.where(cutmix, jnp.where(box, partner, x),
                    lam * x + (1.0 - lam) * partner)

  targets = grouped(smooth_targets(labels, num_classes,
                                   settings.label_smoothing, settings.spread))
  lam = params['mix_lam'][:, None, None]
  targets = lam * targets + (1.0 - lam) * targets[:, ::-1]
  return (mixed.reshape(images.shape).astype(images.dtype),
          targets.reshape(batch, num_classes))
