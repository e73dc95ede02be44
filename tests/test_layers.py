"""Shared layers: DropPath's per-sample decisions and timm's arithmetic;
LayerNorm's and GELU's forward bits and their written backward."""

import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glmix_jax.models import kernels, layers


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


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_layer_norm_is_flax_layer_norm_with_the_same_gradients(dtype):
  x = (3.0 + 2.0 * jax.random.normal(jax.random.PRNGKey(0), (2, 5, 7, 24))
       ).astype(dtype)
  cotangent = jax.random.normal(jax.random.PRNGKey(1), x.shape)
  ours = layers.layer_norm(1e-6, dtype=dtype, param_dtype=jnp.float32,
                           name='n')
  flax_ln = nn.LayerNorm(epsilon=1e-6, dtype=dtype, use_fast_variance=False)
  variables = flax_ln.init(jax.random.PRNGKey(2), x)
  assert (jax.tree_util.tree_map(jnp.shape, ours.init(jax.random.PRNGKey(2), x))
          == jax.tree_util.tree_map(jnp.shape, variables))
  variables = jax.tree_util.tree_map(  # a scale and bias other than 1 and 0
      lambda p: p + jax.random.normal(jax.random.PRNGKey(3), p.shape),
      variables)
  out = ours.apply(variables, x)
  assert out.dtype == dtype
  np.testing.assert_array_equal(out, flax_ln.apply(variables, x))

  def loss(m):
    return lambda v, a: jnp.sum(m.apply(v, a).astype(jnp.float32) * cotangent)
  chex.assert_trees_all_close(jax.grad(loss(ours), (0, 1))(variables, x),
                              jax.grad(loss(flax_ln), (0, 1))(variables, x),
                              rtol=1e-5 if dtype == jnp.float32 else 2e-2,
                              atol=1e-5 if dtype == jnp.float32 else 2e-2)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_gelu_is_exact_gelu_with_its_derivative(dtype):
  # both tails, the kink at 0 and the bulk; an odd size as the MLP maps have
  x = jnp.concatenate([jnp.linspace(-12.0, 12.0, 4001),
                       3.0 * jax.random.normal(jax.random.PRNGKey(0), (999,))]
                      ).astype(dtype)
  out = kernels.gelu(x)
  assert out.dtype == dtype
  # x Phi(x) in float64, Phi written with erfc so the left tail keeps its
  # relative accuracy. 1 + erf in float32 keeps only absolute accuracy there:
  # torch's own GELU is within 3.3e-7 |x| of this (measured on 2 M points)
  xf = np.asarray(x, np.float64)
  exact = xf * 0.5 * np.vectorize(math.erfc)(-xf / np.sqrt(2))
  rounding = 2.0**-23 if dtype == jnp.float32 else 2.0**-8  # half an ulp
  np.testing.assert_array_less(np.abs(np.asarray(out, np.float64) - exact),
                               2.5e-7 * np.abs(xf) + rounding * np.abs(exact)
                               + 1e-30)

  cotangent = jax.random.normal(jax.random.PRNGKey(1), x.shape).astype(dtype)
  ours = jax.vjp(kernels.gelu, x)[1](cotangent)[0]
  assert ours.dtype == dtype
  # Phi'(x) = Phi(x) + x phi(x), in float64 as the reference
  derivative = (0.5 * np.vectorize(math.erfc)(-xf / np.sqrt(2))
                + xf * np.exp(-0.5 * xf * xf) / np.sqrt(2 * np.pi))
  want = derivative * np.asarray(cotangent, np.float64)
  tol = 2e-6 if dtype == jnp.float32 else 1e-2
  np.testing.assert_allclose(np.asarray(ours, np.float64), want,
                             rtol=tol, atol=tol)
  # and the same as autodiff of Flax's exact GELU, to float32 rounding
  flax_grad = jax.vjp(lambda a: nn.gelu(a, approximate=False), x)[1](
      cotangent)[0]
  np.testing.assert_allclose(np.asarray(ours, np.float32),
                             np.asarray(flax_grad, np.float32),
                             rtol=tol, atol=tol)


@pytest.mark.parametrize('k, use_bias', [(4, True), (2, True), (1, False)])
def test_patch_conv_is_a_strided_valid_conv(k, use_bias):
  # 15 x 13: a size that leaves rows and columns beyond the last whole tile
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 15, 13, 6))
  ours = layers.conv2d(8, k, stride=k, in_features=6, use_bias=use_bias,
                       dtype=jnp.float32, param_dtype=jnp.float32, name='c')
  assert isinstance(ours, layers.PatchConv)
  flax_conv = nn.Conv(8, (k, k), strides=(k, k), padding='VALID',
                      use_bias=use_bias, kernel_init=ours.kernel_init,
                      bias_init=ours.bias_init)
  variables = ours.init(jax.random.PRNGKey(1), x)
  # the same parameters, initialised to the same values
  chex.assert_trees_all_equal(variables,
                              flax_conv.init(jax.random.PRNGKey(1), x))
  out = ours.apply(variables, x)
  assert out.shape == (2, 15 // k, 13 // k, 8)
  np.testing.assert_allclose(out, flax_conv.apply(variables, x),
                             rtol=1e-5, atol=1e-5)
