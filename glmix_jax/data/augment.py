"""Host-side per-image transforms: timm's ImageNet train and eval recipes.

Training reproduces timm ``transforms_imagenet_train`` as the DeiT / ConvNeXt /
GLNet scripts configure it (``create_transform(is_training=True, ...)``)::

  RandomResizedCropAndInterpolation(S, scale, ratio (3/4, 4/3), bicubic)
  -> RandomHorizontalFlip(p) -> RandAugment('rand-m9-mstd0.5-inc1')
  -> ToTensor + Normalize(mean, std) -> RandomErasing(p, mode='pixel', count 1)

Colour jitter is never applied: timm turns it off whenever RandAugment is on.
Evaluation reproduces ``transforms_imagenet_eval``: resize the shorter side to
floor(S / crop_pct) (torchvision ``Resize(int)`` size rounding), centre-crop S
(torchvision ``CenterCrop`` offset rounding), normalise.

Images stay uint8 Pillow images throughout, like timm's PIL path, so every
geometric and colour op is the same Pillow call timm makes. The host stops at
uint8 HWC pixels (not torch's CHW: the models are NHWC) and the erasing box;
``ToTensor + Normalize`` and the erasing noise run on the device, in the
jitted step (``on_device``), so a quarter of float32's bytes cross to it.

All randomness comes from the ``np.random.Generator`` passed in, so the output
is a pure function of (bytes, generator state). The draws are made in a
different order than timm's (which uses Python's and numpy's global RNGs), so
the distributions match timm but individual samples do not.

Deliberate differences from timm:

* ``parse_randaugment`` rejects what timm silently skips (a section without a
  digit) or asserts on, with a ValueError naming the bad part; and ``inc0``
  means "not increasing" (timm's ``bool('0')`` makes any ``inc`` value true).
  Only the two standard op sets are implemented (no ``t`` weighted sets).
* Training decodes JPEGs at 1/2, 1/4 or 1/8 scale (``Image.draft``, libjpeg's
  DCT scaling) when the random crop is so large that even the reduced crop
  keeps at least S pixels on its shorter side, so the final bicubic resize
  still only shrinks. See ``_resized_crop``.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import math
import re
from typing import Callable, Sequence

import ml_collections
import numpy as np
from PIL import Image, ImageEnhance, ImageOps

# (left, top, width, height) in pixels of the decoded image.
Box = tuple[int, int, int, int]
Fill = tuple[int, int, int]

RESAMPLE = {
    'bicubic': Image.Resampling.BICUBIC,
    'bilinear': Image.Resampling.BILINEAR,
}
RRC_RATIO = (3.0 / 4.0, 4.0 / 3.0)  # timm / torchvision default aspect range

# ---------------------------------------------------------------------------
# Decoding.


def _open(data: bytes) -> Image.Image:
  """Reads the header only; pixels are decoded on the first ``load``."""
  return Image.open(io.BytesIO(data))


def _to_rgb(img: Image.Image) -> Image.Image:
  """Decodes and converts to RGB as timm's loader does (``.convert('RGB')``).

  Grayscale is replicated, CMYK converted, alpha dropped (not composited).
  """
  if img.mode == 'RGB':
    img.load()
    return img
  return img.convert('RGB')


def decode_image(data: bytes) -> Image.Image:
  """Decodes encoded image bytes (JPEG, PNG, ...) to an RGB Pillow image.

  Always decodes at full resolution: a reduced JPEG decode (``Image.draft``)
  is only safe once the crop is known, so ``train_transform`` applies it
  itself and evaluation keeps the reference pixels exactly.
  """
  return _to_rgb(_open(data))


# ---------------------------------------------------------------------------
# Random boxes (RandomResizedCrop, RandomErasing).


def _sample_box_size(area: float, area_range: Sequence[float],
                     log_ratio: tuple[float, float],
                     rng: np.random.Generator) -> tuple[int, int]:
  """(w, h) of a box with area ~ U(area_range) * area, log(w/h) ~ U(log_ratio).

  The rounding is timm's ``int(round(.))`` (round half to even). timm's
  RandomErasing calls the ratio h/w; its range is symmetric in log space, so
  the distribution is the same.
  """
  target_area = rng.uniform(*area_range) * area
  aspect = math.exp(rng.uniform(*log_ratio))
  return (int(round(math.sqrt(target_area * aspect))),
          int(round(math.sqrt(target_area / aspect))))


def random_resized_crop_box(width: int, height: int, scale: Sequence[float],
                            ratio: Sequence[float],
                            rng: np.random.Generator) -> Box:
  """timm ``RandomResizedCropAndInterpolation.get_params``.

  Ten tries at a box with area fraction ~ U(scale) and log aspect (w/h) ~
  U(log ratio) that fits in the image, at a uniform position; if none fits,
  the largest central box whose aspect is clamped to ``ratio``.
  """
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    w, h = _sample_box_size(width * height, scale, log_ratio, rng)
    if w <= width and h <= height:
      top = int(rng.integers(0, height - h, endpoint=True))
      left = int(rng.integers(0, width - w, endpoint=True))
      return left, top, w, h
  in_ratio = width / height
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    w, h = int(round(height * max(ratio))), height
  else:
    w, h = width, height
  return (width - w) // 2, (height - h) // 2, w, h


def random_erasing_box(height: int, width: int, rng: np.random.Generator,
                       probability: float, *, min_area: float = 0.02,
                       max_area: float = 1.0 / 3.0,
                       min_aspect: float = 0.3) -> np.ndarray:
  """The box of timm ``RandomErasing(probability, mode='pixel', max_count=1)``.

  With probability ``probability``, up to ten tries at a box with area
  fraction ~ U(min_area, max_area) and log aspect ~ U(+-log(1/min_aspect))
  strictly smaller than the image, at a uniform position. The first that fits
  is the box; ``on_device.erase`` fills it with N(0, 1) noise per pixel and
  channel of the normalised image (noise at the data's own scale), which is
  why the fill happens on the device, after normalisation.

  Args:
    height: the image's size.
    width: see ``height``.
    rng: the randomness.
    probability: chance that an image gets a box.
    min_area: timm's defaults, which the recipes use.
    max_area: see ``min_area``.
    min_aspect: see ``min_area``.

  Returns:
    int32 ``(top, left, box_height, box_width)``; all zero for no box.
  """
  box = np.zeros(4, np.int32)
  if rng.random() > probability:
    return box
  log_ratio = (math.log(min_aspect), -math.log(min_aspect))
  for _ in range(10):
    w, h = _sample_box_size(height * width, (min_area, max_area), log_ratio,
                            rng)
    if w < width and h < height:
      top = int(rng.integers(0, height - h, endpoint=True))
      left = int(rng.integers(0, width - w, endpoint=True))
      box[:] = top, left, h, w
      break
  return box


# ---------------------------------------------------------------------------
# RandAugment: timm ``auto_augment.py`` ops and magnitude-to-argument maps.

_LEVEL_DENOM = 10.0  # timm: magnitude M is fraction M / 10 of each op's range

OpFn = Callable[[Image.Image, object, Fill, int], Image.Image]
LevelFn = Callable[[float, np.random.Generator], object]


def _signed_level(level: float, rng: np.random.Generator, *,
                  max_value: float) -> float:
  """level / 10 * max_value with a random sign (rotate, shear, translate)."""
  value = level / _LEVEL_DENOM * max_value
  return -value if rng.random() < 0.5 else value


def _enhance_level(level: float, rng: np.random.Generator) -> float:
  """Enhancement factor in [0.1, 1.9], rising with the level."""
  del rng
  return level / _LEVEL_DENOM * 1.8 + 0.1


def _enhance_increasing_level(level: float, rng: np.random.Generator) -> float:
  """Factor 1 +- 0.9 * level / 10, floored at 0.1: stronger away from 1."""
  return max(0.1, 1.0 + _signed_level(level, rng, max_value=0.9))


def _posterize_level(level: float, rng: np.random.Generator) -> int:
  """Bits kept, 0 .. 4 rising with the level (TF EfficientNet)."""
  del rng
  return int(level / _LEVEL_DENOM * 4)


def _posterize_increasing_level(level: float, rng: np.random.Generator) -> int:
  """Bits kept, 4 .. 0: fewer bits (stronger) at higher levels."""
  return 4 - _posterize_level(level, rng)


def _solarize_level(level: float, rng: np.random.Generator) -> int:
  """Threshold 0 .. 256 rising with the level (weaker at higher levels)."""
  del rng
  return min(256, int(level / _LEVEL_DENOM * 256))


def _solarize_increasing_level(level: float, rng: np.random.Generator) -> int:
  """Threshold 256 .. 0: more pixels inverted at higher levels."""
  return 256 - _solarize_level(level, rng)


def _solarize_add_level(level: float, rng: np.random.Generator) -> int:
  """Amount 0 .. 110 added to pixels below 128."""
  del rng
  return min(128, int(level / _LEVEL_DENOM * 110))


def _affine(img: Image.Image, coeffs: tuple[float, ...], fill: Fill,
            resample: int) -> Image.Image:
  # Pillow maps each output (x, y) to input (a x + b y + c, d x + e y + f).
  return img.transform(img.size, Image.Transform.AFFINE, coeffs,
                       resample=resample, fillcolor=fill)


def _shear_x(img, factor, fill, resample):
  return _affine(img, (1, factor, 0, 0, 1, 0), fill, resample)


def _shear_y(img, factor, fill, resample):
  return _affine(img, (1, 0, 0, factor, 1, 0), fill, resample)


def _translate_x(img, fraction, fill, resample):
  return _affine(img, (1, 0, fraction * img.width, 0, 1, 0), fill, resample)


def _translate_y(img, fraction, fill, resample):
  return _affine(img, (1, 0, 0, 0, 1, fraction * img.height), fill, resample)


def _rotate(img, degrees, fill, resample):
  return img.rotate(degrees, resample=resample, fillcolor=fill)


def _point(img: Image.Image, lut: Sequence[int]) -> Image.Image:
  """Maps every channel through one 256-entry table."""
  return img.point(list(lut) * 3)


def _posterize(img, bits, *_):
  # A table, not ImageOps.posterize: recent Pillow rejects bits = 0, which
  # the increasing variant reaches at magnitude 10 (timm: a black image).
  mask = ~(2**(8 - bits) - 1) & 0xFF
  return _point(img, [i & mask for i in range(256)])


def _solarize(img, threshold, *_):
  return ImageOps.solarize(img, threshold)


def _solarize_add(img, amount, *_):
  return _point(img, [min(255, i + amount) if i < 128 else i
                      for i in range(256)])


def _enhancer(kind: type) -> OpFn:
  """An op blending towards a degenerate image by ``factor`` (1 = identity)."""
  return lambda img, factor, *_: kind(img).enhance(factor)


def _no_arg(fn: Callable[[Image.Image], Image.Image]) -> OpFn:
  return lambda img, *_: fn(img)


# name -> (op, magnitude-to-argument map or None for ops without argument).
RAND_AUGMENT_OPS: dict[str, tuple[OpFn, LevelFn | None]] = {
    'AutoContrast': (_no_arg(ImageOps.autocontrast), None),
    'Equalize': (_no_arg(ImageOps.equalize), None),
    'Invert': (_no_arg(ImageOps.invert), None),
    'Rotate': (_rotate, functools.partial(_signed_level, max_value=30.0)),
    'Posterize': (_posterize, _posterize_level),
    'PosterizeIncreasing': (_posterize, _posterize_increasing_level),
    'Solarize': (_solarize, _solarize_level),
    'SolarizeIncreasing': (_solarize, _solarize_increasing_level),
    'SolarizeAdd': (_solarize_add, _solarize_add_level),
    'ShearX': (_shear_x, functools.partial(_signed_level, max_value=0.3)),
    'ShearY': (_shear_y, functools.partial(_signed_level, max_value=0.3)),
    # Fractions of the image side (timm's 'translate_pct' 0.45).
    'TranslateXRel': (_translate_x,
                      functools.partial(_signed_level, max_value=0.45)),
    'TranslateYRel': (_translate_y,
                      functools.partial(_signed_level, max_value=0.45)),
}

# Color, Contrast, Brightness, Sharpness and their "Increasing" variants.
for _kind in ('Color', 'Contrast', 'Brightness', 'Sharpness'):
  RAND_AUGMENT_OPS[_kind] = (_enhancer(getattr(ImageEnhance, _kind)),
                             _enhance_level)
  RAND_AUGMENT_OPS[_kind + 'Increasing'] = (RAND_AUGMENT_OPS[_kind][0],
                                            _enhance_increasing_level)
del _kind

# timm _RAND_TRANSFORMS and _RAND_INCREASING_TRANSFORMS (Cutout is left to
# RandomErasing there too).
RAND_OPS = ('AutoContrast', 'Equalize', 'Invert', 'Rotate', 'Posterize',
            'Solarize', 'SolarizeAdd', 'Color', 'Contrast', 'Brightness',
            'Sharpness', 'ShearX', 'ShearY', 'TranslateXRel', 'TranslateYRel')
RAND_INCREASING_OPS = (
    'AutoContrast', 'Equalize', 'Invert', 'Rotate', 'PosterizeIncreasing',
    'SolarizeIncreasing', 'SolarizeAdd', 'ColorIncreasing',
    'ContrastIncreasing', 'BrightnessIncreasing', 'SharpnessIncreasing',
    'ShearX', 'ShearY', 'TranslateXRel', 'TranslateYRel')


@dataclasses.dataclass(frozen=True)
class RandAugmentSpec:
  """A parsed timm RandAugment string (defaults are timm's)."""
  ops: tuple[str, ...] = RAND_OPS
  num_ops: int = 2  # 'n': ops drawn per image, with replacement
  magnitude: float = 10.0  # 'm'
  magnitude_std: float = 0.0  # 'mstd': gaussian noise; inf = U(0, m)
  magnitude_max: float = _LEVEL_DENOM  # 'mmax': clip of the noisy magnitude
  prob: float = 0.5  # 'p': chance that each drawn op is applied


# section key -> (RandAugmentSpec field or 'inc', parser of the value).
_SECTIONS = {
    'm': ('magnitude', int),
    'n': ('num_ops', int),
    'p': ('prob', float),
    'mstd': ('magnitude_std', float),
    'mmax': ('magnitude_max', int),
    'inc': ('inc', int),
}
# timm splits a section at its first digit: 'mstd0.5' -> ('mstd', '0.5').
_SECTION_RE = re.compile(r'([a-z]*)(\d.*)')


@functools.lru_cache(maxsize=16)
def parse_randaugment(spec: str) -> RandAugmentSpec:
  """Parses a timm RandAugment string such as ``'rand-m9-mstd0.5-inc1'``.

  Sections after ``rand`` (any order): ``m<int>`` magnitude, ``n<int>`` ops
  per image, ``p<float>`` per-op probability, ``mstd<float>`` magnitude noise
  std (> 100 means uniform in [0, m]), ``mmax<int>`` magnitude clip (0 keeps
  timm's 10), ``inc<int>`` use the "increasing" op set when non-zero.

  Raises:
    ValueError: naming the part of ``spec`` that is not understood.
  """
  parts = spec.split('-')
  if parts[0] != 'rand':
    raise ValueError(f'RandAugment string {spec!r}: starts with {parts[0]!r}, '
                     "expected 'rand' (AutoAugment/AugMix are not supported)")
  fields = {}
  increasing = False
  for part in parts[1:]:
    match = _SECTION_RE.fullmatch(part)
    if match is None or match.group(1) not in _SECTIONS:
      raise ValueError(
          f'RandAugment string {spec!r}: unknown section {part!r} (known: '
          f'{", ".join(k + "<value>" for k in _SECTIONS)})')
    name, parse = _SECTIONS[match.group(1)]
    try:
      value = parse(match.group(2))
    except ValueError:
      raise ValueError(f'RandAugment string {spec!r}: section {part!r} needs '
                       f'a {parse.__name__} value') from None
    if name == 'inc':
      increasing = bool(value)
    elif name == 'magnitude_std' and value > 100:
      fields[name] = math.inf
    elif name == 'magnitude_max':
      fields[name] = float(value or _LEVEL_DENOM)
    else:
      fields[name] = value
  if not 0.0 <= fields.get('prob', 0.0) <= 1.0:
    raise ValueError(f'RandAugment string {spec!r}: p must be in [0, 1]')
  return RandAugmentSpec(
      ops=RAND_INCREASING_OPS if increasing else RAND_OPS, **fields)


def sample_magnitude(spec: RandAugmentSpec, rng: np.random.Generator) -> float:
  """One op's magnitude: m, + N(0, mstd) noise (or U(0, m)), clipped [0, mmax].

  timm draws it afresh for every applied op (``AugmentOp.__call__``).
  """
  magnitude = spec.magnitude
  if spec.magnitude_std == math.inf:
    magnitude = rng.uniform(0.0, magnitude)
  elif spec.magnitude_std > 0:
    magnitude = rng.normal(magnitude, spec.magnitude_std)
  return min(max(magnitude, 0.0), spec.magnitude_max)


def apply_op(img: Image.Image, name: str, magnitude: float,
             rng: np.random.Generator, *, fill: Fill,
             resample: int) -> Image.Image:
  """One RandAugment op at ``magnitude`` (0 .. 10), random sign included."""
  op, level_fn = RAND_AUGMENT_OPS[name]
  arg = None if level_fn is None else level_fn(magnitude, rng)
  return op(img, arg, fill, resample)


def rand_augment(img: Image.Image, spec: RandAugmentSpec,
                 rng: np.random.Generator, *, fill: Fill,
                 resample: int) -> Image.Image:
  """timm ``RandAugment``: ``num_ops`` ops drawn with replacement, each
  applied with probability ``prob`` at a freshly sampled magnitude.

  Args:
    img: an RGB image.
    spec: from ``parse_randaugment``.
    rng: the randomness.
    fill: colour of the area uncovered by geometric ops; timm uses the
      dataset mean in 0..255.
    resample: filter of the geometric ops (timm: the configured
      interpolation).
  """
  for index in rng.integers(len(spec.ops), size=spec.num_ops):
    if rng.random() > spec.prob:
      continue
    img = apply_op(img, spec.ops[index], sample_magnitude(spec, rng), rng,
                   fill=fill, resample=resample)
  return img


# ---------------------------------------------------------------------------
# The composed transforms.


def _resample(cfg: ml_collections.ConfigDict) -> int:
  if cfg.interpolation not in RESAMPLE:
    raise ValueError(f'interpolation {cfg.interpolation!r} is not one of '
                     f'{sorted(RESAMPLE)}')
  return RESAMPLE[cfg.interpolation]


def _pixels(img: Image.Image) -> np.ndarray:
  """uint8 HWC; ``on_device.normalize`` makes timm's float tensor of it."""
  return np.asarray(img, dtype=np.uint8)


def _resized_crop(img: Image.Image, box: Box, size: int,
                  resample: int) -> Image.Image:
  """Crops ``box`` from an opened (not yet decoded) image, resizes to size².

  Equals torchvision ``resized_crop`` (crop, then Pillow resize) on the full
  image. When the crop's shorter side is at least k * size (k in 2, 4, 8), a
  JPEG is decoded at 1/k scale (libjpeg's DCT scaling, which low-passes as it
  shrinks), and the box is mapped to that scale with sub-pixel precision. The
  reduced crop still has >= size pixels per side, so the bicubic resize only
  shrinks; measured against the full decode, the output moves by 0.3 to 1.0
  grey levels on average (99th percentile <= 7) on test patterns and noisy
  synthetic photos (tests/test_augment.py bounds it), at a fraction of the
  decoding time. At S = 224 this needs a crop side >= 448, so it matters for
  ImageNet's large images, not for the typical 500x375 ones.
  """
  left, top, width, height = box
  factor = 1
  while factor < 8 and min(width, height) >= 2 * factor * size:
    factor *= 2
  scale = 1.0
  if factor > 1:
    full_width = img.width
    drafted = img.draft('RGB', (img.width // factor, img.height // factor))
    if drafted:  # None for formats other than JPEG
      scale = full_width / drafted[1][2]
  img = _to_rgb(img)
  if scale == 1.0:
    return img.crop((left, top, left + width, top + height)).resize(
        (size, size), resample)
  x0, y0 = left / scale, top / scale
  x1, y1 = (left + width) / scale, (top + height) / scale
  return img.resize((size, size), resample, box=(x0, y0, x1, y1))


def train_transform(data: bytes, rng: np.random.Generator,
                    cfg: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
  """timm's training transform (see the module docstring) on encoded bytes.

  Args:
    data: encoded image (JPEG, PNG, ...).
    rng: all randomness; equal generator states give equal outputs.
    cfg: ``image_size``, ``interpolation``, ``mean``, ``std`` and an
      ``augmentation`` sub-config: ``random_resized_crop_scale`` (area range;
      None resizes the whole image to S x S instead), optional
      ``random_resized_crop_ratio`` (default (3/4, 4/3)), ``hflip``
      (probability), ``randaugment`` (timm string; '' or None is off),
      ``random_erasing`` (probability; 0 is off).

  Returns:
    ``{'image': uint8 (S, S, 3)}``, and with random erasing on
    ``'erase_box'``: int32 (4,) from ``random_erasing_box``. Normalisation and
    the erasing noise follow on the device (``on_device``).
  """
  aug = cfg.augmentation
  resample = _resample(cfg)
  img = _open(data)
  if aug.random_resized_crop_scale:
    # ``in`` first: a ConfigDict miss builds a did-you-mean message (~50 us).
    ratio = (aug.random_resized_crop_ratio
             if 'random_resized_crop_ratio' in aug else RRC_RATIO)
    box = random_resized_crop_box(img.width, img.height,
                                  aug.random_resized_crop_scale, ratio, rng)
  else:
    box = (0, 0, img.width, img.height)
  img = _resized_crop(img, box, cfg.image_size, resample)
  if aug.hflip and rng.random() < aug.hflip:
    img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
  if aug.randaugment:
    # timm's hparams: fill with the mean colour, the configured filter.
    fill = tuple(min(255, round(255 * m)) for m in cfg.mean)
    img = rand_augment(img, parse_randaugment(aug.randaugment), rng,
                       fill=fill, resample=resample)
  out = {'image': _pixels(img)}
  if aug.random_erasing:
    out['erase_box'] = random_erasing_box(cfg.image_size, cfg.image_size, rng,
                                          aug.random_erasing)
  return out


def eval_transform(data: bytes, cfg: ml_collections.ConfigDict) -> np.ndarray:
  """timm's eval transform: shorter side to floor(S / crop_pct), centre S².

  Sizes follow torchvision: the longer side becomes
  ``int(short_target * long / short)``, the crop offset
  ``int(round((side - S) / 2))``.

  Args:
    data: encoded image.
    cfg: ``image_size``, ``eval_crop_pct`` (in (0, 1]), ``interpolation``,
      ``mean``, ``std``.

  Returns:
    uint8 (S, S, 3); ``on_device.normalize`` follows in the step.
  """
  if not 0.0 < cfg.eval_crop_pct <= 1.0:
    raise ValueError(
        f'eval_crop_pct must be in (0, 1], got {cfg.eval_crop_pct}')
  size = cfg.image_size
  short_target = math.floor(size / cfg.eval_crop_pct)
  img = decode_image(data)
  width, height = img.size
  if width <= height:
    new_size = (short_target, int(short_target * height / width))
  else:
    new_size = (int(short_target * width / height), short_target)
  if new_size != img.size:
    img = img.resize(new_size, _resample(cfg))
  left = int(round((new_size[0] - size) / 2.0))
  top = int(round((new_size[1] - size) / 2.0))
  img = img.crop((left, top, left + size, top + size))
  return _pixels(img)
