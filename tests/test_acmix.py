"""ACmix: parameter counts, shapes, parity with the official code, input-size
errors, training mode, weight import and the attention's memory (bfloat16:
test_bfloat16.py)."""

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import reference_file
from glmix_jax import convert, models
from glmix_jax.models import acmix, acmix_swin
from test_convert import assert_matches, assert_network_matches

# Official parameter counts (torch 2.13, LeapLabTHU/ACmix 81dddb6).
OFFICIAL_PARAMS = {
    'acmix_resnet26': 10_487_816,
    'acmix_resnet38': 14_410_896,
    'acmix_resnet50': 18_333_976,
    'acmix_swin_t': 28_649_908,
    'acmix_swin_s': 50_345_080,
}
TINY_RESNET = dict(depths=(1, 1, 1, 1), width_per_group=16, num_classes=10)
TINY_SWIN = dict(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8),
                 num_classes=10)


def abstract_variables(model, shape):
  return jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(shape)))


def count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


def test_registry_lists_every_acmix_variant():
  assert set(models.list_models('acmix_*')) == {*OFFICIAL_PARAMS,
                                                 'acmix_module'}


@pytest.mark.parametrize('name', sorted(OFFICIAL_PARAMS))
def test_parameter_count_equals_official(name):
  variables = abstract_variables(models.build(name), (1, 224, 224, 3))
  assert count(variables['params']) == OFFICIAL_PARAMS[name]


@pytest.mark.parametrize('name', sorted(OFFICIAL_PARAMS))
def test_logits_and_stage_shapes(name):
  # eval_shape traces every block at the full depth without compiling it.
  resnet = name.startswith('acmix_resnet')
  overrides = (dict(width_per_group=8) if resnet else
               dict(embed_dim=32, num_heads=(1, 2, 4, 8)))
  model = models.build(name, num_classes=10, **overrides)
  shape = (2, 160, 192, 3) if resnet else (2, 224, 224, 3)
  logits, features = jax.eval_shape(
      lambda v: model.apply(v, jnp.zeros(shape), return_features=True),
      abstract_variables(model, shape))
  chex.assert_shape(logits, (2, 10))
  if resnet:  # 160x192 -> 40x48 after the stem, then /1, /2, /2, /2
    chex.assert_shape(features['stem'], (2, 40, 48, 64))
    sides = [(40, 48), (20, 24), (10, 12), (5, 6)]
    widths = [256, 512, 1024, 2048]
  else:
    chex.assert_shape(features['stem'], (2, 56, 56, 32))
    sides = [(56, 56), (28, 28), (14, 14), (7, 7)]
    widths = [32, 64, 128, 256]
  for i, ((h, w), c) in enumerate(zip(sides, widths)):
    chex.assert_shape(features[f'stage{i + 1}'], (2, h, w, c))


# ---------------------------------------------------------------------------
# Parity with the official PyTorch code, through the weight converter.


def load_fixture(name):
  arrays = np.load(reference_file(f'{name}.npz'))
  meta = json.loads(reference_file(f'{name}.json').read_text())
  state_dict = {k[3:]: arrays[k] for k in arrays.files if k.startswith('sd/')}
  return arrays, meta['constructor']['kwargs'], state_dict


@pytest.mark.parametrize('fixture', ['acmix_module_s1', 'acmix_module_s2'])
def test_module_matches_official(fixture):
  arrays, kwargs, state_dict = load_fixture(fixture)
  overrides = dict(in_channels=kwargs['in_planes'],
                   features=kwargs['out_planes'], heads=kwargs['head'],
                   stride=kwargs['stride'])
  variables = convert.convert_state_dict('acmix_module', state_dict,
                                         **overrides)
  model = models.build('acmix_module', **overrides)
  with jax.default_matmul_precision('highest'):
    out, state = jax.jit(
        lambda v, x: model.apply(v, x, mutable='intermediates'))(
            variables, arrays['input_nhwc'])
  assert_matches(out, arrays['output_nhwc'], f'{fixture} output')
  for name in ('q', 'k', 'v', 'conv_path'):
    assert_matches(state['intermediates'][name][0], arrays[f'feat/{name}'],
                   f'{fixture} {name}')


@pytest.mark.parametrize('fixture,name,overrides', [
    ('acmix_resnet_tiny', 'acmix_resnet50', TINY_RESNET),
    ('acmix_swin_tiny', 'acmix_swin_t', TINY_SWIN),
])
def test_network_matches_official(fixture, name, overrides):
  arrays, _, state_dict = load_fixture(fixture)
  variables = convert.convert_state_dict(name, state_dict, **overrides)
  model = models.build(name, **overrides)
  assert_network_matches(model, variables, arrays, fixture)


# ---------------------------------------------------------------------------
# Weight import rules specific to ACmix (the official dep_conv has no bias).


@pytest.fixture(name='module_s2')
def _module_s2():
  arrays, _, state_dict = load_fixture('acmix_module_s2')
  return dict(in_channels=32, features=32, stride=2), state_dict


def test_zero_dep_conv_bias_is_dropped_and_nonzero_is_refused(module_s2):
  overrides, state_dict = module_s2
  convert.convert_state_dict('acmix_module', {
      **state_dict, 'dep_conv.bias': np.zeros(32, np.float32)}, **overrides)
  with pytest.raises(convert.ConversionError, match='non-zero.*dep_conv.bias'):
    convert.convert_state_dict('acmix_module', {
        **state_dict, 'dep_conv.bias': np.ones(32, np.float32)}, **overrides)


def test_missing_rate_is_named(module_s2):
  overrides, state_dict = module_s2
  del state_dict['rate2']
  with pytest.raises(convert.ConversionError,
                     match='without a key: params/rate2'):
    convert.convert_state_dict('acmix_module', state_dict, **overrides)


# ---------------------------------------------------------------------------
# Inputs the official code rejects or crashes on (reflection padding by 3;
# stride 2 on odd sides).


@pytest.mark.parametrize('name,shape,smallest', [
    ('acmix_resnet50', (1, 124, 128, 3), 125),  # stage-4 ACmix map 3 px
    ('acmix_resnet50', (1, 136, 136, 3), 125),  # odd map into a stride-2 ACmix
    ('acmix_resnet26', (1, 60, 60, 3), 61),
    ('acmix_swin_t', (1, 192, 224, 3), 224),  # windows do not tile 48 px
    ('acmix_swin_t', (1, 226, 226, 3), 224),  # not a multiple of the patch
])
def test_bad_image_size_names_smallest_size(name, shape, smallest):
  model = models.build(name)
  with pytest.raises(ValueError, match=f'smallest valid size is {smallest}x'):
    abstract_variables(model, shape)
  abstract_variables(model, (1, smallest, smallest, 3))  # and that one works


@pytest.mark.parametrize('stride,shape,reason', [
    (1, (1, 3, 8, 16), 'side > 3'),
    (2, (1, 8, 9, 16), 'even map sides'),
])
def test_bad_module_input_is_a_clear_error(stride, shape, reason):
  model = acmix.ACmix(16, 16, stride=stride)
  with pytest.raises(ValueError, match=f'{reason}.*smallest valid size is 4x4'):
    abstract_variables(model, shape)


def test_wrong_channel_count_is_a_clear_error():
  with pytest.raises(ValueError, match=r'NHWC images \(B, H, W, 3\)'):
    abstract_variables(models.build('acmix_swin_t'), (1, 3, 224, 224))


# ---------------------------------------------------------------------------
# Initialisation: the official per-family init (ResNet_ImageNet.py's
# kaiming fan-out over every conv; Swin keeps the shift kernels).


def test_init_matches_official_per_family():
  # Swin keeps the shift kernels; ACmix-ResNet's constructor re-initialises
  # every conv kaiming fan-out, dep_conv included.
  assert models.build('acmix_swin_t').dep_conv_init == 'shift'
  assert models.build('acmix_resnet50').dep_conv_init == 'kaiming_fan_out'
  maps = jnp.zeros((1, 8, 8, 256))
  params = acmix_swin.WindowAttentionACmix(8, 4).init(
      jax.random.PRNGKey(0), maps, None)['params']
  kernel = np.asarray(params['dep_conv']['kernel'])  # (3, 3, 9, C)
  np.testing.assert_array_equal(
      kernel, np.broadcast_to(np.eye(9).reshape(3, 3, 9, 1), kernel.shape))
  assert float(params['rate1'][0]) == float(params['rate2'][0]) == 0.5

  params = acmix.ACmix(256, 256, dep_conv_init='kaiming_fan_out').init(
      jax.random.PRNGKey(0), maps)['params']
  std = float(np.std(params['dep_conv']['kernel']))
  assert abs(std / np.sqrt(2 / (9 * 256)) - 1) < 0.05  # fan_out = 9 C
  assert 'bias' not in params['fc'] and 'bias' not in params['dep_conv']


# ---------------------------------------------------------------------------
# Precision and training mode.


def test_train_mode_updates_batch_stats_and_uses_drop_path():
  model = models.build('acmix_resnet26', depths=(1, 1, 1, 1), num_classes=10,
                       width_per_group=8, drop_path_rate=0.5)
  images = jax.random.normal(jax.random.PRNGKey(1), (2, 64, 64, 3))
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), images)

  @jax.jit
  def train_step(variables, key):
    logits, state = model.apply(variables, images, train=True,
                                rngs={'dropout': key},
                                mutable=['batch_stats'])
    return logits, state['batch_stats']

  a, stats = train_step(variables, jax.random.PRNGKey(2))
  b, _ = train_step(variables, jax.random.PRNGKey(3))
  chex.assert_shape(a, (2, 10))
  assert not np.allclose(a, b)  # different blocks dropped
  assert not np.allclose(stats['bn1']['mean'],
                         variables['batch_stats']['bn1']['mean'])


# ---------------------------------------------------------------------------
# Memory of the 7x7 local attention (no 49x copy of k or v).


def test_local_attention_never_builds_the_unfolded_tensors():
  # ResNet-50 layer1 shape at batch 2: C = 64, d = 16, 56x56 maps. The
  # official unfold holds (B*N, d, 49, H, W) tensors: the unfolded k alone is
  # 49x the output, and k, k + pe, their product and v coexist. Ours holds
  # padded channel-major copies of q, k, v (~3.5x), the output, and the
  # logits and weights of one tile only (2 x 49/d of the tile): the compiled
  # temporaries stay within 4x inputs + output, i.e. < 17x the output.
  b, h, c, heads = 2, 56, 64, 4
  maps = jnp.zeros((b, h, h, c))
  pe = jnp.zeros((h, h, c // heads))
  out_bytes = maps.size * 4
  in_out_bytes = 4 * out_bytes  # q, k, v and the output (pe is tiny)

  def attention(q, k, v, pe):
    return acmix.local_attention(q, k, v, pe, heads=heads, stride=1)

  forward = jax.jit(attention).lower(maps, maps, maps, pe).compile()
  temp = forward.memory_analysis().temp_size_in_bytes
  assert temp <= 4 * in_out_bytes, temp / out_bytes
  assert temp < 49 * out_bytes / 2  # vs half the unfolded k alone

  # Under jax.grad the rematerialised loops store no per-offset residuals.
  grad = jax.jit(jax.grad(lambda *a: jnp.sum(attention(*a)), argnums=(0, 1, 2)))
  temp = grad.lower(maps, maps, maps, pe).compile().memory_analysis()
  assert temp.temp_size_in_bytes <= 6 * in_out_bytes


def test_local_attention_gradient_matches_finite_differences():
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  q, k, v = (jax.random.normal(key, (1, 8, 10, 8)) for key in keys[:3])
  pe = jax.random.normal(keys[3], (8, 10, 2))

  def loss(q, k, v):
    out = acmix.local_attention(q, k, v, pe, heads=4, stride=2)
    return jnp.sum(jnp.sin(out))

  with jax.default_matmul_precision('highest'):
    chex.assert_numerical_grads(loss, (q, k, v), order=1, atol=2e-2,
                                rtol=2e-2)
