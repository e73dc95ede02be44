"""The ACmix module (Pan et al., CVPR 2022, arXiv 2111.14556), shared by
ACmix-ResNet (``acmix_resnet``) and ACmix-Swin (``acmix_swin``).

ACmix shares the expensive part of self-attention and convolution (paper
Fig. 2):

* Stage I: three 1x1 projections give q, k, v (C channels each), read as 3N
  head maps of d = C / N channels.
* Stage II, two cheap consumers of the same 3N maps:
  - ``local_attention`` (ResNet flavour: 7x7 sliding windows with a relative
    position term, Eq. 5) or ``acmix_swin.window_attention`` (Swin flavour:
    7x7 windows with a relative position bias table);
  - ``shift_conv_path``: an FC shared over the d channel positions maps the
    3N maps to k^2 = 9 maps (Eq. 12); shifting and summing them is a 3x3
    conv, done as one grouped 3x3 conv initialised to shift kernels (Fig. 3c).
* Output = rate1 * F_att + rate2 * F_conv (Eq. 13), learnable scalars.

Official quirks kept (``ResNet/test_bottleneck.py::ACmix``,
``Swin-Transformer/models/swin_transformer_acmix.py::WindowAttention_acmix``):
``dep_conv`` has no bias (both files declare one, then assign the ``None``
that their zero-fill helper returns, which de-registers it); the attention
keys are reflection-padded and border windows keep their duplicated keys;
only kernel_att = 7 and kernel_conv = 3 work there, so only they are offered.
Inputs the official module crashes on (stride 2 on odd sides, maps of 3 px or
less) raise a ValueError naming the smallest valid size. Module and parameter
names mirror the official state_dict so that ``glmix_jax.convert`` is a
rename. Layout is NHWC throughout.
"""

from __future__ import annotations

import math
import re
from typing import Any, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from glmix_jax.models import kernels, layers

Dtype = Any

ATT_KERNEL = kernels.ATT_KERNEL  # k_att: the ResNet flavour's 7x7 window
ATT_PAD = kernels.ATT_PAD  # reflection padding; maps must be larger than it
SHIFTS = 9  # k_conv^2: the conv path is a 3x3 conv, i.e. nine shifted maps
DEP_CONV_INITS = ('shift', 'kaiming_fan_out')

# torch kaiming_normal_(mode='fan_out', nonlinearity='relu'): N(0, 2/fan_out)
# with fan_out = O * kh * kw (groups ignored), plain (not truncated) normal.
kaiming_fan_out_init = nn.initializers.variance_scaling(2.0, 'fan_out',
                                                        'normal')


def shift_kernel_init(key, shape, dtype=jnp.float32) -> jax.Array:
  """Grouped-conv kernel (3, 3, 9, O) of one-hot shifts, W[p, q, t, o] =
  [t == 3p + q] (torch ``reset_parameters`` of ``dep_conv``).

  Map t of a group is read at offset (p - 1, q - 1): with the k^2 FC in front,
  this is exactly a 3x3 convolution (paper Fig. 3c-III).
  """
  del key
  kh, kw, taps, _ = shape
  one_hot = jnp.eye(taps, dtype=dtype).reshape(kh, kw, taps, 1)
  return jnp.broadcast_to(one_hot, shape)


def weight_init(dep_conv_init: str, shift: bool) -> layers.Initializer | None:
  """Weight init of one ACmix conv under the ``dep_conv_init`` switch.

  ``'kaiming_fan_out'`` is what ACmix-ResNet's constructor
  (``ResNet_ImageNet.py``) leaves on every conv; ``'shift'`` keeps the
  module's own init: shift kernels on ``dep_conv`` and torch's default
  (None) elsewhere.
  """
  if dep_conv_init not in DEP_CONV_INITS:
    raise ValueError(f'Unknown dep_conv_init {dep_conv_init!r}; choose from '
                     f'{DEP_CONV_INITS}.')
  if dep_conv_init == 'kaiming_fan_out':
    return kaiming_fan_out_init
  return shift_kernel_init if shift else None


# ---------------------------------------------------------------------------
# Stage II, convolution path (shared by both flavours).


class HeadMapFC(nn.Module):
  """The conv path's FC (torch ``fc``, a 1x1 conv 3N -> 9): Eq. 12's weights.

  f[..., c, t] = sum_m W[m, t] F_m[..., c] (+ b[t]) over the 3N head maps
  m = part * N + head, shared by all d channel positions c. Parts (q, k, v)
  come as separate (..., N, d) arrays, so no stacked 3N copy is built
  (``kernels.head_map_fc``). Returns (..., d, 9).
  """
  use_bias: bool
  kernel_init: layers.Initializer | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, parts: Sequence[jax.Array]) -> jax.Array:
    fan_in = len(parts) * parts[0].shape[-2]
    kernel = self.param('kernel',
                        self.kernel_init or layers.torch_default_kernel_init,
                        (fan_in, SHIFTS), self.param_dtype)
    out = kernels.head_map_fc(tuple(p.astype(self.dtype) for p in parts),
                              kernel.astype(self.dtype))
    if self.use_bias:
      bias = self.param('bias', layers.torch_default_bias_init(fan_in),
                        (SHIFTS,), self.param_dtype)
      out = out + bias.astype(self.dtype)
    return out


class GroupedShiftConv(nn.Module):
  """torch ``dep_conv``: 3x3 conv, d groups of 9 inputs -> N outputs each.

  Input f (B, H, W, d, 9) is torch's 9d channels c * 9 + t; output channel
  o = c * N + j (group-major), exactly XLA's contiguous channel grouping, so
  the kernel (3, 3, 9, C) is torch's (C, 9, 3, 3) transposed. Zero padding 1,
  stride ``stride``, no bias (the official quirk). One conv serves all shifts: no 9x
  copy of f is made (``kernels.grouped_shift_conv``).
  """
  features: int
  stride: int = 1
  kernel_init: layers.Initializer = shift_kernel_init
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, f: jax.Array) -> jax.Array:
    taps = f.shape[-1]
    kernel = self.param('kernel', self.kernel_init,
                        (3, 3, taps, self.features), self.param_dtype)
    return kernels.grouped_shift_conv(f.astype(self.dtype),
                                      kernel.astype(self.dtype), self.stride)


def shift_conv_path(parts: Sequence[jax.Array], *, features: int,
                    stride: int, fc_bias: bool, dep_conv_init: str,
                    dtype: Dtype, param_dtype: Dtype) -> jax.Array:
  """Conv path: FC 3N -> 9 per channel position, then the grouped shift conv.

  Call it from a compact method: ``fc`` and ``dep_conv`` become children of
  the caller, as in torch. ``parts`` are q, k, v as (B, H, W, N, d), q
  unscaled. Returns (B, H // stride, W // stride, features).
  """
  f = HeadMapFC(fc_bias, weight_init(dep_conv_init, shift=False),
                dtype=dtype, param_dtype=param_dtype, name='fc')(parts)
  return GroupedShiftConv(features, stride,
                          weight_init(dep_conv_init, shift=True),
                          dtype=dtype, param_dtype=param_dtype,
                          name='dep_conv')(f)


# ---------------------------------------------------------------------------
# Stage II, attention path of the ResNet flavour.


def position_grid(height: int, width: int, dtype: Dtype) -> jax.Array:
  """(H, W, 2) pixel coordinates on [-1, 1]; channel 0 is x, channel 1 is y.

  A constant in the compute dtype, so bf16 models need no cast (the official
  float32 grid of ``position()`` breaks under ``.half()``).
  """
  xs = np.linspace(-1.0, 1.0, width, dtype=np.float32)
  ys = np.linspace(-1.0, 1.0, height, dtype=np.float32)
  return jnp.asarray(np.stack(np.meshgrid(xs, ys), axis=-1), dtype)


def check_local_attention_size(height: int, width: int, stride: int):
  """Raise a ValueError for a map the official 7x7 local attention rejects."""
  if stride not in (1, 2):
    raise ValueError(f'ACmix supports stride 1 or 2, got {stride}.')
  smallest = 2 * math.ceil((ATT_PAD + 1) / 2)  # > ATT_PAD and even
  if min(height, width) <= ATT_PAD:
    raise ValueError(
        f'ACmix local attention needs every map side > {ATT_PAD} (reflection '
        f'padding by {ATT_PAD}), got {height}x{width}; the smallest valid '
        f'size is {smallest}x{smallest}.')
  if stride == 2 and (height % 2 or width % 2):
    raise ValueError(
        f'A stride-2 ACmix module needs even map sides (the official code '
        f'crashes on odd ones), got {height}x{width}; the smallest valid size '
        f'is {smallest}x{smallest}.')


def local_attention(q: jax.Array, k: jax.Array, v: jax.Array, pe: jax.Array,
                    *, heads: int, stride: int) -> jax.Array:
  """7x7 sliding-window attention with relative positions (paper Eq. 5),
  ``kernels.local_attention``, on maps the official module accepts."""
  check_local_attention_size(*q.shape[1:3], stride)
  return kernels.local_attention(q, k, v, pe, heads=heads, stride=stride)


class ACmix(nn.Module):
  """The ACmix module, ResNet flavour (official ``ResNet/test_bottleneck.py::ACmix``).

  ``ACmix(in_planes, out_planes, kernel_att=7, head=4, kernel_conv=3, stride)``
  with the only kernel sizes the official code supports (its padding is hard-coded for them). Maps
  (B, H, W, in_channels) -> (B, H // stride, W // stride, features) as
  rate1 * local_attention + rate2 * shift_conv_path. Stride is applied late:
  q, k, v and the FC run at the input resolution. Sows q, k, v and the conv
  path (before rate2) into ``intermediates``.
  """
  in_channels: int
  features: int
  heads: int = 4
  stride: int = 1
  dep_conv_init: str = 'shift'  # the standalone module; ACmix-ResNet: kaiming
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def min_image_size(self) -> int:
    """Smallest input side the official module accepts."""
    return ATT_PAD + 1

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if x.ndim != 4 or x.shape[-1] != self.in_channels:
      raise ValueError(f'ACmix expects (B, H, W, {self.in_channels}) inputs, '
                       f'got shape {x.shape}.')
    if self.features % self.heads:
      raise ValueError(f'features={self.features} is not a multiple of '
                       f'heads={self.heads}.')
    h, w = x.shape[1:3]
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    init = weight_init(self.dep_conv_init, shift=False)
    head_dim = self.features // self.heads
    x = x.astype(self.dtype)
    q, k, v = (layers.pointwise(self.features, in_features=self.in_channels,
                                kernel_init=init, name=name, **kw)(x)
               for name in ('conv1', 'conv2', 'conv3'))
    for name, value in (('q', q), ('k', k), ('v', v)):
      self.sow('intermediates', name, value)

    pe = layers.pointwise(head_dim, in_features=2, kernel_init=init,
                          name='conv_p', **kw)(
                              position_grid(h, w, self.dtype))
    att = local_attention(q, k, v, pe, heads=self.heads, stride=self.stride)

    split = lambda t: t.reshape(*t.shape[:-1], self.heads, head_dim)
    conv = shift_conv_path(
        [split(q), split(k), split(v)], features=self.features,
        stride=self.stride, fc_bias=False, dep_conv_init=self.dep_conv_init,
        **kw)
    self.sow('intermediates', 'conv_path', conv)
    return mix_paths(self, att, conv)


def mix_paths(module: nn.Module, att: jax.Array, conv: jax.Array) -> jax.Array:
  """rate1 * att + rate2 * conv (Eq. 13), rates (1,) initialised to 0.5.

  Call it from a compact method: the rates become params of ``module``.
  """
  rate1, rate2 = (module.param(name, nn.initializers.constant(0.5), (1,),
                               module.param_dtype).astype(att.dtype)
                  for name in ('rate1', 'rate2'))
  return rate1 * att + rate2 * conv


def path_rates(params: Any) -> dict[str, tuple[float, float]]:
  """(rate1, rate2) of every ACmix layer in a params tree, by module path
  (``'layer3_0/conv2'``) in network order (numbered names sort as numbers):
  rate1 weighs the attention path, rate2 the convolution path (Eq. 13)."""
  flat = flax.traverse_util.flatten_dict(params, sep='/')
  layers_ = [path[:-len('/rate1')] for path in flat if path.endswith('/rate1')]
  natural = lambda path: [int(t) if t.isdigit() else t
                          for t in re.split(r'(\d+)', path)]
  return {path: (float(np.ravel(flat[f'{path}/rate1'])[0]),
                 float(np.ravel(flat[f'{path}/rate2'])[0]))
          for path in sorted(layers_, key=natural)}


# ---------------------------------------------------------------------------
# Input checks shared by both networks (``acmix_resnet``, ``acmix_swin``).


def smallest_valid_side(problem, step: int = 1, limit: int = 4096) -> int:
  """The smallest square side (a multiple of ``step``) with no ``problem``."""
  for side in range(step, limit + 1, step):
    if problem(side, side) is None:
      return side
  raise ValueError(f'No valid input side up to {limit}.')


def check_images(model: nn.Module, images: jax.Array):
  """NHWC with the model's channels and a size without ``size_problem``."""
  name = type(model).__name__
  if images.ndim != 4 or images.shape[-1] != model.in_channels:
    raise ValueError(f'{name} expects NHWC images (B, H, W, '
                     f'{model.in_channels}), got shape {images.shape}.')
  problem = model.size_problem(*images.shape[1:3])
  if problem is not None:
    smallest = model.min_image_size()
    raise ValueError(
        f'Image size {images.shape[1]}x{images.shape[2]} is not valid for '
        f'this {name}: {problem}. The smallest valid size is '
        f'{smallest}x{smallest}.')


# ---------------------------------------------------------------------------
# The registry's entry for the standalone module.

MODULE_VARIANTS: dict[str, dict] = {
    # The standalone module at ResNet-50 layer1 width (for module-level
    # weight import and tests).
    'acmix_module': dict(in_channels=64, features=64),
}
