"""Fine-tuning: the first variables of a run that starts from other weights.

``config.init_from`` names a model checkpoint (``python -m
glmix_jax.convert``) or a ``train.py`` workdir (its latest checkpoint;
``config.init_weights`` picks the raw or the EMA weights). Every parameter
and BatchNorm statistic of the new model is taken from it, bitwise, except
the classifier (the model's ``CLASSIFIERS``), which is re-created when its
shape differs (a new ``num_classes``), or always with ``init_head='reinit'``
as GLMix's ``main_cx2.py --finetune`` does: weights ~ N(0, 2e-5^2)
(``trunc_normal_(std=2e-5)``, whose +-2 bounds are 1e5 standard deviations
away, so untruncated in effect), bias 0. Any other difference (a name one
side lacks, a shape) stops the run with the keys named.

Only a run's first start reads ``init_from``: a resumed run restores its own
checkpoint, so the source may be gone by then.

A new image size needs no new weights for GLNet and ACmix-ResNet. ACmix-Swin
fine-tuned with another ``window_size`` (Swin's 384 px runs use 12) gets
each relative-position bias table resized as the Swin pipeline does when it
loads 224 px weights (microsoft/Swin-Transformer ``utils.load_pretrained``):
each head's (2w-1) x (2w-1) table bicubically interpolated (torch
``F.interpolate(mode='bicubic')``) to the new (2w'-1) x (2w'-1); the
relative-position index and shift masks are recomputed, never loaded.

``freeze_backbone`` trains the classifier alone (a linear probe, as in MAE's
``main_linprobe.py``): the backbone runs in evaluation mode (BatchNorm's
running statistics, no dropout or drop path), its parameters and statistics
stay as loaded, bitwise, and no gradient or optimizer state is computed for
them.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from etils import epath
from flax import traverse_util

from glmix_jax import checkpoint

INIT_WEIGHTS = ('raw', 'ema')
INIT_HEADS = ('auto', 'reinit')
HEAD_INIT_STD = 2e-5  # main_cx2.py: trunc_normal_(model.head.weight, std=2e-5)


class TransferError(ValueError):
  """Fine-tuning weights that do not fit the model being trained."""


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError for an ``init_weights`` / ``init_head`` value that is
  not one of the choices."""
  for field, choices in (('init_weights', INIT_WEIGHTS),
                         ('init_head', INIT_HEADS)):
    if config[field] not in choices:
      raise ValueError(f'config.{field}={config[field]!r}; choose one of '
                       f'{", ".join(choices)}.')


def source_variables(path: str, weights: str) -> dict[str, Any]:
  """``{'params': ..., 'batch_stats': ...}`` of a model checkpoint or of a
  ``train.py`` workdir's latest checkpoint (raw or EMA parameters)."""
  directory = epath.Path(path)
  if checkpoint.saved_steps(directory):
    entry = 'params' if weights == 'raw' else 'ema_params'
    _, state = checkpoint.latest_train_state(directory,
                                             fields=(entry, 'batch_stats'))
    params = state.get(entry)
    if params is None:
      raise TransferError(
          f'{path} was trained without EMA (ema_decay 0): it has no EMA '
          'weights; use --config.init_weights=raw.')
    return {'params': params, 'batch_stats': state.get('batch_stats') or {}}
  if weights == 'ema':
    raise TransferError(
        f'{path} is not a train.py workdir with EMA weights; a model '
        'checkpoint holds one set of weights: use --config.init_weights=raw.')
  try:
    _, variables = checkpoint.load_variables(directory)
  except FileNotFoundError as e:
    raise TransferError(
        f'init_from={path} is neither a train.py workdir with a checkpoint '
        'nor a model checkpoint (python -m glmix_jax.convert writes one).'
    ) from e
  return {'params': variables['params'],
          'batch_stats': variables.get('batch_stats', {})}


def trainable(config: ml_collections.ConfigDict, model
              ) -> Callable[[tuple[str, ...]], bool] | None:
  """With ``config.freeze_backbone``, a predicate on a parameter's flat path
  that accepts the classifier's parameters only; None (all train) without."""
  if not config.get('freeze_backbone', False):
    return None
  heads = frozenset(model.CLASSIFIERS)
  return lambda path: path[0] in heads


def _cubic_weights(t: np.ndarray, a: float = -0.75) -> np.ndarray:
  """Keys' cubic convolution weights of the 4 taps at offsets -1, 0, 1, 2
  for fractions ``t``, with torch's a = -0.75."""
  d = np.stack([1 + t, t, 1 - t, 2 - t], -1)
  near = ((a + 2) * d - (a + 3)) * d * d + 1
  far = ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
  return np.where(d <= 1, near, far)


def bicubic_resize(x: np.ndarray, size: int) -> np.ndarray:
  """(S, S, C) -> (size, size, C) as torch's ``F.interpolate(mode='bicubic',
  align_corners=False)``: source pixel (i + 0.5) S / size - 0.5, four taps
  per axis, indices clamped at the borders; computed in float64."""
  src = x.shape[0]
  pos = (np.arange(size) + 0.5) * (src / size) - 0.5
  first = np.floor(pos)
  taps = np.clip(first[:, None] + np.arange(-1, 3), 0, src - 1).astype(int)
  # (size, src): each output row's weights on the source rows.
  matrix = np.zeros((size, src))
  np.add.at(matrix, (np.arange(size)[:, None], taps),
            _cubic_weights(pos - first))
  return np.einsum('ij,jkc,lk->ilc', matrix, x.astype(np.float64), matrix)


def _is_bias_table(path: tuple[str, ...]) -> bool:
  return path[-1] == 'relative_position_bias_table'


def _resized_table(table: np.ndarray, shape) -> np.ndarray:
  """A ((2w-1)^2, heads) bias table resized to ``shape``'s window."""
  side, new_side = (round(math.sqrt(n)) for n in (table.shape[0], shape[0]))
  grid = np.asarray(table).reshape(side, side, -1)
  return bicubic_resize(grid, new_side).reshape(shape)


def _head_init(key: jax.Array, path: tuple[str, ...], shape) -> np.ndarray:
  if path[-1] == 'kernel':
    return np.asarray(HEAD_INIT_STD * jax.random.normal(key, shape))
  return np.zeros(shape, np.float32)


def initial_variables(config: ml_collections.ConfigDict, model,
                      abstract_variables: dict[str, Any]) -> dict[str, Any]:
  """The variables a fine-tuning run starts from: the ``init_from`` weights
  in the shapes and dtypes of ``abstract_variables`` (the new model's), with
  the classifier re-created as the module docstring says."""
  source = traverse_util.flatten_dict(
      source_variables(config.init_from, config.init_weights))
  target = traverse_util.flatten_dict(abstract_variables)
  heads = {name for name in model.CLASSIFIERS
           if name in abstract_variables['params']}
  is_head = lambda path: path[0] == 'params' and path[1] in heads
  reinit = {p for p in target if is_head(p) and (
      config.init_head == 'reinit' or p not in source
      or tuple(source[p].shape) != tuple(target[p].shape))}
  # Swin bias tables of another window (same heads) are resized.
  resized = {p for p in target if _is_bias_table(p) and p in source
             and source[p].shape != target[p].shape
             and source[p].shape[1:] == target[p].shape[1:]}
  unexpected = sorted('/'.join(p) for p in source
                      if p not in target and not is_head(p))
  missing = sorted('/'.join(p) for p in target
                   if p not in source and p not in reinit)
  misshaped = sorted(
      f'{"/".join(p)} {tuple(source[p].shape)} -> {tuple(target[p].shape)}'
      for p in target if p in source and p not in reinit | resized
      and tuple(source[p].shape) != tuple(target[p].shape))
  problems = [f'{len(keys)} {what}: {", ".join(keys[:5])}'
              + (', ...' if len(keys) > 5 else '')
              for what, keys in (('only in init_from', unexpected),
                                 ('not in init_from', missing),
                                 ('of another shape', misshaped)) if keys]
  if problems:
    raise TransferError(
        f'The weights in {config.init_from} do not fit {config.model_name} '
        f'with these model fields (only the classifier, '
        f'{", ".join(sorted(heads))}, may differ): {"; ".join(problems)}.')
  keys = jax.random.split(jax.random.PRNGKey(config.seed), max(len(reinit), 1))
  fresh = {p: _head_init(k, p, target[p].shape)
           for k, p in zip(keys, sorted(reinit))}
  fresh.update({p: _resized_table(source[p], target[p].shape)
                for p in resized})
  # Host (numpy) arrays, the same in every process: the jitted state init
  # places them on the mesh.
  return traverse_util.unflatten_dict({
      p: np.asarray(fresh[p] if p in fresh else source[p], t.dtype)
      for p, t in target.items()})
