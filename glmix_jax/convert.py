"""PyTorch state_dict -> Flax variables, and the conversion command.

The Flax modules mirror the official attribute paths, so conversion is a
rename plus a layout change decided by each tensor's kind:

* key: ``stages.2.blocks.5.feature_conv.1.weight`` ->
  ``params/stages_2/blocks_5/feature_conv_1/kernel`` (a list index joins the
  name before it); ``in_proj_weight`` / ``in_proj_bias`` -> ``in_proj/...``.
* ``weight`` -> ``kernel`` (Dense / Conv) or ``scale`` (norms);
  ``running_mean`` / ``running_var`` -> ``batch_stats/.../mean`` / ``var``.
* conv (O, I/g, kh, kw) -> (kh, kw, I/g, O); 1x1 conv as Dense -> (I, O);
  Linear (O, I) -> (I, O); LayerScale (1, C, 1, 1) -> (C,).

Every torch tensor must land on exactly one Flax variable of the same size and
every Flax variable must be filled; otherwise the error names the key. Dropped:
``num_batches_tracked`` and the buffers the model recomputes (Swin's
``relative_position_index`` and ``attn_mask``); an ACmix ``dep_conv.bias``,
which the official model does not have (its ``reset_parameters`` assigns
``None`` to it), is dropped only if it is all zeros.

Command::

  python -m glmix_jax.convert --model=glnet_stl --checkpoint=glnet_stl.pth \
      --workdir=/tmp/glnet_stl
"""

from __future__ import annotations

import json
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from glmix_jax import models
from glmix_jax import weight_files

Variables = dict[str, Any]

# Counters and buffers derived from the architecture, recomputed by the model.
_DROPPED = ('num_batches_tracked', 'relative_position_index', 'attn_mask')
# Tensors some third-party copies add although the model has none: accepted
# only when they cannot change the function, i.e. all zeros.
_ZERO_ONLY = ('dep_conv.bias',)
_BATCH_STATS = {'running_mean': 'mean', 'running_var': 'var'}

# The state-dict entry each released checkpoint keeps its weights under.
_CHECKPOINT_ENTRY = {'glnet_16g': 'model_ema'}  # EMA weights were released


class ConversionError(ValueError):
  """A state dict that does not match the model."""


def default_entry(model_name: str) -> str:
  """The entry of an official checkpoint that holds the released weights."""
  return _CHECKPOINT_ENTRY.get(model_name, 'model')


def variable_shapes(model_name: str,
                    **overrides) -> dict[tuple[str, ...], tuple]:
  """Flat ``{(collection, *path): shape}`` of the model's variables."""
  model = models.build(model_name, **overrides)
  size = 224 if not hasattr(model, 'min_image_size') else max(
      64, model.min_image_size())
  channels = getattr(model, 'in_channels', 3)
  abstract = jax.eval_shape(lambda: model.init(
      jax.random.PRNGKey(0), jnp.zeros((1, size, size, channels))))
  return {k: v.shape for k, v in traverse_util.flatten_dict(abstract).items()}


def flax_path(torch_key: str,
              targets: Mapping[tuple[str, ...], tuple]) -> tuple[str, ...]:
  """The Flax variable path ``(collection, *modules, leaf)`` of a torch key."""
  parts = torch_key.replace('in_proj_weight', 'in_proj.weight').replace(
      'in_proj_bias', 'in_proj.bias').split('.')
  *module_parts, leaf = parts
  modules: list[str] = []
  for part in module_parts:
    if part.isdigit() and modules:
      modules[-1] = f'{modules[-1]}_{part}'
    else:
      modules.append(part)
  if leaf in _BATCH_STATS:
    return ('batch_stats', *modules, _BATCH_STATS[leaf])
  if leaf == 'weight':
    kernel = ('params', *modules, 'kernel')
    return kernel if kernel in targets else ('params', *modules, 'scale')
  return ('params', *modules, leaf)


def to_flax_layout(value: np.ndarray, path: tuple[str, ...],
                   shape: tuple) -> np.ndarray:
  """A torch tensor rearranged into the layout of Flax variable ``path``."""
  value = np.asarray(value)
  if path[-1] == 'kernel':
    value = value.transpose(2, 3, 1, 0) if value.ndim == 4 else value.T
    if len(shape) == 2 and value.ndim == 4 and value.shape[:2] == (1, 1):
      value = value[0, 0]  # a 1x1 conv held as a Dense
  elif _squeezed(value.shape) == _squeezed(shape):
    value = value.reshape(shape)  # singleton axes only, e.g. LayerScale
  return value


def _squeezed(shape: tuple) -> tuple:
  return tuple(d for d in shape if d != 1)


def convert_state_dict(model_name: str, state_dict: Mapping[str, np.ndarray],
                       **overrides) -> Variables:
  """Flax variables ``{'params': ..., 'batch_stats': ...}`` of a torch model.

  Args:
    model_name: a registered model name (``glmix_jax.models.list_models()``).
    state_dict: torch key -> numpy array (``tensor.numpy()``), buffers included.
    **overrides: model fields, as for ``glmix_jax.models.build``.

  Raises:
    ConversionError: naming every unexpected, missing or mis-shaped key.
  """
  targets = variable_shapes(model_name, **overrides)
  flat: dict[tuple[str, ...], np.ndarray] = {}
  unexpected, misshaped, nonzero = [], [], []
  for key, value in state_dict.items():
    if key.rsplit('.', 1)[-1] in _DROPPED:
      continue
    if key.endswith(_ZERO_ONLY):
      if np.any(np.asarray(value)):
        nonzero.append(key)
      continue
    path = flax_path(key, targets)
    if path not in targets or path in flat:
      unexpected.append(f'{key} (-> {"/".join(path)})')
      continue
    converted = to_flax_layout(value, path, targets[path])
    if converted.shape != tuple(targets[path]):
      misshaped.append(f'{key} {tuple(np.shape(value))} (-> {"/".join(path)} '
                       f'{tuple(targets[path])})')
      continue
    flat[path] = converted.astype(np.float32)
  missing = ['/'.join(p) for p in targets if p not in flat]
  reports = [f'{len(keys)} {what}: {", ".join(keys[:5])}'
             + (', ...' if len(keys) > 5 else '')
             for what, keys in (('unexpected keys', unexpected),
                                ('mis-shaped keys', misshaped),
                                ('Flax variables without a key', missing),
                                ('non-zero tensors the model does not have '
                                 '(the official one has none either)',
                                 nonzero))
             if keys]
  if reports:
    raise ConversionError(
        f'state dict does not match {model_name} (check the model name and '
        f'its overrides): {"; ".join(reports)}')
  return traverse_util.unflatten_dict(
      {k: jnp.asarray(v) for k, v in flat.items()})


def main(argv):
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  from glmix_jax import checkpoint  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  overrides = json.loads(f.overrides)
  state_dict = weight_files.read_state_dict(
      f.checkpoint, f.entry, default_entry=default_entry(f.model))
  variables = convert_state_dict(f.model, state_dict, **overrides)
  checkpoint.save_variables(f.workdir, variables, model=f.model,
                            overrides=overrides)
  count = sum(int(np.prod(v.shape)) for v in
              jax.tree_util.tree_leaves(variables['params']))
  print(f'Converted {f.checkpoint} ({len(state_dict)} tensors) to {f.model} '
        f'({count:,} parameters): {f.workdir}')


def _define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string('model', None, 'Registered model name.', required=True)
  flags.DEFINE_string('checkpoint', None, '.pth (.pt, .pth.tar), .npz or '
                      '.safetensors file.', required=True)
  flags.DEFINE_string('workdir', None, 'New directory for the Orbax '
                      'checkpoint (must not hold one already).', required=True)
  flags.DEFINE_string('entry', None, 'Checkpoint entry holding the state dict '
                      '(default: the first that holds one of model_ema for '
                      'glnet_16g, then model, state_dict, model_ema, '
                      'state_dict_ema; ignored for a bare state dict).')
  flags.DEFINE_string('overrides', '{}', 'JSON dict of model field overrides, '
                      'e.g. \'{"num_classes": 10}\'.')


if __name__ == '__main__':
  from glmix_jax import cli  # pylint: disable=g-import-not-at-top
  _define_flags()
  cli.run(main, errors=(weight_files.WeightFileError, ConversionError,
                        FileExistsError, ValueError))
