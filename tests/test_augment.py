"""Host-side transforms (glmix_jax.data.augment) against timm's semantics."""

import functools
import io
import math

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageOps

import jax
import jax.numpy as jnp

from configs import common
from glmix_jax.data import augment, on_device

BICUBIC = Image.Resampling.BICUBIC
FILL = (124, 116, 104)  # round(255 * ImageNet mean), timm's RandAugment fill


def _pattern(width, height, seed=0):
  """A colourful uint8 image, values in [40, 250], with edges and gradients."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:height, 0:width]
  pixels = np.stack([xx * 160 // width, yy * 160 // height,
                     (xx + yy) * 80 // (width + height) + 40 * (xx % 7 < 3)],
                    axis=-1) + 40
  img = Image.fromarray(pixels.astype(np.uint8))
  draw = ImageDraw.Draw(img)
  for _ in range(4):
    x0, y0 = rng.integers(0, width // 2), rng.integers(0, height // 2)
    draw.rectangle((x0, y0, x0 + width // 4, y0 + height // 3),
                   fill=tuple(int(v) for v in rng.integers(40, 200, 3)))
  draw.rectangle((0, height - 3, 2, height - 1), fill=(250, 250, 250))
  return img


def _encode(img, fmt='PNG', **kwargs):
  buffer = io.BytesIO()
  img.save(buffer, format=fmt, **kwargs)
  return buffer.getvalue()


def _cfg(size=32, **augmentation):
  cfg = common.imagenet_data()
  cfg.image_size = size
  cfg.augmentation = common.deit_augmentation()
  cfg.augmentation.update(augmentation)
  return cfg


def _pixels(img):
  return np.asarray(img, np.uint8)


def _train_image(data, rng, cfg):
  return augment.train_transform(data, rng, cfg)['image']


# ---------------------------------------------------------------------------
# Decoding.


@pytest.mark.parametrize('mode', ['L', 'CMYK', 'RGBA', 'P'])
def test_decode_converts_to_rgb(mode):
  rgb = _pattern(20, 16)
  if mode == 'CMYK':
    data = _encode(rgb.convert('CMYK'), 'JPEG', quality=95)
  else:
    data = _encode(rgb.convert(mode))
  img = augment.decode_image(data)
  assert img.mode == 'RGB' and img.size == (20, 16)
  pixels = np.asarray(img)
  if mode == 'L':  # the grey level in every channel
    grey = np.asarray(rgb.convert('L'))
    np.testing.assert_array_equal(pixels, np.stack([grey] * 3, axis=-1))
  elif mode == 'P':  # the palette's colours, not the indices
    np.testing.assert_array_equal(
        pixels, np.asarray(rgb.convert('P').convert('RGB')))
  elif mode == 'RGBA':
    np.testing.assert_array_equal(pixels, np.asarray(rgb))
  else:  # CMYK: the colours back, up to JPEG's loss
    error = np.abs(pixels.astype(np.int32) - np.asarray(rgb, np.int32))
    assert error.mean() < 3 and error.max() <= 12, (error.mean(), error.max())


# ---------------------------------------------------------------------------
# RandomResizedCrop.


def test_random_resized_crop_box_ranges():
  """Area fraction in the scale range, aspect in the ratio range, inside."""
  width, height = 500, 375
  stats = []
  for seed in range(2000):
    left, top, w, h = augment.random_resized_crop_box(
        width, height, (0.08, 1.0), augment.RRC_RATIO,
        np.random.default_rng(seed))
    assert 0 <= left and left + w <= width and 0 <= top and top + h <= height
    stats.append((w * h / (width * height), w / h))
  area, aspect = np.array(stats).T
  assert area.min() >= 0.079 and area.max() <= 1.0  # up to rounding
  assert area.min() < 0.09 and area.max() > 0.9  # the whole range is used
  assert aspect.min() >= 0.74 and aspect.max() <= 1.34
  assert aspect.min() < 0.77 and aspect.max() > 1.3  # both extremes reached


def test_random_resized_crop_fallback_is_central_clamped_crop():
  """Ten misses (an image too thin for the scale) -> central 4:3 crop."""
  box = augment.random_resized_crop_box(1000, 50, (0.9, 1.0), augment.RRC_RATIO,
                                        np.random.default_rng(0))
  assert box == ((1000 - 67) // 2, 0, 67, 50)  # w = round(50 * 4 / 3)
  box = augment.random_resized_crop_box(40, 40, (1.0, 1.0), augment.RRC_RATIO,
                                        np.random.default_rng(0))
  assert box == (0, 0, 40, 40)


def test_train_crop_equals_torchvision_resized_crop():
  """Everything but the crop off: output is crop-then-resize of the image."""
  img = _pattern(60, 45)
  cfg = _cfg(hflip=0.0, randaugment='', random_erasing=0.0)
  for seed in range(3):
    out = _train_image(_encode(img), np.random.default_rng(seed),
                                  cfg)
    left, top, w, h = augment.random_resized_crop_box(
        60, 45, (0.08, 1.0), augment.RRC_RATIO, np.random.default_rng(seed))
    expected = img.crop((left, top, left + w, top + h)).resize((32, 32),
                                                                BICUBIC)
    np.testing.assert_array_equal(out, _pixels(expected))


def test_no_crop_when_scale_is_none():
  img = _pattern(50, 40)
  cfg = _cfg(random_resized_crop_scale=None, hflip=0.0, randaugment=None,
             random_erasing=0.0)
  cfg.interpolation = 'bilinear'
  out = _train_image(_encode(img), np.random.default_rng(0), cfg)
  expected = img.resize((32, 32), Image.Resampling.BILINEAR)
  np.testing.assert_array_equal(out, _pixels(expected))


def test_reduced_jpeg_decode_is_close_to_full_decode():
  """A crop 4x the output size decodes at 1/4 scale; pixels barely move."""
  data = _encode(_pattern(1000, 800), 'JPEG', quality=90)
  size = 64
  for box in [(0, 0, 1000, 800), (100, 50, 300, 280), (10, 20, 700, 640)]:
    # pylint: disable=protected-access
    reduced = augment._resized_crop(augment._open(data), box, size, BICUBIC)
    full = augment._resized_crop(augment.decode_image(data), box, size,
                                 BICUBIC)
    diff = np.abs(np.asarray(reduced, np.float32) -
                  np.asarray(full, np.float32))
    assert diff.mean() < 1.0, box
    assert np.percentile(diff, 99) < 8, box


# ---------------------------------------------------------------------------
# Flip.


@pytest.mark.parametrize('p', [0.0, 0.5, 1.0])
def test_flip_rate(p):
  img = _pattern(16, 16)
  cfg = _cfg(size=16, random_resized_crop_scale=None, hflip=p, randaugment='',
             random_erasing=0.0)
  plain = _pixels(img)
  mirrored = plain[:, ::-1]
  flips = 0
  for seed in range(400):
    out = _train_image(_encode(img), np.random.default_rng(seed),
                                  cfg)
    is_flipped = np.array_equal(out, mirrored)
    assert is_flipped or np.array_equal(out, plain)
    flips += is_flipped
  assert abs(flips / 400 - p) < 0.08  # 3.2 std at p = 0.5


# ---------------------------------------------------------------------------
# RandAugment.


def test_parse_recipe_string():
  spec = augment.parse_randaugment('rand-m9-mstd0.5-inc1')
  assert spec == augment.RandAugmentSpec(
      ops=augment.RAND_INCREASING_OPS, num_ops=2, magnitude=9,
      magnitude_std=0.5, magnitude_max=10.0, prob=0.5)
  assert len(spec.ops) == 15 and 'Cutout' not in spec.ops
  spec = augment.parse_randaugment('rand-n3-p0.7-mstd101-mmax12-inc0')
  assert spec.ops == augment.RAND_OPS and spec.num_ops == 3
  assert spec.prob == 0.7 and spec.magnitude == 10
  assert spec.magnitude_std == math.inf and spec.magnitude_max == 12
  assert set(augment.RAND_OPS + augment.RAND_INCREASING_OPS) == set(
      augment.RAND_AUGMENT_OPS)


@pytest.mark.parametrize('spec,bad', [
    ('augmix-m9', "'augmix'"),
    ('rand-m9-x3', "'x3'"),
    ('rand-mfoo', "'mfoo'"),
    ('rand-m9.5-inc1', "'m9.5'"),
    ('rand-m9-tweights', "'tweights'"),
    ('rand-m9-p2', 'p must be'),
    ('rand-m9--inc1', "''"),
])
def test_parse_rejects_malformed_strings(spec, bad):
  with pytest.raises(ValueError, match=bad.replace('.', r'\.')):
    augment.parse_randaugment(spec)


def test_malformed_string_in_config_raises():
  cfg = _cfg(randaugment='rand-m9-mstd0.5-inc1-q3')
  with pytest.raises(ValueError, match="'q3'"):
    augment.train_transform(_encode(_pattern(40, 40)),
                            np.random.default_rng(0), cfg)


@pytest.mark.parametrize('name', sorted(augment.RAND_AUGMENT_OPS))
def test_each_op_changes_the_image(name):
  img = _pattern(32, 32)
  out = augment.apply_op(img, name, 9.0, np.random.default_rng(0), fill=FILL,
                         resample=BICUBIC)
  assert out.mode == 'RGB' and out.size == img.size
  assert not np.array_equal(np.asarray(out), np.asarray(img))


def _level(name, magnitude, seed=0):
  _, level_fn = augment.RAND_AUGMENT_OPS[name]
  return level_fn(magnitude, np.random.default_rng(seed))


@pytest.mark.parametrize('name,at_0,at_10', [
    ('Rotate', 0.0, 30.0),
    ('ShearX', 0.0, 0.3),
    ('ShearY', 0.0, 0.3),
    ('TranslateXRel', 0.0, 0.45),
    ('TranslateYRel', 0.0, 0.45),
    ('ColorIncreasing', 0.0, 0.9),  # |factor - 1|
    ('ContrastIncreasing', 0.0, 0.9),
    ('BrightnessIncreasing', 0.0, 0.9),
    ('SharpnessIncreasing', 0.0, 0.9),
])
def test_signed_magnitude_ranges(name, at_0, at_10):
  """timm: |arg| = level / 10 * max, sign +- with probability 1/2 each."""
  offset = 1.0 if name.endswith('Increasing') else 0.0
  assert abs(_level(name, 0.0) - offset) == pytest.approx(at_0)
  values = [_level(name, 10.0, seed) - offset for seed in range(200)]
  np.testing.assert_allclose(np.abs(values), at_10, rtol=1e-9)
  assert 0.35 < np.mean(np.array(values) > 0) < 0.65
  assert _level(name, 5.0) - offset == pytest.approx(
      math.copysign(at_10 / 2, _level(name, 10.0) - offset))


@pytest.mark.parametrize('name,levels', [
    ('PosterizeIncreasing', {0: 4, 5: 2, 9: 1, 10: 0}),  # bits kept
    ('Posterize', {0: 0, 5: 2, 10: 4}),
    ('SolarizeIncreasing', {0: 256, 5: 128, 9: 26, 10: 0}),  # threshold
    ('Solarize', {0: 0, 5: 128, 10: 256}),
    ('SolarizeAdd', {0: 0, 5: 55, 10: 110}),  # added below 128
    ('Color', {0: 0.1, 5: 1.0, 10: 1.9}),  # enhancement factor
])
def test_unsigned_magnitude_ranges(name, levels):
  for level, expected in levels.items():
    assert _level(name, float(level)) == pytest.approx(expected)


def test_geometric_ops_fill_with_mean_colour():
  img = Image.new('RGB', (32, 32), (255, 255, 255))
  for name in ('Rotate', 'ShearX', 'TranslateXRel'):
    out = np.asarray(augment.apply_op(img, name, 10.0,
                                      np.random.default_rng(0), fill=FILL,
                                      resample=BICUBIC))
    corners = out[[0, 0, -1, -1], [0, -1, 0, -1]]
    assert (corners == FILL).all(axis=-1).any(), name


def test_magnitude_noise():
  rng = np.random.default_rng(0)
  spec = augment.parse_randaugment('rand-m9-mstd0.5-inc1')
  mags = np.array([augment.sample_magnitude(spec, rng) for _ in range(4000)])
  assert mags.max() <= 10.0 and (mags == 10.0).any()  # clipped at mmax
  assert abs(mags.mean() - 8.99) < 0.03  # 9, pulled down by the clip
  assert 0.45 < mags.std() < 0.52
  spec = augment.parse_randaugment('rand-m9-mstd101')
  mags = np.array([augment.sample_magnitude(spec, rng) for _ in range(4000)])
  assert mags.min() >= 0 and mags.max() <= 9 and abs(mags.mean() - 4.5) < 0.2
  spec = augment.parse_randaugment('rand-m9')
  assert augment.sample_magnitude(spec, rng) == 9


def test_ops_drawn_and_applied_with_prob():
  """Each of n draws picks an op uniformly and applies it with prob p."""
  img = _pattern(16, 16)
  spec = augment.RandAugmentSpec(ops=('Invert', 'SolarizeAdd'), num_ops=1,
                                 magnitude=9, prob=0.5)
  outcomes = {'Invert': 0, 'SolarizeAdd': 0, None: 0}
  expected = {name: np.asarray(augment.apply_op(
      img, name, 9.0, np.random.default_rng(0), fill=FILL, resample=BICUBIC))
              for name in ('Invert', 'SolarizeAdd')}
  expected[None] = np.asarray(img)
  for seed in range(800):
    out = np.asarray(augment.rand_augment(img, spec,
                                          np.random.default_rng(seed),
                                          fill=FILL, resample=BICUBIC))
    (name,) = [k for k, v in expected.items() if np.array_equal(out, v)]
    outcomes[name] += 1
  assert abs(outcomes[None] / 800 - 0.5) < 0.06
  assert abs(outcomes['Invert'] / 800 - 0.25) < 0.05
  assert abs(outcomes['SolarizeAdd'] / 800 - 0.25) < 0.05


# ---------------------------------------------------------------------------
# RandomErasing.


def test_random_erasing_rate_and_boxes():
  size = 64
  boxes = np.stack([augment.random_erasing_box(size, size,
                                               np.random.default_rng(seed),
                                               0.25)
                    for seed in range(1000)])
  drawn = boxes[boxes[:, 2] > 0]
  assert not boxes[boxes[:, 2] == 0].any()  # no box: all zero
  assert abs(len(drawn) / 1000 - 0.25) < 0.045  # 3.3 std
  top, left, h, w = drawn.T
  assert (h < size).all() and (w < size).all()
  assert (top + h <= size).all() and (left + w <= size).all()
  areas, aspects = h * w / size**2, h / w
  assert areas.min() >= 0.018 and areas.max() <= 0.34  # (0.02, 1/3) + rounding
  assert aspects.min() >= 0.28 and aspects.max() <= 3.6  # (0.3, 1/0.3)


def test_erasing_fills_exactly_the_box_with_unit_noise():
  images = jnp.full((3, 40, 48, 3), 7.0)
  boxes = jnp.asarray([[5, 9, 20, 30], [0, 0, 0, 0], [39, 47, 1, 1]])
  out = np.asarray(on_device.erase(images, boxes, jax.random.PRNGKey(0)))
  changed = out != 7.0
  np.testing.assert_array_equal(changed[0].any(-1),
                                np.pad(np.ones((20, 30), bool),
                                       ((5, 15), (9, 9))))
  assert changed[0].all(-1).sum() == 20 * 30  # every channel of the box
  assert not changed[1].any()
  assert changed[2, 39, 47].all() and changed[2].sum() == 3
  noise = out[0][changed[0]]
  assert abs(noise.mean()) < 0.05 and abs(noise.std() - 1.0) < 0.05
  again = on_device.erase(images, boxes, jax.random.PRNGKey(0))
  np.testing.assert_array_equal(out, again)


def test_train_transform_draws_the_box_and_leaves_pixels_whole():
  """With p = 1 an erasing box comes with the uint8 pixels, untouched: the
  N(0, 1) fill needs the normalised image, on the device."""
  img = Image.new('RGB', (40, 40), (128, 128, 128))
  cfg = _cfg(hflip=0.0, randaugment='', random_erasing=1.0)
  out = augment.train_transform(_encode(img), np.random.default_rng(0), cfg)
  np.testing.assert_array_equal(out['image'], np.full((32, 32, 3), 128))
  top, left, h, w = out['erase_box']
  assert out['erase_box'].dtype == np.int32
  assert 0.02 * 32**2 <= h * w <= 32**2 / 3 + 40
  assert top + h <= 32 and left + w <= 32
  assert 'erase_box' not in augment.train_transform(
      _encode(img), np.random.default_rng(0), _cfg(random_erasing=0.0))


# ---------------------------------------------------------------------------
# Evaluation.


def test_eval_is_exact_center_crop_when_no_resize_needed():
  """Shorter side already floor(28 / 0.875) = 32: a pure crop."""
  img = _pattern(45, 32)
  out = augment.eval_transform(_encode(img), _cfg(size=28))
  assert out.dtype == np.uint8 and out.shape == (28, 28, 3)
  # torchvision: left = int(round(17 / 2)) = 8 (half to even), top = 2.
  np.testing.assert_array_equal(out, _pixels(np.asarray(img)[2:30, 8:36]))


def test_eval_resizes_shorter_side_then_crops():
  img = _pattern(75, 50)
  out = augment.eval_transform(_encode(img), _cfg(size=28))
  resized = img.resize((48, 32), BICUBIC)  # int(32 * 75 / 50) = 48
  np.testing.assert_array_equal(out, _pixels(resized.crop((10, 2, 38, 30))))
  tall = img.transpose(Image.Transpose.ROTATE_90)  # 50 x 75
  out = augment.eval_transform(_encode(tall), _cfg(size=28))
  expected = tall.resize((32, 48), BICUBIC).crop((2, 10, 30, 38))
  np.testing.assert_array_equal(out, _pixels(expected))


def test_normalisation_on_device_is_torchs():
  """All 256 levels of every channel, jitted: within 1e-6 of torch's
  ToTensor + Normalize in float32 ((x / 255 - m) / s)."""
  levels = np.arange(256, dtype=np.uint8)[:, None].repeat(3, axis=1)
  mean, std = np.float32(common.IMAGENET_MEAN), np.float32(common.IMAGENET_STD)
  torch_values = (levels.astype(np.float32) / np.float32(255) - mean) / std
  normalize = jax.jit(functools.partial(on_device.normalize,
                                        mean=common.IMAGENET_MEAN,
                                        std=common.IMAGENET_STD))
  out = normalize(levels)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, torch_values, rtol=0, atol=1e-6)


def test_bad_interpolation_and_crop_pct():
  cfg = _cfg()
  cfg.interpolation = 'lanczos'
  with pytest.raises(ValueError, match='lanczos'):
    augment.eval_transform(_encode(_pattern(40, 40)), cfg)
  cfg = _cfg()
  cfg.eval_crop_pct = 1.5
  with pytest.raises(ValueError, match='eval_crop_pct'):
    augment.eval_transform(_encode(_pattern(40, 40)), cfg)


# ---------------------------------------------------------------------------
# The full recipe.


def test_full_recipe_shape_and_determinism():
  data = _encode(_pattern(120, 90), 'JPEG', quality=90)
  cfg = _cfg(size=48)  # rand-m9-mstd0.5-inc1, erasing 0.25, flip 0.5
  outs = [augment.train_transform(data, np.random.default_rng(seed), cfg)
          for seed in (7, 7, 8)]
  assert outs[0]['image'].dtype == np.uint8
  assert outs[0]['image'].shape == (48, 48, 3)
  assert set(outs[0]) == {'image', 'erase_box'}
  for key in outs[0]:
    np.testing.assert_array_equal(outs[0][key], outs[1][key])
  assert not np.array_equal(outs[0]['image'], outs[2]['image'])


def test_recipe_changes_images_often():
  """With RA at p 0.5 x 2 ops, about 3 in 4 images get at least one op."""
  data = _encode(_pattern(40, 40))
  cfg = _cfg(random_resized_crop_scale=None, hflip=0.0, random_erasing=0.0)
  plain = _pixels(_pattern(40, 40).resize((32, 32), BICUBIC))
  changed = np.mean([
      not np.array_equal(_train_image(
          data, np.random.default_rng(seed), cfg), plain)
      for seed in range(300)])
  assert 0.65 < changed < 0.85


def test_posterize_matches_pillow_and_keeps_timm_zero_bits():
  img = _pattern(24, 24)
  for bits in range(1, 5):
    out = augment.RAND_AUGMENT_OPS['Posterize'][0](img, bits, FILL, BICUBIC)
    np.testing.assert_array_equal(np.asarray(out),
                                  np.asarray(ImageOps.posterize(img, bits)))
  black = augment.apply_op(img, 'PosterizeIncreasing', 10.0,
                           np.random.default_rng(0), fill=FILL,
                           resample=BICUBIC)
  assert not np.asarray(black).any()
