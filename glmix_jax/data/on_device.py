"""The last steps of the image transforms, run inside the jitted step.

Batches cross to the device as uint8 (a quarter of float32's bytes, and the
host does no float work); there they become timm's tensors:

* ``normalize``: torch ``ToTensor`` + ``Normalize``, (x / 255 - mean) / std
  in float32, computed as (x * (1 / 255) - mean) * (1 / std): XLA turns a
  division by a broadcast value into that multiplication anyway (and may fuse
  it into a multiply-add), so the values are within 1e-6 of torch's, not
  bitwise (tests/test_augment.py checks all 256 levels); that is far below
  the bf16 or TF32 rounding of the first layer.
* ``erase``: the fill of timm ``RandomErasing(mode='pixel')``, N(0, 1) noise
  per pixel and channel in a box of the normalised image. The box is drawn on
  the host with the rest of the augmentation (``augment.random_erasing_box``);
  only the noise, which needs float pixels, is drawn here, from a key of
  (seed, step), so the stream stays a pure function of (seed, step).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

# Folded into the step's key so that erasing's noise and dropout's masks are
# independent streams.
_ERASE_STREAM = 0x45524153  # 'ERAS'


def normalize(images: jax.Array, mean: Sequence[float],
              std: Sequence[float]) -> jax.Array:
  """uint8 (..., C) images to float32 (x / 255 - mean) / std."""
  inverse_255 = np.float32(1) / np.float32(255)
  inverse_std = np.float32(1) / np.asarray(std, np.float32)
  x = images.astype(jnp.float32) * inverse_255
  return (x - np.asarray(mean, np.float32)) * inverse_std


def erase_key(seed: int, step: jax.Array) -> jax.Array:
  """The key of step ``step``'s erasing noise."""
  return jax.random.fold_in(
      jax.random.fold_in(jax.random.PRNGKey(seed), step), _ERASE_STREAM)


def erase(images: jax.Array, boxes: jax.Array, key: jax.Array) -> jax.Array:
  """Fills each image's box with N(0, 1) noise.

  Args:
    images: normalised float (B, H, W, C).
    boxes: int (B, 4) ``(top, left, height, width)``; height 0 erases nothing.
    key: the randomness of the whole (global) batch; the noise depends on the
      batch's global shape only, not on how it is split over devices, and
      with JAX's partitionable threefry (the default) each device draws its
      own shard of it, with no communication (tests/test_scale.py).

  Returns:
    ``images`` with the boxes replaced.
  """
  _, height, width, _ = images.shape
  top, left, box_h, box_w = (boxes[:, k, None] for k in range(4))
  rows = jnp.arange(height)[None, :]
  cols = jnp.arange(width)[None, :]
  in_rows = (rows >= top) & (rows < top + box_h)  # (B, H)
  in_cols = (cols >= left) & (cols < left + box_w)  # (B, W)
  inside = in_rows[:, :, None, None] & in_cols[:, None, :, None]
  noise = jax.random.normal(key, images.shape, images.dtype)
  return jnp.where(inside, noise, images)
