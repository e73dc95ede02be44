"""ACmix-ResNet (Pan et al., CVPR 2022): torchvision's ResNet v1.5 with an ACmix module (``acmix.ACmix``) as every bottleneck's 3x3
convolution (official ``ResNet/ResNet_ImageNet.py``).

Official quirks kept: the constructor re-initialises every conv kaiming
fan-out after the ACmix modules exist, shift kernels included
(``dep_conv_init='kaiming_fan_out'``), and its ACmix modules' ``fc`` (the conv
path's 3N -> 9 FC) has no bias. Names mirror the official state_dict (``layer1.0.conv2.*``
becomes ``layer1_0/conv2/*``).
"""

from __future__ import annotations

from typing import Any, ClassVar, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from glmix_jax.models import acmix, layers

Dtype = Any

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
    init = acmix.weight_init(self.dep_conv_init, shift=False)
    bn = lambda name: layers.batch_norm(train, name=name, **kw)
    conv1x1 = lambda features, stride, cin, name: layers.conv2d(
        features, 1, stride=stride, in_features=cin, use_bias=False,
        kernel_init=init, name=name, **kw)
    cin = x.shape[-1]
    y = nn.relu(bn('bn1')(conv1x1(self.width, 1, cin, 'conv1')(x)))
    y = acmix.ACmix(self.width, self.width, self.heads, self.stride,
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
  """ACmix-ResNet (official ``ResNet_ImageNet.py::ACmix_ResNet``).

  Stem 7x7/s2 conv -> BN -> ReLU -> 3x3/s2 max-pool, four stages of
  bottlenecks whose 3x3 conv is an ACmix module (stride on it, ResNet v1.5),
  global average pool, ``fc``. ``depths`` is the torch ``layers`` argument;
  ``width_per_group`` scales the bottleneck widths as in torchvision.
  ``__call__(images, train=False)`` returns logits, or ``(logits, features)``
  with NHWC maps ``'stem'`` (after the max-pool) and ``'stage1'`` ...
  ``'stage4'`` and the pooled ``'pre_logits'`` (B, C) that ``fc`` reads
  when ``return_features=True``.
  """
  # The classifier's parameters (top level): what fine-tuning re-creates.
  CLASSIFIERS: ClassVar[tuple[str, ...]] = ('fc',)
  num_classes: int = 1000
  depths: Sequence[int] = (3, 4, 6, 3)
  width_per_group: int = 64
  heads: int = 4
  dep_conv_init: str = 'kaiming_fan_out'  # what the official constructor does
  drop_path_rate: float = 0.0  # none in the official model
  in_channels: int = 3
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def layer_index(self, path: Sequence[str]) -> int:
    """A parameter's layer for layer-wise lr decay (``optim.layer_decay``;
    the ACmix code has none): GLNet's rule (ConvNeXt-V2's
    ``get_num_layer_for_convnext_single``) on the ResNet's parts, the stem
    (``conv1``, ``bn1``) 1, block b of ``layer{s}`` sum(depths[:s - 1]) + b +
    1 (its projection shortcut included), ``fc`` sum(depths) + 1."""
    top = path[0]
    if top in ('conv1', 'bn1'):
      return 1
    if top.startswith('layer'):
      stage, block = (int(n) for n in top.removeprefix('layer').split('_'))
      return sum(self.depths[:stage - 1]) + block + 1
    return sum(self.depths) + 1

  def min_image_size(self) -> int:
    """Smallest input side for which every ACmix map is valid."""
    return acmix.smallest_valid_side(self.size_problem)

  def size_problem(self, height: int, width: int) -> str | None:
    """Why an input size is invalid (None if valid), module by module."""
    sizes = np.array([height, width])
    sizes = (sizes - 1) // 2 + 1  # 7x7/s2 conv, padding 3
    sizes = (sizes - 1) // 2 + 1  # 3x3/s2 max-pool, padding 1
    for stage, (depth, stride) in enumerate(zip(self.depths, RESNET_STRIDES)):
      for block in range(depth):
        block_stride = stride if block == 0 else 1
        try:
          acmix.check_local_attention_size(*sizes, block_stride)
        except ValueError:
          return (f'the ACmix input of layer{stage + 1} block {block} would '
                  f'be {sizes[0]}x{sizes[1]} (stride {block_stride})')
        sizes //= block_stride
    return None

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool = False,
               return_features: bool = False):
    acmix.check_images(self, images)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = layers.conv2d(64, 7, stride=2, padding=3, in_features=self.in_channels,
                      use_bias=False, kernel_init=acmix.kaiming_fan_out_init,
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
    features['pre_logits'] = jnp.mean(x, axis=(1, 2))
    logits = layers.pointwise(self.num_classes, in_features=x.shape[-1],
                              name='fc', **kw)(features['pre_logits'])
    return (logits, features) if return_features else logits


# ``ACmix_ResNet(layers=...)``: the paper's ResNet-26, -38 and -50 depths.
VARIANTS: dict[str, dict] = {
    'acmix_resnet26': dict(depths=(1, 2, 4, 1)),
    'acmix_resnet38': dict(depths=(2, 3, 5, 2)),
    'acmix_resnet50': dict(depths=(3, 4, 6, 3)),
}
