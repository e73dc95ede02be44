"""bfloat16 compute against the official float32 outputs: every design's tiny
fixture, converted and run with ``dtype=bfloat16`` (float32 parameters),
within 2e-2 of the official logits relative to their largest magnitude."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import test_acmix
import test_convert
from glmix_jax import convert, models

# fixture -> (registered name, overrides, the reference output's key)
DESIGNS = {
    **{f: (name, None, 'logits')
       for f, name in test_convert.GLNET_FIXTURES.items()},
    'acmix_module_s1': ('acmix_module', dict(in_channels=32, features=32,
                                             heads=4, stride=1),
                        'output_nhwc'),
    'acmix_resnet_tiny': ('acmix_resnet50', test_acmix.TINY_RESNET,
                          'logits'),
    'acmix_swin_tiny': ('acmix_swin_t', test_acmix.TINY_SWIN, 'logits'),
}
TOLERANCE = 2e-2


@pytest.mark.parametrize('fixture', sorted(DESIGNS))
def test_bfloat16_matches_official_float32(fixture):
  name, overrides, key = DESIGNS[fixture]
  if overrides is None:  # GLNet: sizes from the sidecar
    arrays, overrides, state_dict = test_convert.load_fixture(fixture)
  else:
    arrays, _, state_dict = test_acmix.load_fixture(fixture)
  variables = convert.convert_state_dict(name, state_dict, **overrides)
  model = models.build(name, dtype=jnp.bfloat16, **overrides)
  out = jax.jit(model.apply)(variables, arrays['input_nhwc'])
  assert out.dtype == jnp.bfloat16
  assert all(x.dtype == jnp.float32
             for x in jax.tree_util.tree_leaves(variables['params']))
  ref = arrays[key]
  error = float(np.abs(np.asarray(out, np.float64) - ref).max())
  scale = float(np.abs(ref).max())
  print(f'{fixture}: bf16 max abs error {error:.2e} = '
        f'{error / scale:.2e} of max |official| {scale:.3f}')
  assert error <= TOLERANCE * scale, (error, scale)


def test_slot_logits_stay_float32_in_a_bfloat16_model():
  arrays, overrides, state_dict = test_convert.load_fixture('glnet_stl_tiny')
  variables = convert.convert_state_dict('glnet_stl', state_dict, **overrides)
  model = models.build('glnet_stl', dtype=jnp.bfloat16, **overrides)
  _, state = model.apply(variables, arrays['input_nhwc'],
                         mutable='intermediates')
  logits = jax.tree_util.tree_leaves(state['intermediates'])
  assert logits and all(x.dtype == jnp.float32 for x in logits)
