"""Pieces shared by the model families: PyTorch-matching initialisers, DropPath,
LayerScale, LayerNorm, multi-head attention with PyTorch's packed projection,
the convolutional MLP, and the PyTorch-style convolutions. How the depthwise
convolution, the LayerNorm and the exact GELU are computed lives in
``kernels``.

Every module here computes in ``dtype`` (the compute dtype, e.g. bfloat16) and
keeps its parameters in ``param_dtype`` (float32 by default), so that mixed
precision needs no change to the model code.

Submodule and parameter names mirror the official PyTorch attribute names
(``in_proj``, ``out_proj``, ``mlp_0`` ...) so that weight import is a
mechanical rename (see ``glmix_jax.convert``).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from glmix_jax.models import kernels

Dtype = Any
Initializer = Callable[..., jax.Array]

# ---------------------------------------------------------------------------
# Initialisers that reproduce PyTorch defaults.

# torch's default Conv2d / Linear weight init, kaiming_uniform(a=sqrt(5)), is
# U(+-1/sqrt(fan_in)); fan_in = k*k*C_in/groups is exactly what Flax computes for
# an HWIO kernel (and C_in for a Dense kernel).
torch_default_kernel_init: Initializer = nn.initializers.variance_scaling(
    1.0 / 3.0, 'fan_in', 'uniform')

# timm's trunc_normal_(std=0.02) truncates at +-2 *absolute*, i.e. about 100
# sigma: effectively N(0, 0.02^2). Flax's truncated_normal cuts at 2 sigma.
timm_linear_kernel_init: Initializer = nn.initializers.normal(0.02)


def torch_default_bias_init(fan_in: int) -> Initializer:
  """torch's default conv/linear bias init: U(+-1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


# ---------------------------------------------------------------------------
# MAC accounting (``glmix_jax.models.summary``). The summary counts every
# convolution and matrix product in the traced program (and the products of
# the contractions that ``kernels`` computes element-wise); ops inside this
# scope are not counted, as PyTorch's counters skip them (e.g. the adaptive
# average pool that builds GLNet's initial slots).

UNCOUNTED_MACS_SCOPE = 'uncounted_macs'


# ---------------------------------------------------------------------------
# Convolutions with PyTorch's symmetric padding.


class PatchConv(nn.Module):
  """A k x k convolution with stride k and no padding (a patch embedding, or
  a Swin-style 2 x 2 downsampling), computed as one matmul over flattened
  patches: the map is cut into k x k tiles, each tile's (k, k, C) values
  become one row, and the rows meet the kernel reshaped to (k k C, O).

  Same result and parameters as ``nn.Conv(O, (k, k), strides=k,
  padding='VALID')`` (``kernel`` (k, k, C, O), ``bias``; like it, trailing
  rows and columns beyond a whole tile are dropped). On XLA:CPU the
  convolution's backward took 2-3x longer than a matmul's (BENCHMARKS.md).
  """
  features: int
  patch: int
  kernel_init: Initializer
  bias_init: Initializer
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k, (b, h, w, c) = self.patch, x.shape
    kernel = self.param('kernel', self.kernel_init, (k, k, c, self.features),
                        self.param_dtype)
    bias = (self.param('bias', self.bias_init, (self.features,),
                       self.param_dtype) if self.use_bias else None)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias,
                                              dtype=self.dtype)
    rows, cols = h // k, w // k
    tiles = x[:, :rows * k, :cols * k].reshape(b, rows, k, cols, k, c)
    if k > 1:
      tiles = tiles.transpose(0, 1, 3, 2, 4, 5)
    y = tiles.reshape(b, rows, cols, k * k * c) @ kernel.reshape(
        k * k * c, self.features)
    return y if bias is None else y + bias


def conv2d(features: int, kernel_size: int, *, stride: int = 1,
           padding: int = 0, groups: int = 1, in_features: int,
           dtype: Dtype, param_dtype: Dtype, name: str,
           kernel_init: Initializer | None = None,
           use_bias: bool = True) -> nn.Module:
  """A torch-equivalent ``nn.Conv2d`` (NHWC), torch default init.

  Padding is explicit and symmetric: Flax's ``'SAME'`` pads (0, 1) for stride 2
  at even sizes and would shift the sampling grid relative to PyTorch. A
  kernel that tiles the map (stride = size, no padding) is a ``PatchConv``.
  """
  fan_in = kernel_size * kernel_size * in_features // groups
  kernel_init = kernel_init or torch_default_kernel_init
  bias_init = torch_default_bias_init(fan_in)
  if kernel_size == stride and not padding and groups == 1:
    return PatchConv(features, kernel_size, kernel_init, bias_init, use_bias,
                     dtype=dtype, param_dtype=param_dtype, name=name)
  return nn.Conv(
      features, (kernel_size, kernel_size), strides=(stride, stride),
      padding=((padding, padding), (padding, padding)),
      feature_group_count=groups, use_bias=use_bias, dtype=dtype,
      param_dtype=param_dtype, kernel_init=kernel_init, bias_init=bias_init,
      name=name)


def pointwise(features: int, *, in_features: int, dtype: Dtype,
              param_dtype: Dtype, name: str,
              kernel_init: Initializer | None = None) -> nn.Dense:
  """A 1x1 ``nn.Conv2d`` as a Dense over the channel axis (torch conv init).

  The bias always keeps torch's default init; ``kernel_init`` replaces the
  weight init only (e.g. a model-wide kaiming re-initialisation).
  """
  return nn.Dense(features, dtype=dtype, param_dtype=param_dtype,
                  kernel_init=kernel_init or torch_default_kernel_init,
                  bias_init=torch_default_bias_init(in_features), name=name)


def linear(features: int, *, dtype: Dtype, param_dtype: Dtype,
           name: str, use_bias: bool = True) -> nn.Dense:
  """An ``nn.Linear`` under timm's ViT-style init (normal 0.02, zero bias)."""
  return nn.Dense(features, use_bias=use_bias, dtype=dtype,
                  param_dtype=param_dtype,
                  kernel_init=timm_linear_kernel_init,
                  bias_init=nn.initializers.zeros, name=name)


class DepthwiseConv(nn.Module):
  """torch ``Conv2d(C, C, k, padding=k // 2, groups=C)`` on NHWC maps, with
  ``nn.Conv``'s parameters (``kernel`` (k, k, 1, C), ``bias`` (C,), same
  names, shapes and initialisation), so checkpoints are unchanged.

  Computed by ``kernels.depthwise_conv``: a feature-grouped convolution on
  GPU and TPU, a fused shifted sum with a written backward on CPU.
  """
  kernel_size: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k, c = self.kernel_size, x.shape[-1]
    kernel = self.param('kernel', torch_default_kernel_init, (k, k, 1, c),
                        self.param_dtype)
    bias = self.param('bias', torch_default_bias_init(k * k), (c,),
                      self.param_dtype)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias,
                                              dtype=self.dtype)
    return kernels.depthwise_conv(x, kernel[:, :, 0]) + bias


def depthwise_conv(x: jax.Array, kernel_size: int, *, dtype: Dtype,
                   param_dtype: Dtype, name: str) -> jax.Array:
  """Depthwise ``kernel_size`` conv with "same" symmetric zero padding."""
  return DepthwiseConv(kernel_size, dtype=dtype, param_dtype=param_dtype,
                       name=name)(x)


# ---------------------------------------------------------------------------
# Regularisers and residual scaling.


class DropPath(nn.Module):
  """Stochastic depth (Huang et al. 2016), per sample, as timm's DropPath.

  A sample's whole residual branch is dropped with probability ``rate``; the
  survivors are scaled by 1 / (1 - rate). Uses the ``'dropout'`` rng stream.
  ``rate`` may be a traced scalar: blocks compiled once by ``nn.scan`` take
  their depth-dependent rates as a scanned input.
  """
  rate: float | jax.Array

  @nn.compact
  def __call__(self, x: jax.Array, *, deterministic: bool) -> jax.Array:
    if deterministic or (isinstance(self.rate, (int, float))
                         and self.rate == 0.0):
      return x
    keep = 1.0 - self.rate
    # one keep/drop decision per sample; as timm, the survivors' scale is
    # mask / keep, one multiply per element (forward and backward).
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = jax.random.bernoulli(self.make_rng('dropout'), keep, shape)
    return x * (mask / jnp.asarray(keep, x.dtype)).astype(x.dtype)


class LayerScale(nn.Module):
  """Per-channel residual scaling gamma * x (Touvron et al., CaiT)."""
  init_value: float
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    gamma = self.param('gamma', nn.initializers.constant(self.init_value),
                       (x.shape[-1],), self.param_dtype)
    return x * gamma.astype(x.dtype)


def residual_branch(branch: jax.Array, *, layer_scale_init: float | None,
                    drop_path: float, train: bool, param_dtype: Dtype,
                    layer_scale_name: str) -> jax.Array:
  """DropPath(gamma * branch): a residual branch before it joins the shortcut.

  Call it from a compact method; the LayerScale (when ``layer_scale_init`` is
  set) becomes a child of the caller named ``layer_scale_name`` (torch ``ls1``
  / ``ls2``).
  """
  if layer_scale_init is not None:
    branch = LayerScale(layer_scale_init, param_dtype,
                        name=layer_scale_name)(branch)
  return DropPath(drop_path)(branch, deterministic=not train)


class LayerNorm(nn.Module):
  """LayerNorm over the channel (last) axis with PyTorch's two-pass variance.

  ``nn.LayerNorm(use_fast_variance=False)`` to the bit in the forward pass,
  with its parameters (``scale``, ``bias``: ones and zeros), and a written
  backward pass that costs about 30 % less on XLA:CPU (BENCHMARKS.md).
  """
  epsilon: float
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (c,), self.param_dtype)
    bias = self.param('bias', nn.initializers.zeros, (c,), self.param_dtype)
    return kernels.layer_norm(x, scale, bias, self.epsilon).astype(self.dtype)


def layer_norm(epsilon: float, dtype: Dtype, param_dtype: Dtype,
               name: str) -> LayerNorm:
  """LayerNorm over channels with PyTorch's two-pass variance."""
  return LayerNorm(epsilon, dtype=dtype, param_dtype=param_dtype, name=name)


def batch_norm(train: bool, dtype: Dtype, param_dtype: Dtype,
               name: str) -> nn.BatchNorm:
  """``nn.BatchNorm2d`` (eps 1e-5, torch momentum 0.1 == Flax momentum 0.9).

  Under ``jit`` over a sharded batch the statistics are those of the *global*
  batch (SyncBN semantics), unlike per-GPU BN in a PyTorch DDP run.
  """
  return nn.BatchNorm(use_running_average=not train, momentum=0.9,
                      epsilon=1e-5, dtype=dtype, param_dtype=param_dtype,
                      use_fast_variance=False, name=name)


# ---------------------------------------------------------------------------
# Attention and MLP.


class MultiHeadAttention(nn.Module):
  """PyTorch ``nn.MultiheadAttention(C, C // head_dim, bias=True)`` on (B, L, C).

  softmax(Q K^T / sqrt(d)) V per head, heads splitting C contiguously. Q, K, V
  come from one packed projection ``in_proj`` (C -> 3C, rows [q; k; v] in
  torch), initialised by Xavier-uniform over the *packed* matrix as torch does.
  """
  head_dim: int = 32
  out_kernel_init: Initializer = timm_linear_kernel_init
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    batch, length, channels = x.shape
    heads = channels // self.head_dim
    qkv = nn.Dense(3 * channels, dtype=self.dtype, param_dtype=self.param_dtype,
                   kernel_init=nn.initializers.xavier_uniform(),
                   bias_init=nn.initializers.zeros, name='in_proj')(x)
    qkv = qkv.reshape(batch, length, 3, heads, self.head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    out = jax.nn.dot_product_attention(q, k, v)  # scale 1/sqrt(head_dim)
    out = out.reshape(batch, length, channels)
    return nn.Dense(channels, dtype=self.dtype, param_dtype=self.param_dtype,
                    kernel_init=self.out_kernel_init,
                    bias_init=nn.initializers.zeros, name='out_proj')(out)


def conv_mlp(x: jax.Array, *, hidden_features: int, residual_dw: bool,
             dtype: Dtype, param_dtype: Dtype) -> jax.Array:
  """The GLNet / ConvNeXt-style MLP on NHWC maps (torch ``mlp`` Sequential).

  PW(C -> rC) -> [M + DW3x3(M)] -> GELU(exact) -> PW(rC -> C). Call it from a
  compact method: its layers become children of the caller, named ``mlp_0``,
  ``mlp_1`` and ``mlp_3`` after their torch Sequential indices (index 2 is the
  parameter-free GELU), so checkpoints convert by rename.
  """
  channels = x.shape[-1]
  h = pointwise(hidden_features, in_features=channels, dtype=dtype,
                param_dtype=param_dtype, name='mlp_0')(x)
  if residual_dw:
    h = h + depthwise_conv(h, 3, dtype=dtype, param_dtype=param_dtype,
                           name='mlp_1')
  h = kernels.gelu(h)
  return pointwise(channels, in_features=hidden_features, dtype=dtype,
                   param_dtype=param_dtype, name='mlp_3')(h)
