r"""Where a GLMix block's time goes: its parts, jitted and timed one by one.

Times, at one stage's shapes (default GLNet-STL stage 1 at 224 px, batch 8:
56x56x96), the forward and forward+backward of the whole block and of each
part: the slot logits, soft clustering and dispatch (each with its softmax),
the slot attention, the local branch's pointwise and 5x5 depthwise convs, the
LayerNorms and the MLP. Parts overlap with neighbours in the fused block, so
they do not add up exactly; the point is their relative cost.

  PYTHONPATH=. python benchmarks/profile_glmix.py [--size 56 --channels 96]
"""

from __future__ import annotations

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import throughput
from glmix_jax.models import glnet, layers


def _parts(b: int, h: int, c: int) -> dict:
  """name -> (a function, its arguments); timed through jit with every array
  an argument (closed-over arrays would be constant-folded)."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(b, h, h, c)), jnp.float32)
  f = x.reshape(b, h * h, c)
  z = jnp.asarray(rng.normal(size=(b, 64, c)), jnp.float32)
  logits = glnet.slot_logits(z, f, jnp.float32(c**-0.5))
  kw = dict(dtype=jnp.float32, param_dtype=jnp.float32)

  def module(m, inp, *static):
    v = m.init(jax.random.PRNGKey(0), inp, *static)
    return lambda a, v: m.apply(v, a, *static), (inp, v)

  return {
      'GLMix block (all)': module(glnet.GLMixBlock(), x, False),
      'slot logits': (lambda a, z: glnet.slot_logits(z, a, 0.1), (f, z)),
      'soft_cluster (softmax_N + AF)': (glnet.soft_cluster, (logits, f)),
      'dispatch (softmax_S + A^T Z)': (glnet.dispatch, (logits, z)),
      'slot MHA (64 tokens)': module(
          layers.MultiHeadAttention(name='m', **kw), z),
      'pointwise C->C': module(
          layers.pointwise(c, in_features=c, name='p', **kw), x),
      'depthwise 5x5': module(layers.DepthwiseConv(5, **kw), x),
      'LayerNorm': module(layers.layer_norm(glnet.LN_EPS, name='n', **kw), x),
      'MLP (PW C->4C, GELU, PW 4C->C)': module(_Mlp(), x),
  }


class _Mlp(nn.Module):

  @nn.compact
  def __call__(self, x):
    return layers.conv_mlp(x, hidden_features=4 * x.shape[-1],
                           residual_dw=False, dtype=jnp.float32,
                           param_dtype=jnp.float32)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--size', type=int, default=56)
  parser.add_argument('--channels', type=int, default=96)
  parser.add_argument('--repeats', type=int, default=10)
  args = parser.parse_args()
  print(f'batch {args.batch}, {args.size}x{args.size}x{args.channels}, '
        f'float32, best of {args.repeats}; ms forward | ms forward+backward')
  for name, (fn, inputs) in _parts(args.batch, args.size,
                                   args.channels).items():
    fwd = jax.jit(fn)
    bwd = jax.jit(jax.grad(lambda *a, fn=fn: jnp.sum(fn(*a))))
    timing = throughput.time_calls(dict(
        fwd=throughput.timed(lambda: jax.block_until_ready(fwd(*inputs))),
        bwd=throughput.timed(lambda: jax.block_until_ready(bwd(*inputs)))),
                                   args.repeats)
    t_f, t_b = timing['fwd']['min_s'], timing['bwd']['min_s']
    print(f'  {name:32s} {1e3 * t_f:8.2f} | {1e3 * t_b:8.2f}', flush=True)


if __name__ == '__main__':
  main()
