"""ACmix-Swin (Pan et al., CVPR 2022): Swin Transformer whose W-MSA / SW-MSA is ``WindowAttentionACmix``, window attention and the
ACmix convolution path on the same q, k, v (official
``Swin-Transformer/models/swin_transformer_acmix.py``).

Official quirks kept: the conv path's FC has a bias (the ResNet one has
not); the shift kernels keep their init (Swin's ``_init_weights`` touches
only Linear and LayerNorm); in shifted blocks the conv path runs on the
rolled map, so it wraps around at the image border. Names mirror the
official state_dict (``layers.0.blocks.1.attn.*`` becomes
``layers_0/blocks_1/attn/*``).
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import Any, ClassVar, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from glmix_jax.models import acmix, kernels, layers

Dtype = Any

SWIN_LN_EPS = 1e-5  # torch nn.LayerNorm default, used by every Swin norm
SWIN_PATCH = 4

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
  """torch ``WindowAttention_acmix`` on a whole (possibly rolled) map.

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
    conv = acmix.shift_conv_path([q, k, v], features=c, stride=1, fc_bias=True,
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
    return acmix.mix_paths(self, att, conv)


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
    x = kernels.gelu(x)
    return layers.linear(channels, name='fc2', **kw)(x)


class SwinBlock(nn.Module):
  """torch ``SwinTransformerBlock`` on (B, H, W, C) maps, pre-norm.

  y = LN1(x), rolled by -shift in shifted blocks; x <- x + DropPath(roll back
  of attn(y)); x <- x + DropPath(MLP(LN2(x))). The conv path inside ``attn``
  sees the rolled map (an official quirk: it wraps around at the image border).
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
  """ACmix-Swin (official ``SwinTransformer_acmix``).

  PatchEmbed (4x4/s4 + LN), four stages of Swin blocks with ACmix window
  attention (PatchMerging after stages 1-3), LN, token mean, ``head``. Drop
  path grows linearly over all blocks. ``__call__(images, train=False)``
  returns logits, or ``(logits, features)`` with NHWC maps ``'stem'`` (patch
  embedding) and ``'stage1'`` ... ``'stage4'`` (each stage's last block,
  before its PatchMerging) and the pooled ``'pre_logits'`` (B, C) that
  ``head`` reads when ``return_features=True``.
  """
  # The classifier's parameters (top level): what fine-tuning re-creates.
  CLASSIFIERS: ClassVar[tuple[str, ...]] = ('head',)
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

  def layer_index(self, path: Sequence[str]) -> int:
    """A parameter's layer for layer-wise lr decay (``optim.layer_decay``;
    the ACmix code has none): GLNet's rule (ConvNeXt-V2's
    ``get_num_layer_for_convnext_single``) on Swin's parts, the patch
    embedding 1, block j of stage i sum(depths[:i]) + j + 1, the PatchMerging
    after stage i (the next stage's downsampling, like ConvNeXt's)
    sum(depths[:i + 1]) + 1, the final norm and ``head`` sum(depths) + 1."""
    top = path[0]
    if top == 'patch_embed':
      return 1
    if top.startswith('layers_'):
      stage = int(top.removeprefix('layers_'))
      if path[1] == 'downsample':
        return sum(self.depths[:stage + 1]) + 1
      return sum(self.depths[:stage]) + int(path[1].removeprefix('blocks_')) + 1
    return sum(self.depths) + 1

  def min_image_size(self) -> int:
    """Smallest input side whose every stage has whole windows."""
    return acmix.smallest_valid_side(self.size_problem, step=SWIN_PATCH)

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
    acmix.check_images(self, images)
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
    features['pre_logits'] = jnp.mean(x, axis=(1, 2))
    logits = layers.linear(self.num_classes, name='head', **kw)(
        features['pre_logits'])
    return (logits, features) if return_features else logits


# The official configs/acmix_swin_{tiny,small}_patch4_window7_224.yaml.
_SWIN = dict(embed_dim=96, num_heads=(3, 6, 12, 24), window_size=7)

VARIANTS: dict[str, dict] = {
    'acmix_swin_t': dict(_SWIN, depths=(2, 2, 6, 2), drop_path_rate=0.2),
    'acmix_swin_s': dict(_SWIN, depths=(2, 2, 18, 2), drop_path_rate=0.3),
}
