"""ACmix (Pan et al., CVPR 2022, arXiv 2111.14556) in ResNet and Swin.

ACmix shares the expensive part of self-attention and convolution (spec
acmix.md §1):

* Stage I: three 1x1 projections give q, k, v (C channels each), read as 3N
  head maps of d = C / N channels.
* Stage II, two cheap consumers of the same 3N maps:
  - ``local_attention`` (ResNet flavour: 7x7 sliding windows with a relative
    position term) or ``window_attention`` (Swin flavour: 7x7 windows with a
    relative position bias table);
  - ``shift_conv_path``: an FC shared over the d channel positions maps the
    3N maps to k^2 = 9 maps (paper Eq. 12); shifting and summing them is a 3x3
    conv, done as one grouped 3x3 conv initialised to shift kernels (Fig. 3c).
* Output = rate1 * F_att + rate2 * F_conv (Eq. 13), learnable scalars.

Official quirks kept (spec §9): ``dep_conv`` has no bias (#1); ACmix-ResNet
re-initialises every conv kaiming fan-out, shift kernels included (#2,
``dep_conv_init``); the ResNet ``fc`` has no bias, the Swin one has (#13); the
attention keys are reflection-padded and border windows keep their duplicated
keys (#10); in shifted Swin blocks the conv path runs on the rolled map (#9).
Inputs the official code crashes on (stride 2 on odd sides, maps of 3 px or
less, #6/#7) raise a ValueError naming the smallest valid size. Module and
parameter names mirror the official state_dict so ``glmix_jax.convert`` is a
rename (spec §8). Layout is NHWC throughout.
"""

from __future__ import annotations

import functools
import itertools
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
SWIN_LN_EPS = 1e-5  # torch nn.LayerNorm default, used by every Swin norm
SWIN_PATCH = 4

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


def _weight_init(dep_conv_init: str, shift: bool) -> layers.Initializer | None:
  """Weight init of one ACmix conv under the ``dep_conv_init`` switch.

  ``'kaiming_fan_out'`` is what ACmix-ResNet's constructor leaves on every
  conv (quirk #2); ``'shift'`` keeps the module's own init: shift kernels on
  ``dep_conv`` and torch's default (None) elsewhere.
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
  stride ``stride``, no bias (quirk #1). One conv serves all shifts: no 9x
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
  f = HeadMapFC(fc_bias, _weight_init(dep_conv_init, shift=False),
                dtype=dtype, param_dtype=param_dtype, name='fc')(parts)
  return GroupedShiftConv(features, stride,
                          _weight_init(dep_conv_init, shift=True),
                          dtype=dtype, param_dtype=param_dtype,
                          name='dep_conv')(f)


# ---------------------------------------------------------------------------
# Stage II, attention path of the ResNet flavour.


def position_grid(height: int, width: int, dtype: Dtype) -> jax.Array:
  """(H, W, 2) pixel coordinates on [-1, 1]; channel 0 is x, channel 1 is y.

  A constant in the compute dtype, so bf16 models need no cast (the official
  float32 grid breaks under ``.half()``, quirk #4).
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
  """The ACmix module, ResNet flavour (torch ``ACmix``; spec §2).

  ``ACmix(in_planes, out_planes, kernel_att=7, head=4, kernel_conv=3, stride)``
  with the only kernel sizes the official code supports (quirk #8). Maps
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
    init = _weight_init(self.dep_conv_init, shift=False)
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
    return _mix(self, att, conv)


def _mix(module: nn.Module, att: jax.Array, conv: jax.Array) -> jax.Array:
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
# ACmix-ResNet (torchvision ResNet v1.5 with ACmix as every bottleneck 3x3).


class Bottleneck(nn.Module):
  """torch ``Bottleneck``: 1x1 -> ACmix(stride) -> 1x1 (x4), BN + ReLU.

  The projection shortcut (1x1 conv with the block's stride, then BN) is
  built when ``downsample`` is set, i.e. in the first block of each stage.
  """
  width: int
  out_features: int
  stride: int = 1
  downsample: bool = False
  heads: int = 4
  dep_conv_init: str = 'kaiming_fan_out'
  drop_path: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    init = _weight_init(self.dep_conv_init, shift=False)
    bn = lambda name: layers.batch_norm(train, name=name, **kw)
    conv1x1 = lambda features, stride, cin, name: layers.conv2d(
        features, 1, stride=stride, in_features=cin, use_bias=False,
        kernel_init=init, name=name, **kw)
    cin = x.shape[-1]
    y = nn.relu(bn('bn1')(conv1x1(self.width, 1, cin, 'conv1')(x)))
    y = ACmix(self.width, self.width, self.heads, self.stride,
              self.dep_conv_init, name='conv2', **kw)(y)
    y = nn.relu(bn('bn2')(y))
    y = bn('bn3')(conv1x1(self.out_features, 1, self.width, 'conv3')(y))
    shortcut = x
    if self.downsample:
      shortcut = bn('downsample_1')(conv1x1(self.out_features, self.stride,
                                            cin, 'downsample_0')(x))
    y = layers.DropPath(self.drop_path)(y, deterministic=not train)
    return nn.relu(shortcut + y)


RESNET_PLANES = (64, 128, 256, 512)
RESNET_STRIDES = (1, 2, 2, 2)
EXPANSION = 4


class ACmixResNet(nn.Module):
  """ACmix-ResNet (torch ``ACmix_ResNet``; spec §4).

  Stem 7x7/s2 conv -> BN -> ReLU -> 3x3/s2 max-pool, four stages of
  bottlenecks whose 3x3 conv is an ACmix module (stride on it, ResNet v1.5),
  global average pool, ``fc``. ``depths`` is the torch ``layers`` argument;
  ``width_per_group`` scales the bottleneck widths as in torchvision.
  ``__call__(images, train=False)`` returns logits, or ``(logits, features)``
  with NHWC maps ``'stem'`` (after the max-pool) and ``'stage1'`` ...
  ``'stage4'`` when ``return_features=True``.
  """
  num_classes: int = 1000
  depths: Sequence[int] = (3, 4, 6, 3)
  width_per_group: int = 64
  heads: int = 4
  dep_conv_init: str = 'kaiming_fan_out'  # what the official constructor does
  drop_path_rate: float = 0.0  # none in the official model
  in_channels: int = 3
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def min_image_size(self) -> int:
    """Smallest input side for which every ACmix map is valid."""
    return _smallest(self.size_problem)

  def size_problem(self, height: int, width: int) -> str | None:
    """Why an input size is invalid (None if valid), module by module."""
    sizes = np.array([height, width])
    sizes = (sizes - 1) // 2 + 1  # 7x7/s2 conv, padding 3
    sizes = (sizes - 1) // 2 + 1  # 3x3/s2 max-pool, padding 1
    for stage, (depth, stride) in enumerate(zip(self.depths, RESNET_STRIDES)):
      for block in range(depth):
        block_stride = stride if block == 0 else 1
        try:
          check_local_attention_size(*sizes, block_stride)
        except ValueError:
          return (f'the ACmix input of layer{stage + 1} block {block} would '
                  f'be {sizes[0]}x{sizes[1]} (stride {block_stride})')
        sizes //= block_stride
    return None

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool = False,
               return_features: bool = False):
    _check_images(self, images)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = layers.conv2d(64, 7, stride=2, padding=3, in_features=self.in_channels,
                      use_bias=False, kernel_init=kaiming_fan_out_init,
                      name='conv1', **kw)(images.astype(self.dtype))
    x = nn.relu(layers.batch_norm(train, name='bn1', **kw)(x))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    features = {'stem': x}
    drop_rates = iter(np.linspace(0.0, self.drop_path_rate, sum(self.depths)))
    for stage, (planes, depth, stride) in enumerate(
        zip(RESNET_PLANES, self.depths, RESNET_STRIDES)):
      width = planes * self.width_per_group // 64
      for block in range(depth):
        x = Bottleneck(
            width, planes * EXPANSION, stride if block == 0 else 1,
            downsample=block == 0, heads=self.heads,
            dep_conv_init=self.dep_conv_init,
            drop_path=float(next(drop_rates)),
            name=f'layer{stage + 1}_{block}', **kw)(x, train=train)
      features[f'stage{stage + 1}'] = x
    logits = layers.pointwise(self.num_classes, in_features=x.shape[-1],
                              name='fc', **kw)(jnp.mean(x, axis=(1, 2)))
    return (logits, features) if return_features else logits


# ---------------------------------------------------------------------------
# ACmix-Swin (Swin Transformer whose W-MSA/SW-MSA is WindowAttention_acmix).


def to_windows(x: jax.Array, window: int) -> jax.Array:
  """(B, H, W, ...) -> (B, nW, window^2, ...), windows and tokens row-major.

  Works on numpy arrays too (the shift mask is a numpy constant).
  """
  b, h, w, *rest = x.shape
  x = x.reshape(b, h // window, window, w // window, window, *rest)
  x = x.swapaxes(2, 3)
  return x.reshape(b, (h // window) * (w // window), window * window, *rest)


def from_windows(x: jax.Array, height: int, width: int) -> jax.Array:
  """Inverse of ``to_windows``: (B, nW, window^2, ...) -> (B, H, W, ...)."""
  b, _, tokens, *rest = x.shape
  window = math.isqrt(tokens)
  x = x.reshape(b, height // window, width // window, window, window, *rest)
  x = x.swapaxes(2, 3)
  return x.reshape(b, height, width, *rest)


@functools.lru_cache(maxsize=None)
def relative_position_index(window: int) -> np.ndarray:
  """(L, L) index into the (2w-1)^2 bias table, L = w^2 (Swin's buffer).

  Tokens p = (y1, x1), q = (y2, x2): (y1 - y2 + w - 1) * (2w - 1) + x1 - x2 +
  w - 1. Recomputed, never loaded.
  """
  coords = np.stack(np.meshgrid(np.arange(window), np.arange(window),
                                indexing='ij')).reshape(2, -1)
  rel = coords[:, :, None] - coords[:, None, :] + window - 1
  return rel[0] * (2 * window - 1) + rel[1]


@functools.lru_cache(maxsize=None)
def shifted_window_mask(height: int, width: int, window: int,
                        shift: int) -> np.ndarray:
  """(nW, L, L) SW-MSA mask: -100 between tokens of different regions.

  The rolled map is labelled with 9 regions (rows and columns each split at
  size - window and size - shift); inside a window, pairs from different
  regions must not attend. Recomputed, never loaded (torch ``attn_mask``).
  """
  labels = np.zeros((height, width), np.float32)
  bands = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
  for region, (rows, cols) in enumerate(itertools.product(bands, bands)):
    labels[rows, cols] = region
  windows = to_windows(labels[None, :, :, None], window)[0, ..., 0]
  differ = windows[:, None, :] != windows[:, :, None]
  return np.where(differ, -100.0, 0.0).astype(np.float32)


def window_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                     bias: jax.Array) -> jax.Array:
  """softmax(d^-1/2 q k^T + bias) v within each window (Swin W-MSA).

  q, k, v: (B, nW, L, N, d); bias: (nW or 1, N, L, L), the relative position
  bias plus the shift mask. Returns (B, nW, L, N, d).
  """
  scale = q.shape[-1]**-0.5
  logits = jnp.einsum('bwqnd,bwknd->bwnqk', q * scale, k) + bias
  attn = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
  return jnp.einsum('bwnqk,bwknd->bwqnd', attn, v)


class WindowAttentionACmix(nn.Module):
  """torch ``WindowAttention_acmix`` on a whole (possibly rolled) map (§3).

  qkv = Linear(C -> 3C); attention path = Swin window attention with the
  relative position bias table and ``proj``; conv path = ``shift_conv_path``
  on the whole map (FC with bias, stride 1, no output projection).
  Returns rate1 * proj(attention) + rate2 * conv, (B, H, W, C).
  """
  heads: int
  window: int
  dep_conv_init: str = 'shift'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: np.ndarray | None) -> jax.Array:
    b, h, w, c = x.shape
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    head_dim = c // self.heads
    qkv = layers.linear(3 * c, name='qkv', **kw)(x)
    qkv = qkv.reshape(b, h, w, 3, self.heads, head_dim)
    q, k, v = (qkv[:, :, :, i] for i in range(3))  # (B, H, W, N, d) each
    conv = shift_conv_path([q, k, v], features=c, stride=1, fc_bias=True,
                           dep_conv_init=self.dep_conv_init, **kw)

    table = self.param('relative_position_bias_table',
                       layers.timm_linear_kernel_init,
                       ((2 * self.window - 1)**2, self.heads),
                       self.param_dtype)
    bias = jnp.moveaxis(table[relative_position_index(self.window)], -1, 0)
    bias = bias[None] if mask is None else bias[None] + mask[:, None]
    q, k, v = (to_windows(t, self.window) for t in (q, k, v))
    att = window_attention(q, k, v, bias.astype(self.dtype))
    att = att.reshape(*att.shape[:3], c)
    att = from_windows(layers.linear(c, name='proj', **kw)(att), h, w)
    return _mix(self, att, conv)


class Mlp(nn.Module):
  """Swin's MLP: fc1 (C -> rC) -> exact GELU -> fc2 (rC -> C)."""
  hidden_features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    channels = x.shape[-1]
    x = layers.linear(self.hidden_features, name='fc1', **kw)(x)
    x = layers.gelu(x)
    return layers.linear(channels, name='fc2', **kw)(x)


class SwinBlock(nn.Module):
  """torch ``SwinTransformerBlock`` on (B, H, W, C) maps, pre-norm.

  y = LN1(x), rolled by -shift in shifted blocks; x <- x + DropPath(roll back
  of attn(y)); x <- x + DropPath(MLP(LN2(x))). The conv path inside ``attn``
  sees the rolled map (quirk #9: wrap-around at the image border).
  """
  heads: int
  window: int
  shift: int
  mlp_ratio: float = 4.0
  dep_conv_init: str = 'shift'
  drop_path: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    _, h, w, c = x.shape
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    drop = layers.DropPath(self.drop_path)
    y = layers.layer_norm(SWIN_LN_EPS, name='norm1', **kw)(x)
    mask = None
    if self.shift:
      y = jnp.roll(y, (-self.shift, -self.shift), axis=(1, 2))
      mask = shifted_window_mask(h, w, self.window, self.shift)
    y = WindowAttentionACmix(self.heads, self.window, self.dep_conv_init,
                             name='attn', **kw)(y, mask)
    if self.shift:
      y = jnp.roll(y, (self.shift, self.shift), axis=(1, 2))
    x = x + drop(y, deterministic=not train)
    y = layers.layer_norm(SWIN_LN_EPS, name='norm2', **kw)(x)
    y = Mlp(int(c * self.mlp_ratio), name='mlp', **kw)(y)
    return x + drop(y, deterministic=not train)


class PatchEmbed(nn.Module):
  """torch ``PatchEmbed``: 4x4/s4 conv (``proj``) then LayerNorm (``norm``)."""
  embed_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = layers.conv2d(self.embed_dim, SWIN_PATCH, stride=SWIN_PATCH,
                      in_features=x.shape[-1], name='proj', **kw)(x)
    return layers.layer_norm(SWIN_LN_EPS, name='norm', **kw)(x)


class PatchMerging(nn.Module):
  """torch ``PatchMerging``: 2x2 space-to-depth, LN(4C), Linear 4C -> 2C.

  Channel blocks in torch order: (even row, even col), (odd, even),
  (even, odd), (odd, odd). ``reduction`` has no bias.
  """
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    c = x.shape[-1]
    x = jnp.concatenate([x[:, 0::2, 0::2], x[:, 1::2, 0::2],
                         x[:, 0::2, 1::2], x[:, 1::2, 1::2]], axis=-1)
    x = layers.layer_norm(SWIN_LN_EPS, name='norm', **kw)(x)
    return layers.linear(2 * c, use_bias=False, name='reduction', **kw)(x)


def swin_window(height: int, width: int, window: int) -> tuple[int, int]:
  """(window, shift) of a stage: a map no larger than the window is attended
  globally (window = its side, no shift), as the official block decides."""
  if min(height, width) <= window:
    return min(height, width), 0
  return window, window // 2


class SwinStage(nn.Module):
  """torch ``BasicLayer``: blocks (W-MSA, then SW-MSA, alternating), then
  the optional PatchMerging ``downsample``. Returns (stage output before the
  merging, merged output)."""
  depth: int
  heads: int
  window: int
  downsample: bool
  drop_rates: tuple[float, ...]
  block_args: dict

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool):
    window, shift = swin_window(x.shape[1], x.shape[2], self.window)
    for j in range(self.depth):
      x = SwinBlock(self.heads, window, shift if j % 2 else 0,
                    drop_path=self.drop_rates[j], name=f'blocks_{j}',
                    **self.block_args)(x, train=train)
    if not self.downsample:
      return x, x
    return x, PatchMerging(name='downsample', dtype=self.block_args['dtype'],
                           param_dtype=self.block_args['param_dtype'])(x)


class ACmixSwin(nn.Module):
  """ACmix-Swin (torch ``SwinTransformer_acmix``; spec §3, §4).

  PatchEmbed (4x4/s4 + LN), four stages of Swin blocks with ACmix window
  attention (PatchMerging after stages 1-3), LN, token mean, ``head``. Drop
  path grows linearly over all blocks. ``__call__(images, train=False)``
  returns logits, or ``(logits, features)`` with NHWC maps ``'stem'`` (patch
  embedding) and ``'stage1'`` ... ``'stage4'`` (each stage's last block,
  before its PatchMerging) when ``return_features=True``.
  """
  num_classes: int = 1000
  embed_dim: int = 96
  depths: Sequence[int] = (2, 2, 6, 2)
  num_heads: Sequence[int] = (3, 6, 12, 24)
  window_size: int = 7
  mlp_ratio: float = 4.0
  dep_conv_init: str = 'shift'  # the official Swin keeps the shift kernels
  drop_path_rate: float = 0.2
  in_channels: int = 3
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def min_image_size(self) -> int:
    """Smallest input side whose every stage has whole windows."""
    return _smallest(self.size_problem, step=SWIN_PATCH)

  def size_problem(self, height: int, width: int) -> str | None:
    """Why an input size is invalid (None if valid), stage by stage."""
    if height % SWIN_PATCH or width % SWIN_PATCH:
      return f'a side is not a multiple of the patch size {SWIN_PATCH}'
    h, w = height // SWIN_PATCH, width // SWIN_PATCH
    for stage in range(len(self.depths)):
      window, _ = swin_window(h, w, self.window_size)
      if h % window or w % window:
        return (f'the stage {stage + 1} map ({h}x{w}) is not tiled by '
                f'{window}x{window} windows')
      if stage < len(self.depths) - 1:
        if h % 2 or w % 2:
          return (f'the stage {stage + 1} map ({h}x{w}) is odd before '
                  'PatchMerging')
        h, w = h // 2, w // 2
    return None

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool = False,
               return_features: bool = False):
    _check_images(self, images)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = PatchEmbed(self.embed_dim, name='patch_embed', **kw)(
        images.astype(self.dtype))
    features = {'stem': x}
    drop_rates = np.linspace(0.0, self.drop_path_rate, sum(self.depths))
    for i, (depth, heads) in enumerate(zip(self.depths, self.num_heads)):
      first = sum(self.depths[:i])
      stage_out, x = SwinStage(
          depth, heads, self.window_size,
          downsample=i < len(self.depths) - 1,
          drop_rates=tuple(float(r) for r in drop_rates[first:first + depth]),
          block_args=dict(mlp_ratio=self.mlp_ratio,
                          dep_conv_init=self.dep_conv_init, **kw),
          name=f'layers_{i}')(x, train=train)
      features[f'stage{i + 1}'] = stage_out
    x = layers.layer_norm(SWIN_LN_EPS, name='norm', **kw)(x)
    logits = layers.linear(self.num_classes, name='head', **kw)(
        jnp.mean(x, axis=(1, 2)))
    return (logits, features) if return_features else logits


# ---------------------------------------------------------------------------
# Input checks shared by both networks.


def _smallest(problem, step: int = 1, limit: int = 4096) -> int:
  """The smallest square side (a multiple of ``step``) with no ``problem``."""
  for side in range(step, limit + 1, step):
    if problem(side, side) is None:
      return side
  raise ValueError(f'No valid input side up to {limit}.')


def _check_images(model: nn.Module, images: jax.Array):
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
# Variants (spec §4, §5). One table per module class.

MODULE_VARIANTS: dict[str, dict] = {
    # The standalone module at ResNet-50 layer1 width (for module-level
    # weight import and tests).
    'acmix_module': dict(in_channels=64, features=64),
}

RESNET_VARIANTS: dict[str, dict] = {
    'acmix_resnet26': dict(depths=(1, 2, 4, 1)),
    'acmix_resnet38': dict(depths=(2, 3, 5, 2)),
    'acmix_resnet50': dict(depths=(3, 4, 6, 3)),
}

_SWIN = dict(embed_dim=96, num_heads=(3, 6, 12, 24), window_size=7)

SWIN_VARIANTS: dict[str, dict] = {
    'acmix_swin_t': dict(_SWIN, depths=(2, 2, 6, 2), drop_path_rate=0.2),
    'acmix_swin_s': dict(_SWIN, depths=(2, 2, 18, 2), drop_path_rate=0.3),
}
