"""Shared layers: DropPath's per-sample decisions and timm's arithmetic."""

import jax
import jax.numpy as jnp
import numpy as np

from glmix_jax.models import layers


def test_drop_path_drops_whole_samples_and_scales_survivors_as_timm():
  x = jax.random.normal(jax.random.PRNGKey(0), (256, 3, 3, 2))
  drop = layers.DropPath(0.25)
  out = np.asarray(drop.apply({}, x, deterministic=False,
                              rngs={'dropout': jax.random.PRNGKey(1)}))
  kept = np.any(out != 0, axis=(1, 2, 3))
  # timm: x * (mask / keep_prob), the scale computed first
  scale = np.float32(1.0) / np.float32(0.75)
  np.testing.assert_array_equal(out[kept], np.asarray(x)[kept] * scale)
  np.testing.assert_array_equal(out[~kept], 0.0)
  assert 0.6 < kept.mean() < 0.9  # 256 draws of keep = 0.75
  np.testing.assert_array_equal(drop.apply({}, x, deterministic=True), x)
  assert layers.DropPath(0.0).apply({}, x, deterministic=False) is x
