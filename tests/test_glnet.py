"""GLNet: registry, parameter counts, shapes at any valid size, numerics."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glmix_jax import models
from glmix_jax.models import glnet

# Official parameter counts (torch, rayleizhu/GLMix 3c93dbf, models/glnet.py).
OFFICIAL_PARAMS = {
    'glnet_stl': 30_296_786,
    'glnet_stl_paramslot': 30_481_106,
    'glnet_4g': 27_001_593,
    'glnet_9g': 60_010_617,
    'glnet_16g': 106_055_161,
    'glnet_4g_tklb': 27_514_593,
    'glnet_9g_tklb': 60_779_617,
}
TINY = dict(dims=(32, 64, 96, 128), depths=(1, 1, 2, 1), num_classes=10)


def abstract_variables(model, shape=(1, 224, 224, 3)):
  return jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(shape)))


def count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


def init(model, shape, seed=0):
  return jax.jit(model.init)(jax.random.PRNGKey(seed), jnp.zeros(shape))


def test_registry_lists_every_glnet_variant():
  assert set(OFFICIAL_PARAMS) == set(models.list_models('glnet*'))


@pytest.mark.parametrize('name', sorted(OFFICIAL_PARAMS))
def test_parameter_count_equals_official(name):
  variables = abstract_variables(models.build(name))
  assert count(variables['params']) == OFFICIAL_PARAMS[name]


@pytest.mark.parametrize('name', sorted(OFFICIAL_PARAMS))
def test_full_size_shapes_at_224(name):
  model = models.build(name)
  variables = abstract_variables(model)
  logits, features = jax.eval_shape(
      lambda v: model.apply(v, jnp.zeros((2, 224, 224, 3)),
                            return_features=True), variables)
  chex.assert_shape(logits, (2, 1000))
  dims = model.dims
  chex.assert_shape(features['stem'], (2, 56, 56, dims[0]))
  for i, side in enumerate((56, 28, 14, 7)):
    chex.assert_shape(features[f'stage{i + 1}'], (2, side, side, dims[i]))


# (variant, input H x W, expected stage-1..4 sides): non-square inputs, maps
# not divisible by 8 (overlapping pool bins) and maps smaller than 8.
SIZES = [
    ('glnet_stl', (96, 80), [(24, 20), (12, 10), (6, 5), (3, 2)]),
    ('glnet_stl', (32, 45), [(8, 11), (4, 5), (2, 2), (1, 1)]),
    ('glnet_4g', (40, 70), [(10, 18), (5, 9), (3, 5), (2, 3)]),
    ('glnet_4g', (1, 3), [(1, 1), (1, 1), (1, 1), (1, 1)]),
    ('glnet_4g_tklb', (50, 50), [(13, 13), (7, 7), (4, 4), (2, 2)]),
]


@pytest.mark.parametrize('name,size,sides', SIZES)
def test_runs_at_any_valid_size(name, size, sides):
  model = models.build(name, **TINY)
  shape = (2, *size, 3)
  variables = init(model, shape)
  images = jax.random.normal(jax.random.PRNGKey(1), shape)
  logits, features = jax.jit(
      lambda v, x: model.apply(v, x, return_features=True))(variables, images)
  chex.assert_shape(logits, (2, 10))
  chex.assert_tree_all_finite(logits)
  for i, (h, w) in enumerate(sides):
    chex.assert_shape(features[f'stage{i + 1}'], (2, h, w, TINY['dims'][i]))


@pytest.mark.parametrize('name,smallest', [('glnet_stl', 32), ('glnet_9g', 1)])
def test_too_small_image_names_smallest_size(name, smallest):
  model = models.build(name, **TINY)
  bad = (1, 31, 64, 3) if smallest == 32 else (1, 0, 64, 3)
  with pytest.raises(ValueError, match=f'smallest valid size is {smallest}x'):
    abstract_variables(model, bad)


def test_wrong_channel_count_is_a_clear_error():
  with pytest.raises(ValueError, match=r'NHWC images \(B, H, W, 3\)'):
    abstract_variables(models.build('glnet_stl', **TINY), (1, 3, 64, 64))


def test_unknown_model_and_field_errors_list_valid_choices():
  with pytest.raises(ValueError, match='valid names: .*glnet_stl'):
    models.build('glnet_tiny')
  with pytest.raises(ValueError, match="Unknown field.*'width'.*drop_path_rate"):
    models.build('glnet_stl', width=3)
  with pytest.raises(ValueError, match='Unknown mixer'):
    models.build('glnet_stl', mixers=('glmix', 'glmix', 'swin', 'mhsa'))


def test_adaptive_pool_bins_match_pytorch():
  # torch adaptive_avg_pool2d: bin i covers [floor(i n / 8), ceil((i+1) n / 8)).
  def bins(n):
    m = glnet.adaptive_pool_matrix(n, 8)
    return [(int(r.nonzero()[0][0]), int(r.nonzero()[0][-1]) + 1) for r in m]
  assert bins(56) == [(7 * i, 7 * i + 7) for i in range(8)]
  assert bins(28) == [(0, 4), (3, 7), (7, 11), (10, 14), (14, 18), (17, 21),
                      (21, 25), (24, 28)]
  assert bins(14) == [(0, 2), (1, 4), (3, 6), (5, 7), (7, 9), (8, 11),
                      (10, 13), (12, 14)]
  assert bins(3) == [(0, 1), (0, 1), (0, 2), (1, 2), (1, 2), (1, 3), (2, 3),
                     (2, 3)]
  np.testing.assert_allclose(glnet.adaptive_pool_matrix(14, 8).sum(1), 1.0,
                             rtol=1e-6)


@pytest.mark.parametrize('size', [(16, 24), (14, 14), (3, 8)])
def test_adaptive_avg_pool_is_the_bin_mean(size):
  # Divisible sides take the window-mean path, others the bin matrices.
  x = np.random.default_rng(0).normal(size=(2, *size, 5)).astype(np.float32)
  rows, cols = (glnet.adaptive_pool_matrix(n, 8) for n in size)
  expected = np.einsum('ih,jw,bhwc->bijc', rows.astype(np.float64),
                       cols.astype(np.float64), x)
  np.testing.assert_allclose(glnet.adaptive_avg_pool(jnp.asarray(x), 8),
                             expected, atol=1e-6)


def test_cluster_and_dispatch_are_convex_combinations():
  key = jax.random.PRNGKey(0)
  logits = 5 * jax.random.normal(key, (2, 64, 30))
  features = jax.random.normal(jax.random.PRNGKey(1), (2, 30, 8))
  slots = glnet.soft_cluster(logits, features)
  # every slot lies within the per-channel range of the pixels it mixes
  assert jnp.all(slots <= features.max(1, keepdims=True) + 1e-6)
  assert jnp.all(slots >= features.min(1, keepdims=True) - 1e-6)
  constant = jnp.ones((2, 64, 8)) * 3.0
  np.testing.assert_allclose(glnet.dispatch(logits, constant), 3.0, rtol=1e-6)


def test_jit_equals_no_jit():
  model = models.build('glnet_4g', **TINY)
  variables = init(model, (1, 40, 32, 3))
  images = jax.random.normal(jax.random.PRNGKey(1), (1, 40, 32, 3))
  jitted = jax.jit(model.apply)(variables, images)
  with jax.disable_jit():
    eager = model.apply(variables, images)
  np.testing.assert_allclose(jitted, eager, atol=1e-5, rtol=1e-5)


def test_train_mode_updates_batch_stats_and_drops_paths():
  model = models.build('glnet_4g', **TINY, drop_path_rate=0.5)
  variables = init(model, (4, 32, 32, 3))
  images = jax.random.normal(jax.random.PRNGKey(1), (4, 32, 32, 3))

  @jax.jit
  def train_apply(v, seed):
    return model.apply(v, images, train=True, mutable=['batch_stats'],
                       rngs={'dropout': jax.random.PRNGKey(seed)})
  out_a, state = train_apply(variables, 0)
  out_b, _ = train_apply(variables, 1)
  chex.assert_shape(out_a, (4, 10))
  changed = jax.tree_util.tree_map(lambda a, b: bool(jnp.any(a != b)),
                                   state['batch_stats'],
                                   variables['batch_stats'])
  assert all(jax.tree_util.tree_leaves(changed))
  assert not np.allclose(out_a, out_b)  # different paths dropped
  # In eval no path is dropped: the output is that of the same weights
  # without drop path.
  no_drop = models.build('glnet_4g', **TINY, drop_path_rate=0.0)
  np.testing.assert_array_equal(jax.jit(model.apply)(variables, images),
                                jax.jit(no_drop.apply)(variables, images))


def test_token_labeling_model_refuses_training_mode():
  """The _tklb models evaluate (their parity is tests/test_convert.py's); a
  training-mode call, which would need MixToken and dense teacher labels,
  stops with the reason instead of returning a plain model's output."""
  model = models.build('glnet_4g_tklb', **TINY)
  variables = init(model, (2, 64, 64, 3))
  images = jax.random.normal(jax.random.PRNGKey(1), (2, 64, 64, 3))
  chex.assert_shape(jax.jit(model.apply)(variables, images), (2, 10))
  with pytest.raises(ValueError, match='token-labeling GLNet.*main_tklb.py'):
    jax.jit(functools.partial(model.apply, train=True,
                              mutable=['batch_stats']))(
                                  variables, images,
                                  rngs={'dropout': jax.random.PRNGKey(0)})


def test_slot_logits_are_sown_for_visualisation():
  model = models.build('glnet_stl', **TINY)
  variables = init(model, (1, 64, 64, 3))
  _, state = model.apply(variables, jnp.ones((1, 64, 64, 3)),
                         mutable=['intermediates'])
  logits = state['intermediates']['stages_0']['blocks_0']['slot_logits'][0]
  chex.assert_shape(logits, (1, 64, 16 * 16))  # (B, slots, pixels)


def test_initialisation_follows_official_code():
  model = models.build('glnet_16g', **TINY)
  params = init(model, (1, 64, 64, 3), seed=3)['params']
  block = params['stages_0']['blocks_0']
  c = TINY['dims'][0]
  np.testing.assert_allclose(block['slot_scale'], c**-0.5, rtol=1e-6)
  np.testing.assert_allclose(block['ls1']['gamma'], 1e-4)
  # torch default conv init U(+-1/sqrt(fan_in)), bias with the same bound
  pw = block['mlp_0']
  assert np.abs(pw['kernel']).max() <= c**-0.5
  assert np.abs(pw['kernel']).max() > 0.9 * c**-0.5
  assert np.abs(pw['bias']).max() <= c**-0.5
  dw = block['feature_conv_1']['kernel']  # fan_in = 25
  assert 0.18 < np.abs(dw).max() <= 0.2
  # packed in_proj: Xavier-uniform over (C, 3C), zero bias
  in_proj = block['relation_mha']['in_proj']
  assert np.abs(in_proj['kernel']).max() <= np.sqrt(6 / (4 * c))
  np.testing.assert_array_equal(in_proj['bias'], 0.0)
  # nn.Linear: N(0, 0.02), zero bias
  head = params['head']
  assert abs(float(np.std(head['kernel'])) - 0.02) < 0.005
  np.testing.assert_array_equal(head['bias'], 0.0)
