"""Model summary: parameters, GMACs and per-stage output shapes.

MACs (multiply-accumulates) are counted exactly from the traced program, not
estimated: every convolution and every matrix product (dense layers,
attention QK^T and AV, slot clustering and dispatch) in the eval-mode jaxpr
contributes output elements x contraction size (1x1 convs are matmuls
here; depthwise convs, computed as shifted products, count their products). This is what PyTorch's
``FlopCounterMode`` counts (convs + matmuls + SDPA), the figure the GLNet
spec recommends (glnet.md §3); element-wise ops, norms and the adaptive
average pool that builds the initial slots are not counted (fvcore adds about
0.4 % for them).

Command::

  python -m glmix_jax.models.summary --model=glnet_stl [--image_size=224]
"""

from __future__ import annotations

import collections
import math
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from glmix_jax import models
from glmix_jax.models import layers


def _dot_general_macs(eqn) -> int:
  lhs = eqn.invars[0].aval.shape
  (lhs_contract, _), _ = eqn.params['dimension_numbers']
  contract = math.prod(lhs[d] for d in lhs_contract)
  return math.prod(eqn.outvars[0].aval.shape) * contract


def _conv_macs(eqn) -> int:
  rhs = eqn.invars[1].aval.shape
  dims = eqn.params['dimension_numbers']
  # rhs_spec = (out feature dim, in feature dim, *spatial dims)
  in_features = rhs[dims.rhs_spec[1]]
  window = math.prod(rhs[d] for d in dims.rhs_spec[2:])
  out = math.prod(eqn.outvars[0].aval.shape)
  return out * in_features * window  # in_features is already C_in / groups


_COUNTERS = {'dot_general': _dot_general_macs,
             'conv_general_dilated': _conv_macs}


def _sub_jaxprs(eqn):
  for param in eqn.params.values():
    for p in (param if isinstance(param, (list, tuple)) else (param,)):
      if isinstance(p, jax.extend.core.ClosedJaxpr):
        yield p.jaxpr
      elif isinstance(p, jax.extend.core.Jaxpr):
        yield p


def _count(jaxpr, totals: collections.Counter, scope: str = '',
           repeats: int = 1) -> None:
  for eqn in jaxpr.eqns:
    name_stack = f'{scope}/{eqn.source_info.name_stack}'
    if eqn.primitive.name in _COUNTERS:
      skipped = layers.UNCOUNTED_MACS_SCOPE in name_stack
      kind = 'not counted' if skipped else eqn.primitive.name
      totals[kind] += repeats * _COUNTERS[eqn.primitive.name](eqn)
    elif (eqn.primitive.name == 'mul'
          and layers.ELEMENTWISE_MACS_SCOPE in name_stack):
      totals['conv_general_dilated'] += repeats * math.prod(
          eqn.outvars[0].aval.shape)
    trips = eqn.params.get('length', 1) if eqn.primitive.name == 'scan' else 1
    for sub in _sub_jaxprs(eqn):
      _count(sub, totals, name_stack, repeats * trips)


def count_macs(model: nn.Module, variables: Any,
               image_shape: tuple[int, ...]) -> tuple[dict[str, int], Any]:
  """MACs of one eval forward, by primitive (``{'conv_general_dilated': ..,
  'dot_general': .., 'declared': .., 'total': .., 'not counted': ..}``), and
  the shapes of what the forward returns."""
  images = jax.ShapeDtypeStruct(image_shape, jnp.float32)
  declared = {}

  def forward(v, x):
    # Declared counts depend on shapes only; evaluating constants eagerly
    # keeps them concrete (Flax stores sown values as arrays).
    with jax.ensure_compile_time_eval():
      out, state = model.apply(v, x, train=False, return_features=True,
                               mutable=['intermediates'])
    flat = flax.traverse_util.flatten_dict(state['intermediates'])
    declared.update({k: int(v[0]) for k, v in flat.items()
                     if k[-1].startswith(layers.DECLARED_MACS_PREFIX)})
    return out

  jaxpr, shapes = jax.make_jaxpr(forward, return_shape=True)(variables, images)
  totals = collections.Counter()
  _count(jaxpr.jaxpr, totals)
  totals['declared'] = sum(declared.values())
  totals['total'] = (totals['conv_general_dilated'] + totals['dot_general']
                     + totals['declared'])
  return dict(totals), shapes


def summarize(name: str, image_size: int | tuple[int, int] = 224,
              **overrides) -> dict[str, Any]:
  """Parameters, MACs and feature shapes of a registered network (abstractly:
  nothing is allocated or computed)."""
  h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
  model = models.build(name, **overrides)
  shape = (1, h, w, 3)
  variables = jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(shape)))
  macs, (_, features) = count_macs(model, variables, shape)
  return dict(
      model=name, image_size=(h, w),
      params=sum(int(np.prod(x.shape))
                 for x in jax.tree_util.tree_leaves(variables['params'])),
      macs=macs, features={k: tuple(v.shape) for k, v in features.items()})


def format_summary(s: dict[str, Any]) -> str:
  """Human-readable table of ``summarize``'s result."""
  macs = s['macs']
  lines = [
      f'{s["model"]} at {s["image_size"][0]}x{s["image_size"][1]}',
      f'  parameters   {s["params"]:>15,}',
      f'  GMACs        {macs["total"] / 1e9:>15.3f}  '
      f'(k x k convs {macs["conv_general_dilated"] / 1e9:.3f}, '
      f'matmuls {macs["dot_general"] / 1e9:.3f}'
      + (f', declared {macs["declared"] / 1e9:.3f}' if macs['declared'] else '')
      + f'; {macs["total"]:,} MACs)',
      '  output shapes (batch 1, NHWC):',
  ]
  lines += [f'    {k:<8} {s["features"][k]}'
            for k in ('stem', 'stage1', 'stage2', 'stage3', 'stage4')]
  return '\n'.join(lines)


def main(argv):
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  size = tuple(int(v) for v in f.image_size.split('x'))
  print(format_summary(summarize(f.model, size[0] if len(size) == 1 else size)))


if __name__ == '__main__':
  from absl import flags  # pylint: disable=g-import-not-at-top
  from glmix_jax import cli  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string('model', None, 'Registered model name.', required=True)
  flags.DEFINE_string('image_size', '224', 'Side, or HxW (e.g. 224x160).')
  cli.run(main)
