"""Optimizers, learning-rate schedules and weight-decay masks of the recipes.

Every schedule is a pure function of the optimizer step and reproduces the
official code's shape exactly (warm-up included or not, per step or per
epoch); every mask reproduces which parameters the official code decays.

Conventions (never mixed): ``adamw`` is torch's AdamW, i.e. optax.adamw:
decoupled decay multiplied by the current learning rate, so the papers'
weight decay carries over unchanged; ``sgd`` is torch's SGD, i.e. coupled L2
added to the gradient before momentum.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

Schedule = Callable[[jax.Array], jax.Array]


# ---------------------------------------------------------------------------
# Schedules. ``total`` and ``warmup`` are in optimizer steps.


def warmup_cosine(peak: float, *, total: int, warmup: int,
                  end: float = 0.0, warmup_from: float = 0.0) -> Schedule:
  """Linear warm-up, then a half cosine over the *remaining* steps.

  GLNet (ConvNeXt-V2 ``adjust_learning_rate``, called every step with the
  fractional epoch): lr(t) = peak t / W for t < W, then end + (peak - end)(1 +
  cos(pi (t - W) / (T - W))) / 2. ACmix-ResNet uses the same shape from
  peak / 4 to 0.
  """
  decay_steps = max(total - warmup, 1)

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    ramp = warmup_from + (peak - warmup_from) * step / max(warmup, 1)
    t = jnp.clip(step - warmup, 0, decay_steps) / decay_steps
    cosine = end + 0.5 * (peak - end) * (1 + jnp.cos(jnp.pi * t))
    return jnp.where(step < warmup, ramp, cosine)

  return schedule


def timm_cosine(peak: float, *, total: int, warmup: int, end: float,
                warmup_from: float, steps_per_update: int = 1) -> Schedule:
  """timm ``CosineLRScheduler`` without warm-up prefix (Swin, token labeling).

  The cosine runs over all ``total`` units from unit 0; during the first
  ``warmup`` units a linear ramp from ``warmup_from`` replaces it (so right
  after warm-up the lr is already below ``peak``). A unit is
  ``steps_per_update`` optimizer steps: 1 for Swin's per-step schedule, the
  steps of an epoch for schedules stepped once per epoch.
  """

  def schedule(step):
    unit = jnp.floor(jnp.asarray(step, jnp.float32) / steps_per_update)
    ramp = warmup_from + unit * (peak - warmup_from) / max(warmup, 1)
    cosine = end + 0.5 * (peak - end) * (
        1 + jnp.cos(jnp.pi * jnp.minimum(unit, total) / total))
    return jnp.where(unit < warmup, ramp, cosine)

  return schedule


# ---------------------------------------------------------------------------
# Weight-decay masks: True where a parameter is decayed.


def path_keys(path) -> tuple[str, ...]:
  """A ``tree_map_with_path`` path as its keys, e.g. ``('head', 'kernel')``:
  the flat path that rules on parameter names read."""
  return tuple(str(getattr(k, 'key', k)) for k in path)


def _leaf_name(path) -> str:
  return path_keys(path)[-1]


def _convnextv2(path, x) -> bool:
  # ndim == 1 or a name ending in bias/gamma/beta is not decayed, so 0-D
  # slot_scale and 3-D init_slots ARE decayed (GLNet main_cx2 quirk).
  return x.ndim != 1 and _leaf_name(path) not in ('bias', 'gamma', 'beta')


def _timm(path, x) -> bool:
  # timm param groups: ndim <= 1 or bias is not decayed (slot_scale is not).
  return x.ndim > 1 and _leaf_name(path) != 'bias'


def _swin(path, x) -> bool:
  # Swin: 1-D (norms, ACmix rates), biases, relative position tables are not.
  return _timm(path, x) and _leaf_name(path) != 'relative_position_bias_table'


WEIGHT_DECAY_RULES: dict[str, Callable[[Any, jax.Array], bool]] = {
    'convnextv2': _convnextv2,
    'timm': _timm,
    'swin': _swin,
    'all': lambda path, x: True,  # torch SGD weight_decay: everything
}


def weight_decay_mask(params: Any, rule: str) -> Any:
  """A tree of booleans like ``params``: which parameters ``rule`` decays."""
  if rule not in WEIGHT_DECAY_RULES:
    raise ValueError(f'Unknown weight_decay_rule {rule!r}; choose from '
                     f'{", ".join(WEIGHT_DECAY_RULES)}.')
  return jax.tree_util.tree_map_with_path(WEIGHT_DECAY_RULES[rule], params)


# ---------------------------------------------------------------------------
# Optimizers.


def layer_decay(params: Any, model, decay: float) -> Any:
  """Layer-wise lr decay: per parameter, ``decay ** (L + 1 - layer)`` with
  L = sum(model.depths) and the layer from ``model.layer_index(path)`` (the
  ConvNeXt-V2 / BEiT fine-tuning rule: 1 for the head, decay^L for the
  stem)."""
  if not hasattr(model, 'layer_index'):
    raise ValueError(f'{type(model).__name__} has no layers to decay the '
                     'lr over; set optimizer.layer_decay=1.')
  top = sum(model.depths) + 1
  return jax.tree_util.tree_map_with_path(
      lambda path, _: decay**(top - model.layer_index(path_keys(path))),
      params)


def _scale_updates(scales: Any) -> optax.GradientTransformation:
  """Multiplies each parameter's update by its scale (a tree like params)."""

  def update(updates, state, params=None):
    del params
    return jax.tree_util.tree_map(lambda u, s: u * s, updates, scales), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(),
                                      update)


def make_optimizer(cfg, schedule: Schedule, params: Any,
                   model=None) -> optax.GradientTransformation:
  """The optimizer of ``cfg`` (an ``optimizer`` config block).

  Fields: ``name`` ('adamw' | 'sgd'), ``weight_decay``, ``weight_decay_rule``,
  ``grad_clip_norm`` (0 = none), ``layer_decay`` (1 = none; else ``model``'s
  per-layer scales, ``layer_decay``, multiply each parameter's whole update,
  decay term included, as timm's per-group ``lr_scale`` does); adamw:
  ``b1``, ``b2``, ``eps``; sgd: ``momentum``.
  """
  mask = weight_decay_mask(params, cfg.weight_decay_rule)
  if cfg.name == 'adamw':
    opt = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                      weight_decay=cfg.weight_decay, mask=mask)
  elif cfg.name == 'sgd':
    opt = optax.chain(optax.add_decayed_weights(cfg.weight_decay, mask),
                      optax.sgd(schedule, momentum=cfg.momentum))
  else:
    raise ValueError(f'Unknown optimizer {cfg.name!r}; choose adamw or sgd.')
  if cfg.layer_decay != 1.0:
    opt = optax.chain(opt, _scale_updates(layer_decay(params, model,
                                                      cfg.layer_decay)))
  if cfg.grad_clip_norm:
    opt = optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), opt)
  return opt


def trainable_subset(params: Any, trainable: Callable[[tuple[str, ...]], bool]
                     ) -> Any:
  """The branches of ``params`` whose flat path ``trainable`` accepts."""
  return traverse_util.unflatten_dict(
      {p: v for p, v in traverse_util.flatten_dict(params).items()
       if trainable(p)})


def only_trainable(tx: optax.GradientTransformation,
                   trainable: Callable[[tuple[str, ...]], bool]
                   ) -> optax.GradientTransformation:
  """``tx`` on the parameters that ``trainable(path)`` accepts; the others
  (a frozen backbone) get zero updates and no optimizer state, so a linear
  probe keeps no Adam moments for the backbone. ``tx`` must be built on
  ``trainable_subset(params)``, so that its masks and scales see the same
  tree."""

  def init(params):
    return tx.init(trainable_subset(params, trainable))

  def update(updates, state, params=None):
    subset, state = tx.update(
        trainable_subset(updates, trainable), state,
        None if params is None else trainable_subset(params, trainable))
    new = traverse_util.flatten_dict(subset)
    return traverse_util.unflatten_dict({
        p: new[p] if p in new else jnp.zeros_like(u)
        for p, u in traverse_util.flatten_dict(updates).items()}), state

  return optax.GradientTransformation(init, update)


def steps_for(epochs: float, examples_per_epoch: int, batch: int) -> int:
  """Optimizer steps in ``epochs`` epochs (rounded up to whole steps)."""
  return math.ceil(epochs * examples_per_epoch / batch)


SCHEDULES = ('warmup_cosine', 'timm_cosine', 'timm_cosine_epoch')


def make_schedule(cfg, peak: float, *, total_steps: int, warmup_steps: int,
                  steps_per_epoch: int) -> Schedule:
  """The schedule named by ``cfg.schedule`` (an ``optimizer`` config block)
  with fields ``min_lr`` and ``warmup_lr``; ``peak`` is the scaled lr."""
  kw = dict(end=cfg.min_lr, warmup_from=cfg.warmup_lr)
  if cfg.schedule == 'warmup_cosine':
    return warmup_cosine(peak, total=total_steps, warmup=warmup_steps, **kw)
  if cfg.schedule == 'timm_cosine':
    return timm_cosine(peak, total=total_steps, warmup=warmup_steps, **kw)
  if cfg.schedule == 'timm_cosine_epoch':
    return timm_cosine(peak, total=math.ceil(total_steps / steps_per_epoch),
                       warmup=round(warmup_steps / steps_per_epoch),
                       steps_per_update=steps_per_epoch, **kw)
  raise ValueError(f'Unknown schedule {cfg.schedule!r}; choose from '
                   f'{", ".join(SCHEDULES)}.')
