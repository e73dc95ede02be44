"""GLNet's speed / memory options (``remat``, ``scan_blocks``) and the fast
depthwise conv change neither the function, nor its gradients, nor the
stored variables."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glmix_jax import convert, models
from glmix_jax.models import kernels, summary
from test_convert import GLNET_FIXTURES, assert_network_matches, load_fixture

# remat alone, and both together (scan alone is covered by the parity test).
OPTIONS = [dict(remat='full'), dict(scan_blocks=True, remat='dots_saveable')]
# 4G: a 'hybrid' stage (scanned in GLMix / attention pairs) and 'mhsa_conv';
# STL: the token-layout 'mhsa' stage.
TINY = dict(dims=(32, 64, 96, 128), depths=(2, 1, 4, 2), num_classes=10,
            drop_path_rate=0.0)


def shapes(tree):
  return jax.tree_util.tree_map(jnp.shape, tree)


@pytest.mark.parametrize('fixture', ['glnet_stl_tiny', 'glnet_4g_tiny'])
def test_converted_weights_reproduce_official_outputs_with_scan_and_remat(
    fixture):
  arrays, overrides, state_dict = load_fixture(fixture)
  name = GLNET_FIXTURES[fixture]
  variables = convert.convert_state_dict(name, state_dict, **overrides)
  model = models.build(name, **overrides, scan_blocks=True, remat='full')
  assert_network_matches(model, variables, arrays, fixture)


@pytest.mark.parametrize('name', ['glnet_stl', 'glnet_4g'])
def test_variables_and_macs_are_those_of_the_default_model(name):
  shape = (1, 64, 64, 3)
  default = models.build(name, **TINY)
  model = models.build(name, **TINY, scan_blocks=True, remat='full')
  init = lambda m: jax.eval_shape(m.init, jax.random.PRNGKey(0),
                                  jnp.zeros(shape))
  variables = init(default)
  assert shapes(init(model)) == shapes(variables)  # same paths and shapes
  assert (summary.count_macs(model, variables, shape)[0]
          == summary.count_macs(default, variables, shape)[0])


def _gradients_and_state(model, variables, images):
  """Train-mode gradients of sum(out^2), batch statistics and slot logits."""
  def loss(params):  # train mode: batch statistics; drop path is off in TINY
    out, state = model.apply({**variables, 'params': params}, images,
                             train=True,
                             mutable=['batch_stats', 'intermediates'])
    return jnp.sum(jnp.square(out)), state
  return jax.jit(jax.grad(loss, has_aux=True))(variables['params'])


@pytest.fixture(name='default_run', scope='module')
def _default_run():
  """The default GLNet-4G's variables, images, gradients and state, computed
  once for every option (each option compiles only its own model)."""
  default = models.build('glnet_4g', **TINY)
  images = jax.random.normal(jax.random.PRNGKey(1), (2, 64, 64, 3))
  variables = jax.jit(default.init)(jax.random.PRNGKey(0), images)
  return variables, images, _gradients_and_state(default, variables, images)


@pytest.mark.parametrize('options', OPTIONS, ids=str)
def test_outputs_gradients_and_slot_logits_equal_the_default_model(
    options, default_run):
  variables, images, (grads, state) = default_run
  model = models.build('glnet_4g', **TINY, **options)
  grads_opt, state_opt = _gradients_and_state(model, variables, images)
  assert shapes(grads_opt) == shapes(grads)
  chex.assert_trees_all_close(grads_opt, grads, atol=1e-5, rtol=1e-4)
  # batch statistics and the per-block slot logits, at the same paths
  chex.assert_trees_all_close(state_opt, state, atol=1e-5, rtol=1e-5)
  logits = state_opt['intermediates']['stages_2']['blocks_2']['slot_logits']
  chex.assert_shape(logits[0], (2, 64, 4 * 4))


def test_scanned_blocks_drop_paths_per_sample():
  model = models.build('glnet_4g', **{**TINY, 'drop_path_rate': 0.5},
                       scan_blocks=True)
  images = jax.random.normal(jax.random.PRNGKey(1), (4, 32, 32, 3))
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), images)

  @jax.jit
  def train_apply(seed):
    return model.apply(variables, images, train=True, mutable=['batch_stats'],
                       rngs={'dropout': jax.random.PRNGKey(seed)})[0]
  out_a, out_b = train_apply(0), train_apply(1)
  chex.assert_tree_all_finite(out_a)
  assert not np.allclose(out_a, out_b)  # different paths dropped


def test_unknown_remat_policy_lists_the_choices():
  with pytest.raises(ValueError, match="Unknown remat.*'none', 'full'"):
    models.build('glnet_stl', remat='everything')


@pytest.mark.parametrize('shape,k,block_elements', [
    ((3, 12, 10, 4), 5, 80),  # 2 rows of 40 per block, 18 blocks
    ((2, 7, 9, 8), 3, 50),    # a row is over the block size: one per block
    ((2, 8, 8, 4), 5, 1024),  # small map: the reductions in one go
])
def test_depthwise_kernel_grad_in_blocks_equals_the_whole_map_sum(
    shape, k, block_elements):
  x = jax.random.normal(jax.random.PRNGKey(0), shape)
  g = jax.random.normal(jax.random.PRNGKey(1), shape)
  # the definition: correlate the padded input with the cotangent per tap
  p = k // 2
  padded = np.pad(np.asarray(x), ((0, 0), (p, p), (p, p), (0, 0)))
  h, w = shape[1:3]
  expected = np.array([[np.sum(padded[:, i:i + h, j:j + w] * np.asarray(g),
                               axis=(0, 1, 2)) for j in range(k)]
                       for i in range(k)])
  blocked = jax.jit(functools.partial(
      kernels.depthwise_kernel_grad, k=k, block_elements=block_elements))
  np.testing.assert_allclose(blocked(x, g), expected, rtol=1e-5, atol=1e-5)
