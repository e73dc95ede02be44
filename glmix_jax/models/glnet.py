"""GLNet and its GLMix block (Zhu et al., NeurIPS 2024, arXiv 2411.14429).

GLMix splits token mixing into two branches that are added (official
``models/glnet.py::GLMixBlock``; the paper's GLMix block):

* a *global* branch on a small set of S = 64 semantic slots. Slots start as an
  8x8 adaptive average pool of the block input (or a learned table). One logit
  matrix A = alpha * unit(Z0) unit(F)^T (S x N) serves both directions:
  ``soft_cluster`` (softmax over the N pixels: each slot is a convex combination
  of pixel features), plain multi-head attention among the slots, and
  ``dispatch`` (softmax over the S slots: each pixel reads a convex combination
  of the updated slots). Cost is linear in N.
* a *local* branch on the pixel grid: PW -> DW5x5 -> PW, no activation.

Official quirks kept (``models/glnet.py``): slots come from the raw block input, before
the CPE and the norm; similarity uses unit-normalised LN features but the
clustering aggregates the un-normalised ones; one scalar alpha per block; no
residual, norm or MLP on the slots; the final norm is BatchNorm; adaptive-pool
bins overlap when 8 does not divide the map side, exactly as PyTorch's; GLNet-STL
has no position encoding. Module and parameter names mirror the official
state_dict so that ``glmix_jax.convert`` is a rename.

Layout is NHWC throughout; maps are flattened row-major (n = y * W + x).
"""

from __future__ import annotations

import functools
from typing import Any, ClassVar, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from glmix_jax.models import kernels, layers

Dtype = Any

LN_EPS = 1e-6  # every LayerNorm / LayerNorm2d in GLNet

# Stage mixers (official ``mixing_modes`` in brackets):
#   'glmix'      GLMix blocks                                    ['glmix']
#   'mhsa'       ViT blocks on (B, N, C) tokens (GLNet-STL stage 4) ['mha']
#   'mhsa_conv'  attention blocks with CPE and the conv MLP       ['mha_nchw']
#   'hybrid'     GLMix at even, 'mhsa_conv' at odd block indices ['glmix.mha_nchw']
MIXERS = ('glmix', 'mhsa', 'mhsa_conv', 'hybrid')
STEMS = ('patchify', 'overlapping')
SLOT_INITS = ('pool', 'learned')

# Activation rematerialisation (``GLNet.remat``): what each block keeps from
# its forward pass for the backward pass; the rest is recomputed there. Trades
# compute for activation memory; outputs and gradients do not change.
REMAT_POLICIES = {
    'none': None,  # no rematerialisation: keep every residual (the default)
    'full': jax.checkpoint_policies.nothing_saveable,  # keep block inputs only
    'dots_saveable': jax.checkpoint_policies.dots_saveable,  # + matmul outputs
    'dots_with_no_batch_dims_saveable':
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


# ---------------------------------------------------------------------------
# The slot operations, as pure functions.


@functools.lru_cache(maxsize=None)
def adaptive_pool_matrix(size: int, bins: int) -> np.ndarray:
  """(bins, size) averaging matrix of PyTorch's AdaptiveAvgPool1d.

  Bin i covers [floor(i*size/bins), ceil((i+1)*size/bins)): bins overlap when
  ``bins`` does not divide ``size``, and repeat pixels when size < bins.
  """
  matrix = np.zeros((bins, size), np.float32)
  for i in range(bins):
    start = (i * size) // bins
    end = -((-(i + 1) * size) // bins)
    matrix[i, start:end] = 1.0 / (end - start)
  return matrix


def adaptive_avg_pool(x: jax.Array, grid: int) -> jax.Array:
  """(B, H, W, C) -> (B, grid, grid, C) with PyTorch's adaptive-pool bins."""
  b, h, w, c = x.shape
  if h % grid == 0 and w % grid == 0:
    # Equal, disjoint bins (GLNet-STL's first stage at 224 px): the mean of
    # each window, in one pass over x, as PyTorch computes it. The product
    # form below transposes the whole map first on XLA:CPU: 4-6 ms of a
    # 65-73 ms block forward there (BENCHMARKS.md, 2026-12-07).
    return x.reshape(b, grid, h // grid, grid, w // grid, c).mean(axis=(2, 4))
  rows = adaptive_pool_matrix(h, grid)
  cols = adaptive_pool_matrix(w, grid)
  # Pooling, not a learned contraction: PyTorch's counters skip it too.
  # HIGHEST: float32 means float32 on GPU (not TF32) and TPU (not bf16
  # passes), as for the slot logits these initial slots feed.
  with jax.named_scope(layers.UNCOUNTED_MACS_SCOPE):
    return jnp.einsum('ih,jw,bhwc->bijc', rows, cols, x,
                      precision=jax.lax.Precision.HIGHEST)


def unit(v: jax.Array) -> jax.Array:
  """v / max(||v||_2, 1e-12) over the last axis (torch ``F.normalize``)."""
  norm = jnp.sqrt(jnp.sum(jnp.square(v), axis=-1, keepdims=True))
  return v / jnp.maximum(norm, 1e-12)


def slot_logits(init_slots: jax.Array, features: jax.Array,
                scale: jax.Array) -> jax.Array:
  """A = scale * unit(Z0) unit(F)^T, (B, S, C) x (B, N, C) -> (B, S, N), f32.

  In float32 at full precision whatever the compute dtype: the softmaxes of
  ``soft_cluster`` and ``dispatch`` read these logits, scaled by up to
  ``slot_scale``, where a TF32 or bf16 product's 1e-3 relative error would
  move the clustering.
  """
  z = unit(init_slots.astype(jnp.float32))
  f = unit(features.astype(jnp.float32))
  return scale * jnp.einsum('bsc,bnc->bsn', z, f,
                            precision=jax.lax.Precision.HIGHEST)


def soft_cluster(logits: jax.Array, features: jax.Array) -> jax.Array:
  """Slots as convex combinations of pixels: softmax_N(A) F -> (B, S, C)."""
  weights = jax.nn.softmax(logits, axis=-1).astype(features.dtype)
  return jnp.einsum('bsn,bnc->bsc', weights, features)


def dispatch(logits: jax.Array, slots: jax.Array) -> jax.Array:
  """Pixels as convex combinations of slots: softmax_S(A)^T Z' -> (B, N, C)."""
  weights = jax.nn.softmax(logits, axis=1).astype(slots.dtype)
  return jnp.einsum('bsn,bsc->bnc', weights, slots)


# ---------------------------------------------------------------------------
# Blocks.


class GLMixBlock(nn.Module):
  """One GLMix block, official ``GLMixBlock``; (B, H, W, C) -> same.

  X <- X + CPE(X) (optional); U <- X; Y <- LN1(X)
  X <- U + DropPath(ls1 * (dispatch(A, MHA(soft_cluster(A, Y))) + local(Y)))
  X <- X + DropPath(ls2 * MLP(LN2(X)))
  """
  head_dim: int = 32
  num_slots: int = 64
  slot_init: str = 'pool'  # 'pool' (8x8 adaptive avg-pool) | 'learned'
  local_kernel_size: int = 5
  mlp_ratio: float = 4.0
  cpe_kernel_size: int = 0  # 0: no conv position encoding
  mlp_dw: bool = False
  layer_scale_init: float | None = None
  drop_path: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    b, h, w, c = x.shape
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)

    if self.slot_init == 'pool':  # from the raw block input, before CPE and norm (official)
      grid = int(np.sqrt(self.num_slots))
      init_slots = adaptive_avg_pool(x.astype(jnp.float32), grid)
      init_slots = init_slots.reshape(b, self.num_slots, c)
    else:
      init_slots = self.param('init_slots', nn.initializers.normal(0.02),
                              (1, self.num_slots, c), self.param_dtype)
      init_slots = jnp.broadcast_to(init_slots, (b, self.num_slots, c))
    scale = self.param('slot_scale', nn.initializers.constant(c**-0.5), (),
                       self.param_dtype)

    if self.cpe_kernel_size:
      x = x + layers.depthwise_conv(x, self.cpe_kernel_size, name='pos_conv',
                                    **kw)
    shortcut = x
    y = layers.layer_norm(LN_EPS, name='norm1', **kw)(x)
    features = y.reshape(b, h * w, c)

    logits = slot_logits(init_slots, features, scale)  # (B, S, N)
    slots = soft_cluster(logits, features)
    slots = layers.MultiHeadAttention(self.head_dim, name='relation_mha',
                                      **kw)(slots)
    global_branch = dispatch(logits, slots).reshape(b, h, w, c)
    self.sow('intermediates', 'slot_logits', logits)

    local = layers.pointwise(c, in_features=c, name='feature_conv_0', **kw)(y)
    local = layers.depthwise_conv(local, self.local_kernel_size,
                                  name='feature_conv_1', **kw)
    local = layers.pointwise(c, in_features=c, name='feature_conv_2',
                             **kw)(local)

    residual = functools.partial(
        layers.residual_branch, layer_scale_init=self.layer_scale_init,
        drop_path=self.drop_path, train=train, param_dtype=self.param_dtype)
    x = shortcut + residual(global_branch + local, layer_scale_name='ls1')
    mlp = layers.conv_mlp(layers.layer_norm(LN_EPS, name='norm2', **kw)(x),
                          hidden_features=int(self.mlp_ratio * c),
                          residual_dw=self.mlp_dw, **kw)
    return x + residual(mlp, layer_scale_name='ls2')


class MHSABlock(nn.Module):
  """Pre-norm ViT block on (B, N, C) tokens, official ``MHSA_Block``.

  t <- t + DropPath(MHA(LN1(t))); t <- t + DropPath(MLP(LN2(t))) with a Linear
  GELU MLP. GLNet-STL stage 4; no position encoding.
  """
  head_dim: int = 32
  mlp_ratio: float = 4.0
  drop_path: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, t: jax.Array, train: bool) -> jax.Array:
    c = t.shape[-1]
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    drop = layers.DropPath(self.drop_path)
    a = layers.layer_norm(LN_EPS, name='norm1', **kw)(t)
    a = layers.MultiHeadAttention(self.head_dim, name='mha_op', **kw)(a)
    t = t + drop(a, deterministic=not train)
    m = layers.layer_norm(LN_EPS, name='norm2', **kw)(t)
    m = layers.linear(int(self.mlp_ratio * c), name='mlp_0', **kw)(m)
    m = layers.linear(c, name='mlp_2', **kw)(kernels.gelu(m))
    return t + drop(m, deterministic=not train)


class MHSAConvBlock(nn.Module):
  """Full attention with CPE and the conv MLP, ``MHSA_NCHW_Block``.

  X <- X + DW3x3(X); X <- X + DropPath(ls1 * MHA(LN1(X))) over all H*W tokens;
  X <- X + DropPath(ls2 * ConvMLP(LN2(X))). Quadratic in H*W.
  """
  head_dim: int = 32
  mlp_ratio: float = 3.0
  cpe_kernel_size: int = 3
  mlp_dw: bool = True
  layer_scale_init: float | None = None
  drop_path: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    b, h, w, c = x.shape
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if self.cpe_kernel_size:
      x = x + layers.depthwise_conv(x, self.cpe_kernel_size, name='pos_conv',
                                    **kw)
    a = layers.layer_norm(LN_EPS, name='norm1', **kw)(x).reshape(b, h * w, c)
    a = layers.MultiHeadAttention(self.head_dim, name='mha_op', **kw)(a)
    residual = functools.partial(
        layers.residual_branch, layer_scale_init=self.layer_scale_init,
        drop_path=self.drop_path, train=train, param_dtype=self.param_dtype)
    x = x + residual(a.reshape(b, h, w, c), layer_scale_name='ls1')
    m = layers.conv_mlp(layers.layer_norm(LN_EPS, name='norm2', **kw)(x),
                        hidden_features=int(self.mlp_ratio * c),
                        residual_dw=self.mlp_dw, **kw)
    return x + residual(m, layer_scale_name='ls2')


# ---------------------------------------------------------------------------
# The network.


class GLNet(nn.Module):
  """GLNet (official ``GLNet``): stem, four stages with transitions, BN, pool,
  linear.

  ``__call__(images, train=False)`` takes NHWC images of any size the official
  model accepts and returns logits (B, num_classes). With
  ``return_features=True`` it returns ``(logits, features)``, where features
  holds the NHWC maps ``'stem'`` and ``'stage1'`` ... ``'stage4'``, and
  ``'pre_logits'`` (B, C): the pooled vector ``head`` reads (few-shot probes).

  ``token_label_head=True`` gives the token-labeling variants (official
  ``models/glnet_tklb.py::GLNet_tklb``): an auxiliary linear head on every
  final token, and the output head(mean token) + 0.5 * max over tokens of
  the aux logits. They evaluate only (``train=True`` raises a ValueError):
  their training needs MixToken and dense teacher labels.
  """
  # The classifier's parameters (top level): what fine-tuning re-creates.
  CLASSIFIERS: ClassVar[tuple[str, ...]] = ('head', 'tklb_aux_head')
  num_classes: int = 1000
  dims: Sequence[int] = (96, 192, 384, 768)
  depths: Sequence[int] = (2, 2, 6, 2)
  mixers: Sequence[str] = ('glmix', 'glmix', 'glmix', 'mhsa')
  mlp_ratio: float = 4.0
  stem: str = 'patchify'  # 'patchify': 4x4/s4 + 2x2/s2 | 'overlapping': 3x3/s2
  head_dim: int = 32
  num_slots: int = 64
  slot_init: str = 'pool'
  local_kernel_size: int = 5
  cpe_kernel_size: int = 0
  mlp_dw: bool = False
  layer_scale_init: float | None = None
  token_label_head: bool = False
  drop_path_rate: float = 0.0
  in_channels: int = 3
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  # Speed / memory options; none changes outputs or the parameter tree.
  remat: str = 'none'  # a REMAT_POLICIES name, applied to every block
  # nn.scan over each stage's repeated blocks (compiled once). On XLA:CPU it
  # lowers the train step's peak memory, not its compile time (BENCHMARKS.md).
  scan_blocks: bool = False

  def __post_init__(self):
    self._check_fields()
    super().__post_init__()

  def _check_fields(self):
    if len(self.dims) != 4 or len(self.depths) != 4 or len(self.mixers) != 4:
      raise ValueError('GLNet needs 4 stages: dims, depths and mixers must each '
                       f'have 4 entries, got {self.dims}, {self.depths}, '
                       f'{self.mixers}.')
    for mixer in self.mixers:
      if mixer not in MIXERS:
        raise ValueError(f'Unknown mixer {mixer!r}; choose from {MIXERS}.')
    if self.stem not in STEMS:
      raise ValueError(f'Unknown stem {self.stem!r}; choose from {STEMS}.')
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f'Unknown remat policy {self.remat!r}; choose from '
                       f'{tuple(REMAT_POLICIES)}.')
    if self.slot_init not in SLOT_INITS:
      raise ValueError(f'Unknown slot_init {self.slot_init!r}; choose from '
                       f'{SLOT_INITS}.')
    if int(np.sqrt(self.num_slots))**2 != self.num_slots:
      raise ValueError(f'num_slots={self.num_slots} must be a perfect square '
                       '(slots come from a square adaptive-pool grid).')
    for dim in self.dims:
      if dim % self.head_dim:
        raise ValueError(f'Stage width {dim} is not a multiple of head_dim='
                         f'{self.head_dim}.')

  def layer_index(self, path: Sequence[str]) -> int:
    """A parameter's layer for layer-wise lr decay (``optim.layer_decay``):
    the rule of ConvNeXt-V2's ``get_num_layer_for_convnext_single``, the helper GLMix's
    ``main_cx2.py`` imports (its layer-decay block is left commented out
    there: the helper reads ``int('blocks')`` from GLNet's names): the stem 1, stage i's transition
    sum(depths[:i]) + 1, its block j sum(depths[:i]) + j + 1, the final norm
    and the heads sum(depths) + 1."""
    top = path[0]
    if top.startswith('downsample_layers_'):
      return sum(self.depths[:int(top.split('_')[2])]) + 1
    if top.startswith('stages_'):
      stage = int(top.removeprefix('stages_'))
      block = int(path[1].removeprefix('blocks_'))
      return sum(self.depths[:stage]) + block + 1
    return sum(self.depths) + 1

  def min_image_size(self) -> int:
    """Smallest input side the official model accepts."""
    # 4x4/s4 VALID then three 2x2/s2 VALID convs need a stage-1 map >= 8.
    return 32 if self.stem == 'patchify' else 1

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool = False,
               return_features: bool = False):
    self._check_input(images, train)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    drop_rates = np.linspace(0.0, self.drop_path_rate, sum(self.depths))
    features = {}
    x = images.astype(self.dtype)
    for i in range(4):
      x = self._downsample(i, x, train)
      if i == 0:
        features['stem'] = x
      first = sum(self.depths[:i])
      x = self._stage(i, x, drop_rates[first:first + self.depths[i]], train)
      features[f'stage{i + 1}'] = x
    x = layers.batch_norm(train, name='norm', **kw)(x)
    features['pre_logits'] = jnp.mean(x, axis=(1, 2))
    logits = layers.linear(self.num_classes, name='head', **kw)(
        features['pre_logits'])
    if self.token_label_head:
      b, h, w, c = x.shape
      aux = layers.linear(self.num_classes, name='tklb_aux_head', **kw)(
          x.reshape(b, h * w, c))
      logits = logits + 0.5 * jnp.max(aux, axis=1)
    return (logits, features) if return_features else logits

  def _check_input(self, images: jax.Array, train: bool):
    if self.token_label_head and train:
      # The official GLNet_tklb trains with MixToken on the stem map and
      # returns (logits, per-token logits, box) for main_tklb.py's dense
      # token-labeling loss: a trainer this package does not have.
      raise ValueError(
          'A token-labeling GLNet (token_label_head=True, the _tklb models) '
          'has no training mode here: it trains only with the official '
          'main_tklb.py recipe (MixToken and dense teacher labels). Call it '
          'with train=False, or fine-tune a plain GLNet.')
    if images.ndim != 4 or images.shape[-1] != self.in_channels:
      raise ValueError(f'GLNet expects NHWC images (B, H, W, {self.in_channels})'
                       f', got shape {images.shape}.')
    smallest = self.min_image_size()
    if min(images.shape[1:3]) < smallest:
      raise ValueError(f'Image size {images.shape[1]}x{images.shape[2]} is too '
                       f'small for this GLNet ({self.stem} stem): the smallest '
                       f'valid size is {smallest}x{smallest}.')

  def _downsample(self, i: int, x: jax.Array, train: bool) -> jax.Array:
    """The torch ``downsample_layers[i]`` (i = 0 is the stem)."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    dims = self.dims
    name = f'downsample_layers_{i}'
    bn = lambda j: layers.batch_norm(train, name=f'{name}_{j}', **kw)
    conv = lambda j, out, k, s, p, cin: layers.conv2d(
        out, k, stride=s, padding=p, in_features=cin, name=f'{name}_{j}',
        **kw)
    if self.stem == 'patchify':  # Swin layout: proj -> norm, then norm -> proj
      if i == 0:
        return bn(1)(conv(0, dims[0], 4, 4, 0, self.in_channels)(x))
      return conv(1, dims[i], 2, 2, 0, dims[i - 1])(bn(0)(x))
    if i == 0:  # deep overlapping stem; indices 0 (Identity), 3 (GELU) unused
      x = bn(2)(conv(1, dims[0] // 2, 3, 2, 1, self.in_channels)(x))
      x = kernels.gelu(x)
      return bn(5)(conv(4, dims[0], 3, 2, 1, dims[0] // 2)(x))
    return bn(1)(conv(0, dims[i], 3, 2, 1, dims[i - 1])(x))

  def _stage(self, i: int, x: jax.Array, drop_rates: np.ndarray,
             train: bool) -> jax.Array:
    kinds = block_kinds(self.mixers[i], self.depths[i])
    period = scan_period(kinds) if self.scan_blocks else 0
    stage = GLNetStage if not period else scanned_stage(period)
    return stage(
        kinds=kinds, scan_period=period,
        drop_rates=tuple(float(r) for r in drop_rates),
        block_args=dict(head_dim=self.head_dim, mlp_ratio=self.mlp_ratio,
                        dtype=self.dtype, param_dtype=self.param_dtype),
        glmix_args=dict(num_slots=self.num_slots, slot_init=self.slot_init,
                        local_kernel_size=self.local_kernel_size),
        conv_args=dict(cpe_kernel_size=self.cpe_kernel_size,
                       mlp_dw=self.mlp_dw,
                       layer_scale_init=self.layer_scale_init),
        remat=self.remat, name=f'stages_{i}')(x, train=train)


def block_kinds(mixer: str, depth: int) -> tuple[str, ...]:
  """The block type at each index of a stage: 'glmix', 'mhsa', 'mhsa_conv'."""
  if mixer == 'hybrid':
    return tuple('glmix' if j % 2 == 0 else 'mhsa_conv' for j in range(depth))
  return (mixer,) * depth


def scan_period(kinds: tuple[str, ...]) -> int:
  """Blocks per scanned step: the stage's repeating unit (1, or 2 for
  'hybrid'), or 0 when the stage is no whole number of units (not scanned)."""
  period = 2 if len(set(kinds)) > 1 else 1
  repeats = kinds[:period] * (len(kinds) // period)
  return period if repeats == kinds else 0


_BLOCKS = {'glmix': GLMixBlock, 'mhsa': MHSABlock, 'mhsa_conv': MHSAConvBlock}


def build_block(kind: str, *, drop_path: float | jax.Array, remat: str,
                name: str, block_args: dict, glmix_args: dict,
                conv_args: dict) -> nn.Module:
  """One block of a stage (call from a compact method: it becomes a child).

  Call it as ``block(x, train)``: under remat ``train`` must be positional to
  be static (argument 2, counting the module).
  """
  cls = _BLOCKS[kind]
  if REMAT_POLICIES[remat] is not None:
    cls = nn.remat(cls, policy=REMAT_POLICIES[remat], static_argnums=(2,))
  args = dict(block_args, drop_path=drop_path, name=name)
  if kind != 'mhsa':
    args.update(conv_args)
  if kind == 'glmix':
    args.update(glmix_args)
  return cls(**args)


class GLNetStage(nn.Module):
  """A stage's blocks in order, torch ``BasicLayer`` (names ``blocks_{i}``).

  With ``scan_period`` > 0 (only through ``scanned_stage``, which keeps the
  stored variables per block) the blocks run as ``depth / scan_period``
  steps of one ``nn.scan``-ned group of ``scan_period`` blocks, so XLA
  compiles the group once however deep the stage is. The per-block
  drop-path rates are then a scanned input; drop-path masks come from the
  scan's split rng, so in training they differ from the unscanned model's
  (equally distributed); eval outputs and gradients without drop path are
  the same.
  """
  kinds: tuple[str, ...]
  drop_rates: tuple[float, ...]
  block_args: dict
  glmix_args: dict
  conv_args: dict
  remat: str = 'none'
  scan_period: int = 0

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    b, h, w, c = x.shape
    tokens = self.kinds[0] == 'mhsa'  # (B, N, C) for the whole stage
    if tokens:
      x = x.reshape(b, h * w, c)
    config = dict(remat=self.remat, block_args=self.block_args,
                  glmix_args=self.glmix_args, conv_args=self.conv_args)
    if self.scan_period:
      steps = len(self.kinds) // self.scan_period
      group = nn.scan(_BlockGroup, variable_axes={True: 0},
                      split_rngs={'params': True, 'dropout': True},
                      length=steps)
      rates = jnp.asarray(self.drop_rates, jnp.float32).reshape(steps, -1)
      x, _ = group(kinds=self.kinds[:self.scan_period], train=train,
                   drop_path=any(self.drop_rates), config=config,
                   name=_SCAN)(x, rates)
    else:
      for j, kind in enumerate(self.kinds):
        x = build_block(kind, drop_path=self.drop_rates[j], name=f'blocks_{j}',
                        **config)(x, train)
    return x.reshape(b, h, w, c) if tokens else x


class _BlockGroup(nn.Module):
  """The body of a scanned stage: ``len(kinds)`` consecutive blocks."""
  kinds: tuple[str, ...]
  train: bool
  drop_path: bool  # False: every rate is 0 (no dropout rng needed)
  config: dict

  @nn.compact
  def __call__(self, x: jax.Array, rates: jax.Array):
    for k, kind in enumerate(self.kinds):
      rate = rates[k] if self.drop_path else 0.0
      x = build_block(kind, drop_path=rate, name=f'blocks_{k}',
                      **self.config)(x, self.train)
    return x, None


_SCAN = 'scan'  # the scanned group's name inside a scanned stage


def _stack_blocks(variables: dict, period: int) -> dict:
  """Stored per-block trees -> the scan's view: {collection: {'scan':
  {'blocks_k': tree of block u * period + k, stacked over u}}}."""
  out = {}
  for collection, tree in variables.items():
    indices = sorted(int(name.removeprefix('blocks_')) for name in tree)
    groups = {k: [tree[f'blocks_{j}'] for j in indices if j % period == k]
              for k in range(period)}
    out[collection] = {_SCAN: {
        f'blocks_{k}': jax.tree_util.tree_map(lambda *xs: jnp.stack(xs),
                                              *group)
        for k, group in groups.items() if group}}
  return out


def _unstack_blocks(variables: dict, period: int) -> dict:
  """The inverse of ``_stack_blocks``: what a scanned stage stores."""
  out = {}
  for collection, tree in variables.items():
    out[collection] = {}
    for k, stacked in tree.get(_SCAN, {}).items():
      offset = int(k.removeprefix('blocks_'))
      steps = jax.tree_util.tree_leaves(stacked)[0].shape[0]
      for u in range(steps):
        out[collection][f'blocks_{u * period + offset}'] = (
            jax.tree_util.tree_map(lambda x, u=u: x[u], stacked))
  return out


@functools.lru_cache(maxsize=None)
def scanned_stage(period: int) -> type[nn.Module]:
  """``GLNetStage`` scanning over groups of ``period`` blocks, whose stored
  variables (params, batch_stats, sown intermediates) are exactly the
  unscanned stage's ``blocks_{j}`` trees: they are stacked on the way in and
  split on the way out, so checkpoints and converted weights load unchanged
  and ``slot_logits`` stay per block."""
  return nn.map_variables(
      GLNetStage, mapped_collections=True,
      trans_in_fn=functools.partial(_stack_blocks, period=period),
      trans_out_fn=functools.partial(_unstack_blocks, period=period),
      mutable=True)


# ---------------------------------------------------------------------------
# The released variants (official ``glnet_stl`` ... ``glnet_16g``,
# ``models/glnet_tklb.py``). Drop path as in the official README.

_STL = dict(dims=(96, 192, 384, 768), depths=(2, 2, 6, 2),
            mixers=('glmix', 'glmix', 'glmix', 'mhsa'), mlp_ratio=4.0,
            stem='patchify')
_G = dict(depths=(4, 4, 18, 4), mixers=('glmix', 'glmix', 'hybrid', 'mhsa_conv'),
          mlp_ratio=3.0, stem='overlapping', cpe_kernel_size=3, mlp_dw=True)

VARIANTS: dict[str, dict] = {
    'glnet_stl': dict(_STL, drop_path_rate=0.1),
    'glnet_stl_paramslot': dict(_STL, slot_init='learned', drop_path_rate=0.1),
    'glnet_4g': dict(_G, dims=(64, 128, 256, 512), drop_path_rate=0.15),
    'glnet_9g': dict(_G, dims=(96, 192, 384, 768), drop_path_rate=0.3),
    'glnet_16g': dict(_G, dims=(128, 256, 512, 1024), layer_scale_init=1e-4,
                      drop_path_rate=0.4),
    'glnet_4g_tklb': dict(_G, dims=(64, 128, 256, 512), token_label_head=True,
                          drop_path_rate=0.1),
    'glnet_9g_tklb': dict(_G, dims=(96, 192, 384, 768), token_label_head=True,
                          drop_path_rate=0.1),
}
