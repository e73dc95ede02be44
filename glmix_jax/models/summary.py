"""Model summary: parameters, GMACs and per-stage output shapes.

MACs (multiply-accumulates) are counted exactly from the traced program, not
estimated: every convolution and every matrix product (dense layers,
attention QK^T and AV, slot clustering and dispatch) in the eval-mode jaxpr
contributes output elements x contraction size (1x1 convs are matmuls here;
ACmix's window attention, computed as shifted products, counts its
products). Where a kernel has a CPU form and a standard one
(``models.kernels``), the standard form's are counted, which is what GPUs and
TPUs run and what the function takes. This is what PyTorch's
``FlopCounterMode`` counts (convs + matmuls + SDPA) on the official models,
the figure the README's table gives; element-wise ops, norms and the adaptive
average pool that builds the initial slots are not counted (fvcore adds about
0.4 % for them).

Command::

  python -m glmix_jax.models.summary --model=glnet_stl [--image_size=224]
"""

from __future__ import annotations

import collections
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from glmix_jax import models
from glmix_jax.models import kernels, layers


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


def _sub_jaxprs_counted(eqn):
  """The sub-programs of ``eqn`` that run: of a ``lax.platform_dependent``
  switch, only the default (GPU / TPU) branch."""
  platforms = eqn.params.get('branches_platforms')
  if platforms is None:
    yield from _sub_jaxprs(eqn)
    return
  yield eqn.params['branches'][platforms.index(None)].jaxpr


def _count(jaxpr, totals: collections.Counter, scope: str = '',
           repeats: int = 1) -> None:
  for eqn in jaxpr.eqns:
    name_stack = f'{scope}/{eqn.source_info.name_stack}'
    if eqn.primitive.name in _COUNTERS:
      skipped = layers.UNCOUNTED_MACS_SCOPE in name_stack
      kind = 'not counted' if skipped else eqn.primitive.name
      totals[kind] += repeats * _COUNTERS[eqn.primitive.name](eqn)
    elif (eqn.primitive.name == 'mul'
          and kernels.ELEMENTWISE_MACS_SCOPE in name_stack):
      totals['elementwise'] += repeats * math.prod(eqn.outvars[0].aval.shape)
    trips = eqn.params.get('length', 1) if eqn.primitive.name == 'scan' else 1
    for sub in _sub_jaxprs_counted(eqn):
      _count(sub, totals, name_stack, repeats * trips)


def count_macs(model: nn.Module, variables: Any,
               image_shape: tuple[int, ...]) -> tuple[dict[str, int], Any]:
  """MACs of one eval forward, by kind (``{'conv_general_dilated': ..,
  'dot_general': .., 'elementwise': .., 'total': .., 'not counted': ..}``),
  and the shapes of what the forward returns."""
  images = jax.ShapeDtypeStruct(image_shape, jnp.float32)

  def forward(v, x):
    return model.apply(v, x, train=False, return_features=True)

  jaxpr, shapes = jax.make_jaxpr(forward, return_shape=True)(variables, images)
  totals = collections.Counter()
  _count(jaxpr.jaxpr, totals)
  totals['total'] = (totals['conv_general_dilated'] + totals['dot_general']
                     + totals['elementwise'])
  return dict(totals), shapes


def param_count(params: Any) -> int:
  """The number of parameters in a (possibly abstract) tree."""
  return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(params))


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
      params=param_count(variables['params']),
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
      + (f', window attention {macs["elementwise"] / 1e9:.3f}'
         if macs.get('elementwise') else '')
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
