"""The kernels' platform forms compute one function, and each device computes
its own examples."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

import hlo
from glmix_jax import sharding
from glmix_jax.models import kernels


def normal(seed, shape):
  return jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float32)


# (kernel, static arguments, argument shapes); batch first except where noted.
CASES = {
    'depthwise 5x5': ('depthwise_conv', {}, [(2, 9, 11, 6), (5, 5, 6)]),
    'depthwise 3x3': ('depthwise_conv', {}, [(3, 7, 6, 8), (3, 3, 8)]),
    'head map fc': ('head_map_fc', {}, [((2, 5, 6, 4, 8),) * 3, (12, 9)]),
    'shift conv, 16 groups': ('grouped_shift_conv', dict(stride=1),
                              [(2, 8, 7, 16, 9), (3, 3, 9, 64)]),
    'shift conv, stride 2': ('grouped_shift_conv', dict(stride=2),
                             [(2, 8, 10, 16, 9), (3, 3, 9, 32)]),
    # 6 groups: on the CPU a block of 4 and a last block of 2.
    'shift conv, 6 groups': ('grouped_shift_conv', dict(stride=1),
                             [(1, 6, 6, 6, 9), (3, 3, 9, 18)]),
    'local attention': ('local_attention', dict(heads=4, stride=1),
                        [(2, 9, 10, 16)] * 3 + [(9, 10, 4)]),
    'local attention, stride 2': ('local_attention', dict(heads=2, stride=2),
                                  [(2, 10, 12, 16)] * 3 + [(10, 12, 8)]),
}


def make_args(shapes, seed=0):
  args = []
  for shape in shapes:
    if isinstance(shape[0], tuple):
      args.append(tuple(normal(seed + i, s) for i, s in enumerate(shape)))
      seed += len(shape)
    else:
      args.append(normal(seed, shape))
      seed += 1
  return args


@pytest.mark.parametrize('case', sorted(CASES))
def test_cpu_and_standard_forms_agree_in_value_and_gradient(case):
  name, static, shapes = CASES[case]
  args = make_args(shapes)
  forms = kernels.IMPLEMENTATIONS[name]
  outputs, grads = {}, {}
  for form, fn in forms.items():
    fn = functools.partial(fn, **static)
    out = jax.jit(fn)(*args)
    cotangent = normal(99, out.shape)
    grad = jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a) * cotangent),
                            argnums=tuple(range(len(args)))))(*args)
    outputs[form], grads[form] = out, grad
  np.testing.assert_allclose(outputs['cpu'], outputs['default'], rtol=2e-5,
                             atol=2e-5)
  jax.tree_util.tree_map(
      functools.partial(np.testing.assert_allclose, rtol=2e-4, atol=2e-4),
      grads['cpu'], grads['default'])


# Per device: (case, per-device shapes, the CPU local attention's tile in
# elements of q, the CPU form's loop trip counts).
PER_DEVICE = {
    # GLNet-STL stage 1 (56 x 56 x 96, 5x5): the kernel gradient walks blocks
    # of 4 rows, 14 per image, over the device's 2 images (not the 16 of the
    # global batch: 224 trips).
    'depthwise, GLNet-STL stage 1': ('depthwise 5x5', [(2, 56, 56, 96),
                                                       (5, 5, 96)], None,
                                     {28}),
    # 2 images x 4 heads = 8 slabs of 4 x 9 x 10 per device, tiles of 2
    # slabs: 4 tiles (32 for the global batch), 49 offsets each.
    'local attention': ('local attention', None, 720, {4, 49}),
    # 2 images x 2 heads = 4 slabs of 8 x 5 x 6, tiles of 2: 2 tiles.
    'local attention, stride 2': ('local attention, stride 2', None, 480,
                                  {2, 49}),
}


@pytest.mark.parametrize('case', sorted(PER_DEVICE))
def test_each_device_computes_its_own_examples(case, monkeypatch):
  """Under the 8-device mesh the kernel (forward and gradient) moves no
  activations: the only collective is the all-reduce of the shared
  argument's gradient, and the loops of the CPU form run over one device's
  examples."""
  base, shapes, tile, trips = PER_DEVICE[case]
  if tile:
    monkeypatch.setattr(kernels, 'LOCAL_ATTENTION_TILE', tile)
  name, static, base_shapes = CASES[base]
  shapes = shapes or base_shapes  # then 8 devices' batches, shared last
  shapes = [(8 * s[0],) + s[1:] for s in shapes[:-1]] + shapes[-1:]
  args = make_args(shapes)
  public = functools.partial(getattr(kernels, name), **static)
  batched = [True] * (len(args) - 1) + [False]

  def loss(*a):
    return jnp.sum(public(*a) ** 2)

  step = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(len(args)))))
  mesh = sharding.make_mesh()
  placed = [jax.device_put(a, NamedSharding(
      mesh, PartitionSpec(sharding.DATA_AXIS) if b else PartitionSpec()))
            for a, b in zip(args, batched)]
  with jax.set_mesh(mesh):
    compiled = step.lower(*placed).compile()
    value, grads = step(*placed)
  text = compiled.as_text()
  moved = hlo.collectives(text)
  assert moved and {kind for kind, _ in moved} == {'all-reduce'}, moved
  # The shared argument's gradient and the loss (combined into one op).
  assert sum(size for _, size in moved) <= args[-1].size + 1, moved
  assert set(hlo.trip_counts(text)) == trips
  ref_value, ref_grads = jax.jit(jax.value_and_grad(
      loss, argnums=tuple(range(len(args)))))(*args)
  np.testing.assert_allclose(value, ref_value, rtol=1e-5)
  jax.tree_util.tree_map(
      functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-4),
      grads, ref_grads)
