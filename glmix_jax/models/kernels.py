"""The models' compute kernels: per device, and per platform.

The model files say *what* is computed, as the papers write it; this file
says *how*, for the few operations where the how matters:

* ``depthwise_conv``: GLNet's 5x5 and 3x3 depthwise convolutions;
* ``grouped_shift_conv``: ACmix's ``dep_conv``, d groups of 9 shifted maps;
* ``head_map_fc``: ACmix's FC that maps the 3N head maps to 9 (Eq. 12);
* ``local_attention``: ACmix-ResNet's 7x7 sliding-window attention (Eq. 5);
* ``layer_norm`` and ``gelu``: one form on every platform, with a written
  backward pass that makes fewer passes over full-size temporaries.

**Per platform.** The first four have the standard XLA form, which GPU and
TPU compile well (grouped ``conv_general_dilated``, ``dot_general``, window
attention as 49 unrolled shifted products with no loop), and a form tuned on
XLA:CPU (BENCHMARKS.md: fused shifted multiply-adds with written backward
passes, dense convs with block-diagonal kernels, loops over cache-sized
tiles). ``jax.lax.platform_dependent`` picks one when the program is
lowered, so a program lowered for ``cuda`` or ``tpu``, even from a CPU host,
holds only the standard form, and ``summary.count_macs`` counts the standard
form: the MACs of the function, not of a CPU trick that does more of them.

**Per device.** Under a context mesh (``sharding.traced_on``, as the train
and eval steps are traced) ``per_example`` runs each CPU form inside
``jax.shard_map`` over the batch axes: every device computes its own
examples, its loops and tiles sized from its own part of the batch. Left to
the SPMD partitioner, the CPU forms' loops and dynamic slices made every
device gather the whole batch. The standard forms have no loop, and the
partitioner splits them over the batch as they are.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from glmix_jax import sharding

# Element-wise products inside this scope are the multiplies of a contraction
# (a depthwise conv or a window attention computed as shifted products): each
# counts its output size as MACs (``summary.count_macs``).
ELEMENTWISE_MACS_SCOPE = 'elementwise_macs'


def per_example(kernel: Callable[..., jax.Array], *args: jax.Array,
                batched: tuple[bool, ...]) -> jax.Array:
  """``kernel(*args)``, on each device's examples when a mesh is set.

  ``batched[i]`` says whether ``args[i]`` has the batch as its leading axis
  (split over the mesh's batch axes) or is shared by all examples
  (replicated; its gradient is summed over the devices). The kernel must
  treat examples independently and return a batch-leading array. Without a
  mesh, or with a batch that does not split evenly, it runs as it is.
  """
  mesh = jax.sharding.get_abstract_mesh()
  axes = () if mesh.empty else tuple(
      a for a in sharding.BATCH_AXES if a in mesh.axis_names)
  devices = math.prod(mesh.shape[a] for a in axes) if axes else 1
  batch = next(x.shape[0] for x, b in zip(args, batched) if b)
  if devices == 1 or batch % devices:
    return kernel(*args)
  def on_device(*local):
    # Shared arguments enter as device-varying values: the kernel's (custom)
    # backward pass gives each device its own part of their gradient, and
    # the transpose of this cast sums the parts.
    return kernel(*(x if b else jax.lax.pcast(x, axes, to='varying')
                    for x, b in zip(local, batched)))

  split, whole = PartitionSpec(axes), PartitionSpec()
  return jax.shard_map(
      on_device, in_specs=tuple(split if b else whole for b in batched),
      out_specs=split, axis_names=set(axes))(*args)


def _on_platform(name: str, *args: jax.Array,
                 batched: tuple[bool, ...] | None = None, **static
                 ) -> jax.Array:
  """Kernel ``name`` in its form for the platform the program is lowered for
  (``IMPLEMENTATIONS``), with ``static`` arguments bound; the CPU form on
  each device's examples (``per_example``) when ``batched`` is given.

  The switch sits outside any ``shard_map``: lowered for one platform it
  leaves that platform's form alone in the program, forward and backward
  (inside a ``shard_map``, the backward kept a conditional on the form's
  index, passed across from the forward).
  """
  cpu, default = (functools.partial(IMPLEMENTATIONS[name][form], **static)
                  for form in ('cpu', 'default'))
  if batched is not None:
    cpu = functools.partial(per_example, cpu, batched=batched)
  return jax.lax.platform_dependent(*args, cpu=cpu, default=default)


# ---------------------------------------------------------------------------
# Depthwise convolution, "same" zero padding (torch Conv2d(C, C, k,
# padding=k // 2, groups=C)).


def depthwise_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """Depthwise k x k correlation of NHWC ``x`` with a (k, k, C) kernel,
  "same" zero padding; in ``x.dtype``, accumulated in float32 at least."""
  return _on_platform('depthwise_conv', x, kernel.astype(x.dtype),
                      batched=(True, False))


def _depthwise_xla(x: jax.Array, kernel: jax.Array) -> jax.Array:
  pad = kernel.shape[0] // 2
  return jax.lax.conv_general_dilated(
      x, kernel[:, :, None, :], window_strides=(1, 1),
      padding=((pad, pad), (pad, pad)),
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      feature_group_count=x.shape[-1])


def _shifted_sum(padded: jax.Array, kernel: jax.Array) -> jax.Array:
  """sum_{i,j} padded[:, i:i+H, j:j+W, :] * kernel[i, j, :], summed in at
  least float32: a stride-1 depthwise correlation of a padded NHWC map."""
  k = kernel.shape[0]
  h, w = padded.shape[1] - k + 1, padded.shape[2] - k + 1
  acc = jnp.promote_types(padded.dtype, jnp.float32)
  out = jnp.zeros((padded.shape[0], h, w, padded.shape[3]), acc)
  with jax.named_scope(ELEMENTWISE_MACS_SCOPE):
    for i in range(k):
      for j in range(k):
        out = out + (padded[:, i:i + h, j:j + w, :] * kernel[i, j]).astype(
            acc)
  return out


def _pad_same(x: jax.Array, k: int) -> jax.Array:
  """``x`` (B, H, W, ...) zero-padded by k // 2 on H and W."""
  pad = k // 2
  return jnp.pad(x, ((0, 0), (pad, pad), (pad, pad)) + ((0, 0),) * (x.ndim - 3))


@jax.custom_vjp
def _depthwise_cpu(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """The sum of the k*k shifted copies of the zero-padded input, each scaled
  per channel, with a written backward: XLA:CPU runs grouped convolutions
  20-50x slower than this fused sum at GLNet's shapes (BENCHMARKS.md)."""
  return _shifted_sum(_pad_same(x, kernel.shape[0]), kernel).astype(x.dtype)


def _depthwise_cpu_fwd(x, kernel):
  return _depthwise_cpu(x, kernel), (x, kernel)


def _kernel_grad_taps(padded: jax.Array, g: jax.Array) -> jax.Array:
  """(k, k, C): sum over (b, y, x) of padded[b, y + i, x + j] * g[b, y, x],
  the k*k tap reductions of a depthwise kernel gradient, in float32 at least."""
  h, w = g.shape[1:3]
  k = padded.shape[1] - h + 1
  acc = jnp.promote_types(g.dtype, jnp.float32)
  return jnp.stack([
      jnp.stack([jnp.sum((padded[:, i:i + h, j:j + w, :] * g).astype(acc),
                         axis=(0, 1, 2)) for j in range(k)])
      for i in range(k)])


# The CPU kernel gradient walks the map in blocks of whole rows of about this
# many elements (128 KiB of float32 per operand), small enough that a block's
# k*k tap reductions read it from the core's cache rather than from memory.
# Maps up to 16 blocks take the k*k reductions in one go.
KERNEL_GRAD_BLOCK_ELEMENTS = 32768


def depthwise_kernel_grad(x: jax.Array, g: jax.Array, k: int, *,
                          block_elements: int | None = None) -> jax.Array:
  """Gradient of a "same"-padded depthwise k x k correlation of ``x`` with
  respect to its (k, k, C) kernel, given the output cotangent ``g``:
  ``_kernel_grad_taps`` summed over blocks of rows, one block per step of a
  loop. As k*k whole-map reductions each would read both maps from memory:
  at GLNet-STL stage 1 (8 x 56 x 56 x 96, k = 5) that took 69 ms, in blocks
  8.6 ms (BENCHMARKS.md)."""
  # The barrier keeps XLA from sharing the taps' shifted slices with the
  # forward's shifted sum: shared, each slice is materialised at full size.
  padded, g = jax.lax.optimization_barrier((_pad_same(x, k), g))
  block_elements = block_elements or KERNEL_GRAD_BLOCK_ELEMENTS
  b, h, w, c = g.shape
  if b * h * w * c <= 16 * block_elements:
    return _kernel_grad_taps(padded, g)
  rows = max(r for r in range(1, h + 1)
             if h % r == 0 and (r * w * c <= block_elements or r == 1))
  blocks = h // rows
  halo = padded.shape[1] - h

  def step(n, total):
    image, y = n // blocks, (n % blocks) * rows
    return total + _kernel_grad_taps(
        jax.lax.dynamic_slice(padded, (image, y, 0, 0),
                              (1, rows + halo, w + halo, c)),
        jax.lax.dynamic_slice(g, (image, y, 0, 0), (1, rows, w, c)))

  acc = jnp.promote_types(g.dtype, jnp.float32)
  # zeros_like: inside shard_map the sum varies over devices, as g does.
  return jax.lax.fori_loop(
      0, b * blocks, step,
      jnp.zeros_like(g, shape=(halo + 1, halo + 1, c), dtype=acc))


def _depthwise_cpu_bwd(residuals, g):
  # Written out because autodiff of the shifted sum pads and adds k*k
  # full-size cotangents; here the input gradient is one more shifted sum
  # (with the flipped kernel).
  x, kernel = residuals
  k = kernel.shape[0]
  dx = _shifted_sum(_pad_same(g, k), kernel[::-1, ::-1]).astype(x.dtype)
  return dx, depthwise_kernel_grad(x, g, k).astype(kernel.dtype)


_depthwise_cpu.defvjp(_depthwise_cpu_fwd, _depthwise_cpu_bwd)


# ---------------------------------------------------------------------------
# ACmix's convolution path: the FC over head maps and the grouped shift conv.


def head_map_fc(parts: tuple[jax.Array, ...], kernel: jax.Array
                ) -> jax.Array:
  """f[..., c, t] = sum_m W[m, t] F_m[..., c] over the 3N head maps
  m = part * N + head (parts q, k, v, each (..., N, d); ``kernel`` (3N, 9)
  in their dtype): (..., d, 9)."""
  return _on_platform('head_map_fc', parts, kernel)


def _head_map_fc_xla(parts, kernel):
  heads = parts[0].shape[-2]
  return sum(jnp.einsum('...nc,nt->...ct', p, kernel[i * heads:(i + 1) * heads])
             for i, p in enumerate(parts))


@jax.custom_vjp
def _head_map_fc_cpu(parts, kernel):
  """A 3N x 9 contraction is far too small for a matmul on XLA:CPU: one
  fused element-wise pass over the 3N terms, and no stacked 3N copy is
  built. Its backward is the einsum form's: autodiff of the element-wise
  pass made 3N full-size partial products, 3x the einsum backward's time at
  ACmix's shapes (BENCHMARKS.md, 2026-12-04)."""
  heads = parts[0].shape[-2]
  with jax.named_scope(ELEMENTWISE_MACS_SCOPE):
    return sum(p[..., n, :, None] * kernel[i * heads + n]
               for i, p in enumerate(parts) for n in range(heads))


def _head_map_fc_cpu_fwd(parts, kernel):
  return _head_map_fc_cpu(parts, kernel), (parts, kernel)


def _head_map_fc_cpu_bwd(residuals, g):
  return jax.vjp(_head_map_fc_xla, *residuals)[1](g)


_head_map_fc_cpu.defvjp(_head_map_fc_cpu_fwd, _head_map_fc_cpu_bwd)


def grouped_shift_conv(f: jax.Array, kernel: jax.Array, stride: int
                       ) -> jax.Array:
  """3x3 conv of ``f`` (B, H, W, d, 9), torch's 9d channels c * 9 + t, in d
  groups of 9 inputs with ``kernel`` (3, 3, 9, O) (output channel
  o = c * O / d + j, XLA's contiguous grouping); zero padding 1, ``stride``.
  """
  return _on_platform('grouped_shift_conv', f, kernel, stride=stride,
                      batched=(True, False))


def _conv3x3(x: jax.Array, kernel: jax.Array, stride: int,
             groups: int) -> jax.Array:
  return jax.lax.conv_general_dilated(
      x, kernel, window_strides=(stride, stride), padding=((1, 1), (1, 1)),
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=groups)


def _grouped_shift_conv_xla(f, kernel, *, stride):
  b, h, w, groups, taps = f.shape
  return _conv3x3(f.reshape(b, h, w, groups * taps), kernel, stride, groups)


# The CPU ``dep_conv`` runs as one dense conv per block of this many groups,
# with a block-diagonal kernel: 4x the MACs, on XLA:CPU's fast dense conv
# (its grouped conv took 7-8x longer). In the models' forward at batch 8,
# in-process A/B: blocks of 4 beat blocks of 2 and 8 by 3-5 % and one dense
# conv over all 32 groups (ACmix-Swin-T) by 1.31x (BENCHMARKS.md,
# 2026-12-06).
DEP_CONV_BLOCK_GROUPS = 4


def _grouped_shift_conv_blocks(f, kernel, stride):
  """The grouped conv as dense convs over blocks of DEP_CONV_BLOCK_GROUPS
  groups (the last block may be smaller), outputs concatenated in group
  order."""
  b, h, w, groups, taps = f.shape
  per_group = kernel.reshape(3, 3, taps, groups, kernel.shape[-1] // groups)
  outs = []
  for start in range(0, groups, DEP_CONV_BLOCK_GROUPS):
    block = slice(start, min(start + DEP_CONV_BLOCK_GROUPS, groups))
    n = block.stop - block.start
    # dense[p, q, c * 9 + t, e * J + j] = W[p, q, t, c, j] if c == e, else 0
    dense = jnp.einsum('pqtcj,ce->pqctej', per_group[:, :, :, block],
                       jnp.eye(n, dtype=kernel.dtype))
    outs.append(_conv3x3(f[:, :, :, block].reshape(b, h, w, n * taps),
                         dense.reshape(3, 3, n * taps, -1), stride, 1))
  return jnp.concatenate(outs, axis=-1)


def _tap_window(padded: jax.Array, p: int, q: int, out_hw: tuple[int, int],
                stride: int) -> jax.Array:
  """The inputs that tap (p, q) of a padding-1, ``stride`` 3x3 conv reads for
  each of its ``out_hw`` outputs: padded[:, s y + p, s x + q]."""
  ho, wo = out_hw
  return padded[:, p:p + stride * (ho - 1) + 1:stride,
                q:q + stride * (wo - 1) + 1:stride]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _grouped_shift_conv_cpu(f, kernel, stride):
  """The CPU ``dep_conv``: dense convs over blocks of groups
  (``_grouped_shift_conv_blocks``), with a written kernel gradient:
  autodiff's kernel gradient of a grouped conv is a conv with
  ``batch_group_count``, which XLA:CPU runs as plain loops (8.8 s for one
  ACmix-ResNet stage-3 call at batch 8); here it is 9 batched products, one
  per tap (BENCHMARKS.md, 2026-12-04)."""
  return _grouped_shift_conv_blocks(f, kernel, stride)


def _grouped_shift_conv_cpu_fwd(f, kernel, stride):
  return _grouped_shift_conv_blocks(f, kernel, stride), (f, kernel)


def _grouped_shift_conv_cpu_bwd(stride, residuals, g):
  f, kernel = residuals
  # The input gradient is the block convs' transpose, which XLA:CPU runs
  # well.
  df = jax.vjp(lambda x: _grouped_shift_conv_blocks(x, kernel, stride),
               f)[1](g)[0]
  b, ho, wo, features = g.shape
  groups, taps = f.shape[3:]
  padded = _pad_same(f, 3)
  g_groups = g.reshape(b, ho, wo, groups, features // groups)
  acc = jnp.promote_types(g.dtype, jnp.float32)
  dk = jnp.stack([
      jnp.einsum('bhwct,bhwcj->tcj',
                 _tap_window(padded, p, q, (ho, wo), stride), g_groups,
                 preferred_element_type=acc).reshape(taps, features)
      for p in range(3) for q in range(3)])
  return df, dk.reshape(kernel.shape).astype(kernel.dtype)


_grouped_shift_conv_cpu.defvjp(_grouped_shift_conv_cpu_fwd,
                               _grouped_shift_conv_cpu_bwd)


# ---------------------------------------------------------------------------
# ACmix-ResNet's 7x7 local attention.

ATT_KERNEL = 7  # k_att: the sliding window is 7x7
ATT_PAD = ATT_KERNEL // 2  # reflection padding; maps must be larger than it
OFFSETS = ATT_KERNEL**2


def local_attention(q: jax.Array, k: jax.Array, v: jax.Array, pe: jax.Array,
                    *, heads: int, stride: int) -> jax.Array:
  """7x7 sliding-window attention with relative positions (paper Eq. 5).

  For head n and the query at input position (s*i, s*j), with window offsets
  (a, b) in [-3, 3]^2 and keys at (s*i + a, s*j + b) reflected at borders:
    logit = < d^-1/2 q , k(key) + pe(query) - pe(key) >,
    out   = sum_window softmax(logit) * v(key).
  Two passes over the 49 offsets, each offset a strided window of the
  reflection-padded k, v and pe: no (..., 49, d) unfolded tensor exists
  (the official code unfolds k and v 49-fold). The only 49-sized tensors are
  the logits and their softmax, 49/d of the output size.

  Args:
    q, k, v: (B, H, W, C) projections at the input resolution, q unscaled.
    pe: (H, W, d) positional projection ``conv_p`` of the coordinate grid.
    heads: N; C = N * d with head-major channels.
    stride: 1 or 2; applied late, by subsampling the queries.

  Returns:
    (B, H // stride, W // stride, C), head-major channels.
  """
  return _on_platform('local_attention', q, k, v, pe, heads=heads,
                      stride=stride, batched=(True, True, True, False))


def _reflect_pad(t: jax.Array, axes: tuple[int, int]) -> jax.Array:
  pad = [(0, 0)] * t.ndim
  for axis in axes:
    pad[axis] = (ATT_PAD, ATT_PAD)
  return jnp.pad(t, pad, mode='reflect')


def _window(t: jax.Array, offset: int, axes: tuple[int, int], out_hw,
            stride: int) -> jax.Array:
  """The keys at ``offset`` of every (strided) query: a strided window of the
  padded ``t`` along its two spatial ``axes``."""
  start, limit, strides = [0] * t.ndim, list(t.shape), [1] * t.ndim
  for axis, first, size in zip(axes, divmod(offset, ATT_KERNEL), out_hw):
    start[axis], strides[axis] = first, stride
    limit[axis] = first + stride * (size - 1) + 1
  return jax.lax.slice(t, start, limit, strides)


def _local_attention_xla(q, k, v, pe, *, heads, stride):
  # NHWC with heads split, (B, H, W, N, d): the window offsets unrolled, the
  # sum over d a minor-axis reduction; no loop.
  b, h, w, c = q.shape
  d = c // heads
  ho, wo = h // stride, w // stride
  split = lambda t: t.reshape(b, h, w, heads, d)
  q_hat = split(q)[:, ::stride, ::stride] * (d**-0.5)
  k_pad, v_pad = (_reflect_pad(split(t), (1, 2)) for t in (k, v))
  pe_pad = _reflect_pad(pe, (0, 1))[:, :, None, :]  # (H + 6, W + 6, 1, d)
  pe_query = pe[::stride, ::stride, None, :]
  window = functools.partial(_window, out_hw=(ho, wo), stride=stride)
  # Sums in float32: the 49 logits' sums over d, and the 49 weighted values.
  with jax.named_scope(ELEMENTWISE_MACS_SCOPE):
    logits = jnp.stack([
        jnp.sum(q_hat * (window(k_pad, o, (1, 2)) + pe_query
                         - window(pe_pad, o, (0, 1))), axis=-1,
                dtype=jnp.float32)
        for o in range(OFFSETS)], axis=-1)  # (B, Ho, Wo, N, 49)
  attn = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  out = jnp.zeros(q_hat.shape, jnp.float32)
  with jax.named_scope(ELEMENTWISE_MACS_SCOPE):
    for o in range(OFFSETS):
      out = out + (attn[..., o, None] * window(v_pad, o, (1, 2))).astype(
          jnp.float32)
  return out.astype(v.dtype).reshape(b, ho, wo, c)


# Elements of q per tile of (image, head) slabs that the CPU local attention
# processes at once: small enough that its 98 passes over the offsets run from
# cache (a 2 MiB L2 on the machine it was tuned on), large enough to keep the
# cores busy.
LOCAL_ATTENTION_TILE = 200_000


def _local_attention_cpu(q, k, v, pe, *, heads, stride):
  # Loops over tiles of (image, head) slabs, and within a slab over the
  # offsets; the tile body and both offset bodies are rematerialised, so
  # under jax.grad no per-offset residual is stored. Slabs are channel-major,
  # (d, H, W): the sum over d runs over a major axis and vectorises along W
  # (an innermost-axis sum over d is several times slower on CPU).
  b, h, w, c = q.shape
  d = c // heads
  ho, wo = h // stride, w // stride

  def slabs(t):  # (B, H, W, N * d) -> (B * N, d, H, W)
    return t.reshape(b, h, w, heads, d).transpose(0, 3, 4, 1, 2).reshape(
        b * heads, d, h, w)

  q_hat = slabs(q)[..., ::stride, ::stride] * (d**-0.5)
  k_pad, v_pad = (_reflect_pad(slabs(t), (2, 3)) for t in (k, v))
  pe = pe.transpose(2, 0, 1)  # (d, H, W)
  pe_pad = _reflect_pad(pe, (1, 2))
  pe_query = pe[:, ::stride, ::stride]

  def window(t, offset):  # (d, Ho, Wo): the keys at ``offset`` of each query
    size = (d, stride * (ho - 1) + 1, stride * (wo - 1) + 1)
    start = (0, offset // ATT_KERNEL, offset % ATT_KERNEL)
    return jax.lax.dynamic_slice(t, start, size)[:, ::stride, ::stride]

  @jax.checkpoint
  def attend(slab):  # one (image, head): (d, Ho, Wo), (d, H + 6, W + 6) x 2
    q_s, k_s, v_s = slab

    @jax.checkpoint
    def logit(offset):  # (Ho, Wo)
      return jnp.sum(q_s * (window(k_s, offset) + pe_query
                            - window(pe_pad, offset)), axis=0)

    @jax.checkpoint
    def accumulate(offset, out):
      return out + attn[offset] * window(v_s, offset)

    logits = jax.lax.map(logit, jnp.arange(OFFSETS))  # (49, Ho, Wo)
    attn = jax.nn.softmax(logits.astype(jnp.float32), axis=0).astype(
        v_s.dtype)
    return jax.lax.fori_loop(0, OFFSETS, accumulate, jnp.zeros_like(q_s))

  tile = max(1, round(LOCAL_ATTENTION_TILE / (d * ho * wo)))
  out = jax.lax.map(attend, (q_hat, k_pad, v_pad), batch_size=tile)
  return out.reshape(b, heads, d, ho, wo).transpose(0, 3, 4, 1, 2).reshape(
      b, ho, wo, c)


# Each kernel's forms: ``'default'``, the standard XLA form (GPU, TPU), and
# ``'cpu'``, the form tuned on XLA:CPU. They compute the same function
# (tests/test_kernels.py: values and gradients).
IMPLEMENTATIONS: dict[str, dict[str, Callable[..., jax.Array]]] = {
    'depthwise_conv': {'cpu': _depthwise_cpu, 'default': _depthwise_xla},
    'head_map_fc': {'cpu': _head_map_fc_cpu, 'default': _head_map_fc_xla},
    'grouped_shift_conv': {'cpu': _grouped_shift_conv_cpu,
                           'default': _grouped_shift_conv_xla},
    'local_attention': {'cpu': _local_attention_cpu,
                        'default': _local_attention_xla},
}


# ---------------------------------------------------------------------------
# Written backward passes (every platform): the same function as autodiff's,
# with fewer passes over full-size temporaries.


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array,
               epsilon: float) -> jax.Array:
  """LayerNorm over the last axis, ``nn.LayerNorm(use_fast_variance=False)``
  to the bit in the forward pass, with a written backward pass."""
  return _layer_norm_fwd(x, scale, bias, epsilon)[0]


def _layer_norm_fwd(x, scale, bias, epsilon):
  # nn.LayerNorm(use_fast_variance=False)'s operations in its order, so the
  # output is the same to the bit: statistics in float32 at least, mean
  # first, then the mean square deviation (PyTorch's two-pass variance).
  stats = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  mean = jnp.mean(stats, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(stats - mean), axis=-1, keepdims=True)
  rstd = jax.lax.rsqrt(var + epsilon)
  y = (x - mean) * (rstd * scale) + bias
  return y, (x, mean, rstd, scale, bias)


def _layer_norm_bwd(epsilon, residuals, g):
  # Written out because autodiff of the forward makes XLA:CPU take several
  # passes over full-size temporaries (broadcasts of the statistics among
  # them); here two row reductions and one element-wise pass give dx:
  # dx = rstd * (g' - mean(g') - xhat * mean(g' * xhat)), g' = g * scale.
  del epsilon
  x, mean, rstd, scale, bias = residuals
  xhat = (x - mean) * rstd
  g_scaled = g * scale
  dx = rstd * (g_scaled - jnp.mean(g_scaled, axis=-1, keepdims=True)
               - xhat * jnp.mean(g_scaled * xhat, axis=-1, keepdims=True))
  rows = tuple(range(x.ndim - 1))
  return (dx.astype(x.dtype),
          jnp.sum(g * xhat, axis=rows).astype(scale.dtype),
          jnp.sum(g, axis=rows).astype(bias.dtype))


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


@jax.custom_vjp
def gelu(x: jax.Array) -> jax.Array:
  """The exact GELU, x * Phi(x) (torch ``nn.GELU()``), with a written backward.

  The forward is torch's formula, x / 2 * (1 + erf(x / sqrt 2)) (ATen's
  ``GeluKernel``), in float32 at least (torch upcasts bfloat16 inside the
  kernel too). Flax's ``nn.gelu(approximate=False)`` writes Phi with erfc,
  which XLA expands into two rational approximations, an exp and two
  divides per element: twice the time of erf's one approximation on CPU
  (BENCHMARKS.md). In the left tail 1 + erf(x / sqrt 2) keeps only absolute
  accuracy, in torch as here: the output is within 2.5e-7 |x| (plus half an
  ulp) of the exact GELU in float64, tested; torch's own is within 3.3e-7 |x|,
  and this form matches torch's float32 output more often than the erfc form.

  Its autodiff would save erf's and the derivative's exp(-x^2 / 2) as
  full-size residuals, three passes over the MLP's widest maps; the written
  backward keeps only x and recomputes gelu'(x) = Phi(x) + x phi(x) in one
  pass (BENCHMARKS.md: about 30 ms less per stage-1 MLP on CPU).
  """
  xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  return (xf * 0.5 * (1.0 + jax.lax.erf(xf * math.sqrt(0.5)))).astype(x.dtype)


def _gelu_fwd(x):
  return gelu(x), x


def _gelu_bwd(x, g):
  # In float32 at least: bfloat16's 8 mantissa bits would round Phi(x) near
  # 1. erf (not erfc) here: in the left tail 0.5 + 0.5 erf keeps ~1e-7 of
  # absolute accuracy only, negligible next to float32 rounding of a
  # derivative that reaches 1.13 (tested against float64).
  compute = jnp.promote_types(x.dtype, jnp.float32)
  xf = x.astype(compute)
  cdf = 0.5 + 0.5 * jax.lax.erf(xf * math.sqrt(0.5))
  pdf = jnp.exp(-0.5 * xf * xf) * (1.0 / math.sqrt(2.0 * math.pi))
  return ((g.astype(compute) * (cdf + xf * pdf)).astype(x.dtype),)


gelu.defvjp(_gelu_fwd, _gelu_bwd)
