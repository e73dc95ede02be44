"""From a checkpoint and an image file to what the model sees and computes.

The visualisation command and the notebooks share these steps:

* ``load_model``: the config's model with the weights of a model checkpoint
  (``python -m glmix_jax.convert``, ``checkpoint.save_variables``) or of the
  latest step of a ``train.py`` workdir (its EMA weights when the run kept
  them, unless ``weights='raw'``); weights that do not fit the config's model
  are a ValueError naming the differences.
* ``load_image``: any image file Pillow reads (JPEG, PNG, ...; grayscale, RGBA
  and palette images are converted to RGB) through the config's evaluation
  transform, plus the crop the model sees, as displayable pixels.
* ``predict``: class probabilities and, for every GLMix block, its slot
  weights: clustering (softmax over pixels) and dispatch (softmax over slots),
  from the slot logits the blocks ``sow`` only when asked to.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from PIL import Image

from glmix_jax import checkpoint, models
from glmix_jax.data import augment, on_device
from glmix_jax.data import input as data_input


@dataclasses.dataclass(frozen=True)
class LoadedModel:
  """A model, its variables and where they came from (for titles, logs)."""
  model: nn.Module
  variables: dict[str, Any]
  source: str


def load_model(config: ml_collections.ConfigDict, directory: str | epath.Path,
               *, weights: str = 'ema') -> LoadedModel:
  """``config``'s model with the weights in ``directory``.

  Args:
    config: a training config (``configs/*.py``); it defines the model.
    directory: a model checkpoint (``model.json`` + ``variables/``) or a
      ``train.py`` workdir (``checkpoints/<step>/``; the latest step is used).
    weights: for a workdir, ``'ema'`` (the EMA weights if the run kept them,
      else the raw ones) or ``'raw'``.

  Raises:
    FileNotFoundError: ``directory`` is neither kind of checkpoint.
    ValueError: the weights do not fit the config's model, or a bad
      ``weights``.
  """
  if weights not in ('ema', 'raw'):
    raise ValueError(f"weights must be 'ema' or 'raw', got {weights!r}.")
  directory = epath.Path(directory)
  if (directory / 'model.json').exists():
    _, variables = checkpoint.load_variables(directory)
    source = str(directory)
  elif (directory / 'checkpoints').is_dir():
    step, state = checkpoint.latest_train_state(directory)
    use_ema = weights == 'ema' and state.get('ema_params') is not None
    variables = {'params': state['ema_params' if use_ema else 'params'],
                 'batch_stats': state['batch_stats']}
    source = f'{directory} step {step}, {"EMA" if use_ema else "raw"} weights'
  else:
    raise FileNotFoundError(
        f'{directory} is not a checkpoint: expected a model checkpoint '
        '(model.json and variables/, from python -m glmix_jax.convert) or a '
        'train.py workdir (checkpoints/<step>/).')
  model = models.from_config(config)
  _check_fits(model, variables['params'], config)
  return LoadedModel(model, variables, source)


def _check_fits(model: nn.Module, params: Any,
                config: ml_collections.ConfigDict) -> None:
  """Raises a ValueError naming what differs between the parameters the
  config's model has and those of the checkpoint."""
  size = config.data.image_size
  expected = jax.eval_shape(lambda: model.init(
      jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3))))['params']
  shapes = lambda tree: {k: tuple(np.shape(v)) for k, v in
                         flax.traverse_util.flatten_dict(tree, sep='/').items()}
  want, have = shapes(expected), shapes(params)
  if want == have:
    return
  missing = sorted(want.keys() - have.keys())
  unexpected = sorted(have.keys() - want.keys())
  resized = sorted(f'{k} {have[k]} (config: {want[k]})'
                   for k in want.keys() & have.keys() if want[k] != have[k])
  problems = [f'{len(items)} {what}: {", ".join(items[:3])}'
              + (' ...' if len(items) > 3 else '')
              for what, items in (('missing', missing),
                                  ('unexpected', unexpected),
                                  ('of another shape', resized)) if items]
  raise ValueError(
      f'The checkpoint does not fit the model of the config '
      f'({config.model_name}, {config.data.num_classes} classes): parameters '
      + '; '.join(problems) + '. Pass the config the checkpoint was made with.')


def load_image(path: str | epath.Path, config: ml_collections.ConfigDict
               ) -> tuple[np.ndarray, np.ndarray]:
  """An image file through ``config``'s evaluation transform.

  Returns:
    The model input, float32 (S, S, 3) normalised, and the same crop as
    uint8 RGB pixels for display.

  Raises:
    FileNotFoundError: no such file.
    ValueError: the file is not an image Pillow can decode.
  """
  path = epath.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f'No image file {path}.')
  try:
    pixels = augment.eval_transform(path.read_bytes(),
                                    data_input.transform_config(config))
  except Image.UnidentifiedImageError as e:
    raise ValueError(f'{path} is not an image file (JPEG, PNG, ... '
                     'expected).') from e
  except (OSError, Image.DecompressionBombError) as e:  # e.g. truncated
    raise ValueError(f'{path} could not be decoded as an image: {e}') from e
  image = on_device.normalize(pixels, config.data.mean, config.data.std)
  return np.asarray(image), pixels


@dataclasses.dataclass(frozen=True)
class SlotWeights:
  """One GLMix block's slot weights, each (B, S, h, w) on its pixel grid."""
  clustering: np.ndarray  # softmax over pixels: each slot's map sums to 1
  dispatch: np.ndarray  # softmax over slots: sums to 1 at each pixel


@dataclasses.dataclass(frozen=True)
class Prediction:
  probabilities: np.ndarray  # (B, classes)
  # By block name in the official state_dict style ('stages.2.blocks.0'), in
  # network order; empty for a network without GLMix blocks.
  slots: dict[str, SlotWeights]


@functools.partial(jax.jit, static_argnums=0)
def _apply_with_intermediates(model: nn.Module, variables, images):
  # Jitted once per (model, input shape): a model is a hashable dataclass, so
  # repeated predictions reuse the compiled function.
  return model.apply(variables, images, mutable=['intermediates'],
                     return_features=True)


def predict(loaded: LoadedModel, images: np.ndarray) -> Prediction:
  """Class probabilities and slot weights of a batch (B, S, S, 3)."""
  (logits, features), state = _apply_with_intermediates(
      loaded.model, loaded.variables, np.asarray(images))
  sown = flax.traverse_util.flatten_dict(
      state.get('intermediates', {}), sep='/')
  slots = {}
  for path, (slot_logits,) in sown.items():
    if not path.endswith('/slot_logits'):
      continue
    stage, block = path.split('/')[:2]  # 'stages_2', 'blocks_0'
    _, h, w, _ = features[f'stage{int(stage.split("_")[1]) + 1}'].shape
    b, s, _ = slot_logits.shape
    grid = lambda weights: np.asarray(weights).reshape(b, s, h, w)  # n = y w + x
    slots[f'{stage}.{block}'.replace('_', '.')] = SlotWeights(
        clustering=grid(jax.nn.softmax(slot_logits, axis=-1)),
        dispatch=grid(jax.nn.softmax(slot_logits, axis=-2)))
  order = lambda name: tuple(int(t) for t in name.split('.')[1::2])
  return Prediction(
      probabilities=np.asarray(jax.nn.softmax(logits.astype(jnp.float32))),
      slots={k: slots[k] for k in sorted(slots, key=order)})
