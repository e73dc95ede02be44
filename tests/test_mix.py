"""Mixup / CutMix / label smoothing: drawn on the host, applied on device
(glmix_jax.data.mix)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hlo

from glmix_jax.data import mix

K = 10
B, H, W = 8, 12, 10
G = 4  # two mixing groups of four


def _batch():
  """Image i is the constant i + 1: every output pixel names its source."""
  images = jnp.broadcast_to(
      jnp.arange(1.0, B + 1)[:, None, None, None], (B, H, W, 3))
  labels = jnp.arange(B) % K  # distinct labels
  return images, labels


def _settings(**overrides):
  fields = dict(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5,
                label_smoothing=0.1, group_size=G)
  fields.update(overrides)
  return mix.MixSettings(**fields)


def _mix(step, images, labels, **overrides):
  settings = _settings(**overrides)
  params = mix.draw(settings, seed=0, step=step, batch=len(images),
                    height=images.shape[1], width=images.shape[2])
  out, targets = mix.mix_batch(images, labels, params, settings, K)
  return out, targets, params


# Image i's partner: the mirror image within its group of G.
PARTNER = np.arange(B) // G * G + (G - 1 - np.arange(B) % G)


def timm_rand_bbox(img_h, img_w, lam, cy, cx):
  """timm.data.mixup.rand_bbox (margin 0) for one box, its centre given."""
  ratio = np.sqrt(1 - lam)
  cut_h, cut_w = int(img_h * ratio), int(img_w * ratio)
  yl = np.clip(cy - cut_h // 2, 0, img_h)
  yh = np.clip(cy + cut_h // 2, 0, img_h)
  xl = np.clip(cx - cut_w // 2, 0, img_w)
  xh = np.clip(cx + cut_w // 2, 0, img_w)
  return yl, yh, xl, xh


def timm_mix_groups(images, labels, params, smoothing):
  """timm ``Mixup(mode='batch', correct_lam=True)`` on each group of G as
  one timm batch, in numpy (NHWC): ``_mix_batch`` then ``mixup_target``.
  From ``params`` only each group's choice: CutMix's box (its lambda is
  recomputed from the box's area, as ``correct_lam`` does) or Mixup's
  lambda."""
  images = np.array(images, np.float32)
  labels = np.asarray(labels)
  out, targets = images.copy(), []
  for g in range(B // G):
    x = images[g * G:(g + 1) * G]
    if params['mix_cutmix'][g]:
      yl, yh, xl, xh = (int(v) for v in params['mix_box'][g])
      mixed = x.copy()
      mixed[:, yl:yh, xl:xh] = x[::-1][:, yl:yh, xl:xh]
      lam = 1.0 - (yh - yl) * (xh - xl) / float(H * W)
    else:
      lam = float(params['mix_lam'][g])
      mixed = x * lam + x[::-1] * (1.0 - lam)
    out[g * G:(g + 1) * G] = mixed
    target = labels[g * G:(g + 1) * G]
    off_value = smoothing / K
    on_value = 1.0 - smoothing + off_value
    y1 = np.full((G, K), off_value)
    y1[np.arange(G), target] = on_value
    y2 = np.full((G, K), off_value)
    y2[np.arange(G), target[::-1]] = on_value
    targets.append(y1 * lam + y2 * (1.0 - lam))
  return out, np.concatenate(targets)


def test_rand_bbox_is_timms():
  """Hand-computed boxes (H 12, W 10), then timm's formula on many."""
  box = lambda lam, cy, cx: mix.rand_bbox(H, W, np.float64(lam), np.int64(cy),
                                          np.int64(cx)).tolist()
  # sqrt(1 - 0.75) = 0.5: a 6 x 5 box; at (3, 9) clipped on the right.
  assert box(0.75, 3, 9) == [0, 6, 7, 10]
  # sqrt(0.5625) = 0.75: sides int(9.0) = 9 and int(7.5) = 7; the half-sides
  # floor, so the box is 8 x 6, as in timm.
  assert box(0.4375, 6, 5) == [2, 10, 2, 8]
  assert box(0.0, 0, 0) == [0, 6, 0, 5]  # the whole image, at a corner
  rng = np.random.default_rng(0)
  lam = rng.uniform(0, 1, 500)
  cy, cx = rng.integers(0, H, 500), rng.integers(0, W, 500)
  np.testing.assert_array_equal(
      mix.rand_bbox(H, W, lam, cy, cx),
      [timm_rand_bbox(H, W, *v) for v in zip(lam, cy, cx)])


def test_mix_batch_is_timms_mixup_per_group():
  """Random images, both modes, smoothing 0.1: images and targets as timm's
  Mixup makes them from the same choices, for steps with each mode."""
  images = jax.random.normal(jax.random.key(0), (B, H, W, 3))
  labels = jnp.asarray([3, 7, 1, 1, 0, 9, 4, 2])  # a repeated label too
  seen = set()
  for step in range(8):
    out, targets, params = _mix(step, images, labels)
    seen.update(params['mix_cutmix'].tolist())
    want_images, want_targets = timm_mix_groups(images, labels, params, 0.1)
    np.testing.assert_allclose(out, want_images, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(targets, want_targets, rtol=1e-6, atol=1e-7)
  assert seen == {True, False}  # CutMix and Mixup both checked


def test_smooth_targets_values_exact():
  targets = mix.smooth_targets(jnp.array([3, 0]), K, 0.1)
  assert targets.dtype == jnp.float32
  expected = np.full((2, K), 0.01, np.float32)
  expected[0, 3] = expected[1, 0] = 0.91  # 1 - 0.1 + 0.1 / 10
  np.testing.assert_array_equal(targets, expected)
  np.testing.assert_array_equal(mix.smooth_targets(jnp.array([2]), 4, 0.0),
                                [[0, 0, 1, 0]])


def test_smooth_targets_acmix_resnet_spread():
  """ACmix ResNet's smooth_loss: 1 - eps on the target, eps / (K - 1) off it;
  the loss equals its formula (1 - eps) * nll_y + eps / (K - 1) * sum nll_k≠y.
  """
  targets = mix.smooth_targets(jnp.array([3]), K, 0.1, 'eps_over_k_minus_1')
  expected = np.full((1, K), 0.1 / 9, np.float32)
  expected[0, 3] = 0.9
  np.testing.assert_allclose(targets, expected, rtol=1e-7)
  logits = jax.random.normal(jax.random.key(0), (1, K))
  nll = -jax.nn.log_softmax(logits)[0]
  official = 0.9 * nll[3] + 0.1 / 9 * (nll.sum() - nll[3])
  np.testing.assert_allclose(optax.softmax_cross_entropy(logits, targets)[0],
                             official, rtol=1e-6)
  with pytest.raises(ValueError, match='eps_over_k_minus_1'):
    mix.smooth_targets(jnp.array([3]), K, 0.1, 'uniform')


def test_no_mixing_when_prob_zero():
  images, labels = _batch()
  out, targets, params = _mix(0, images, labels, prob=0.0)
  np.testing.assert_array_equal(out, images)
  np.testing.assert_array_equal(params['mix_lam'], [1.0, 1.0])
  assert not params['mix_cutmix'].any()
  expected = np.full((B, K), 0.01, np.float32)  # eps / K
  expected[np.arange(B), np.arange(B) % K] = 0.91  # 1 - eps + eps / K
  np.testing.assert_allclose(targets, expected, rtol=1e-6)


@pytest.mark.parametrize('step', range(4))
def test_mixup_blends_each_group_with_itself_reversed(step):
  images, labels = _batch()
  out, targets, params = _mix(step, images, labels, cutmix_alpha=0.0,
                              label_smoothing=0.0)
  lam = np.repeat(params['mix_lam'], G)  # one lambda per group
  assert np.all((0 < lam) & (lam < 1)) and len(set(params['mix_lam'])) == 2
  expected = (lam[:, None, None, None] * images
              + (1 - lam[:, None, None, None]) * images[PARTNER])
  np.testing.assert_allclose(out, expected, rtol=1e-6)
  np.testing.assert_allclose(targets[np.arange(B), labels], lam, rtol=1e-6)
  np.testing.assert_allclose(targets[np.arange(B), labels[PARTNER]], 1 - lam,
                             rtol=1e-6)


@pytest.mark.parametrize('step', range(6))
def test_cutmix_pastes_one_box_per_group_with_its_area_as_lambda(step):
  images, labels = _batch()
  out, targets, params = _mix(step, images, labels, mixup_alpha=0.0,
                              label_smoothing=0.0)
  out = np.asarray(out)
  own = out == np.asarray(images)
  pasted = out == np.asarray(images[PARTNER])
  assert np.all(own | pasted)  # a select, never a blend
  for group in range(B // G):
    members = slice(group * G, (group + 1) * G)
    box = pasted[group * G, :, :, 0]
    assert np.all(pasted[members, :, :, 0] == box)  # one box in the group
    rows, cols = np.nonzero(box)
    if rows.size:
      assert box[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()
    lam = 1.0 - box.mean()
    np.testing.assert_allclose(params['mix_lam'][group], lam, rtol=1e-6)
    np.testing.assert_allclose(targets[members][np.arange(G), labels[members]],
                               lam, rtol=1e-6)


def test_targets_rows_sum_to_one_and_smoothing_folded_in():
  images, labels = _batch()
  for step in range(5):
    _, targets, _ = _mix(step, images, labels)
    np.testing.assert_allclose(targets.sum(axis=1), 1.0, rtol=1e-6)
    # Classes in neither pair member keep exactly eps / K.
    untouched = np.ones((B, K), bool)
    untouched[np.arange(B), labels] = False
    untouched[np.arange(B), labels[PARTNER]] = False
    np.testing.assert_allclose(np.asarray(targets)[untouched], 0.01,
                               rtol=1e-6)


def test_switch_and_lambda_statistics():
  """Over many groups: CutMix about switch_prob of the time, Mixup's lambda
  Beta(0.8, 0.8), CutMix's area-corrected lambda above Beta(1, 1)'s mean."""
  settings = _settings(group_size=2)
  params = mix.draw(settings, seed=1, step=0, batch=8000, height=H, width=W)
  cutmix = params['mix_cutmix']
  assert 0.47 < cutmix.mean() < 0.53  # std 0.008
  mixup_lam = params['mix_lam'][~cutmix]
  assert abs(mixup_lam.mean() - 0.5) < 0.02
  # Beta(0.8, 0.8): variance 0.64 / (2.56 * 2.6) ~ 0.096.
  assert 0.085 < mixup_lam.var() < 0.107
  # Clipping the CutMix box at the borders only removes pasted area.
  assert 0.55 < params['mix_lam'][cutmix].mean() < 0.8
  box = params['mix_box']
  assert np.all(box[~cutmix] == 0)
  np.testing.assert_allclose(
      params['mix_lam'][cutmix],
      1 - ((box[:, 1] - box[:, 0]) * (box[:, 3] - box[:, 2]))[cutmix] / (H * W))


def test_draws_are_a_function_of_seed_and_step_only():
  settings = _settings()
  draw = lambda seed, step: mix.draw(settings, seed=seed, step=step,
                                     batch=64, height=H, width=W)
  jax.tree_util.tree_map(np.testing.assert_array_equal, draw(3, 7), draw(3, 7))
  assert not np.array_equal(draw(3, 7)['mix_lam'], draw(3, 8)['mix_lam'])
  assert not np.array_equal(draw(3, 7)['mix_lam'], draw(4, 7)['mix_lam'])
  # Two processes each take their consecutive half of the groups.
  halves = [mix.process_slice(draw(3, 7), p, 2) for p in range(2)]
  jax.tree_util.tree_map(lambda a, b, whole: np.testing.assert_array_equal(
      np.concatenate([a, b]), whole), *halves, draw(3, 7))


def test_jit_in_bfloat16_is_timms_mixing_and_keeps_dtype():
  """bfloat16 images, jitted: mixed in float32 (timm's numbers, to
  bfloat16's rounding), returned in bfloat16, targets float32."""
  images = jax.random.normal(jax.random.key(1), (B, H, W, 3), jnp.bfloat16)
  labels = jnp.arange(B) % K
  settings = _settings()
  fn = jax.jit(functools.partial(mix.mix_batch, settings=settings,
                                 num_classes=K))
  params = mix.draw(settings, seed=0, step=2, batch=B, height=H, width=W)
  assert params['mix_cutmix'].tolist() == [True, False]  # one of each
  out, targets = fn(images, labels, params)
  assert out.dtype == jnp.bfloat16 and targets.dtype == jnp.float32
  want_images, want_targets = timm_mix_groups(
      np.asarray(images, np.float32), labels, params, 0.1)
  np.testing.assert_allclose(np.asarray(out, np.float32), want_images,
                             rtol=2**-8, atol=2**-8)
  np.testing.assert_allclose(targets, want_targets, rtol=1e-6, atol=1e-7)


def test_mixing_split_over_devices_moves_no_images():
  """Groups of 2 on 8 devices (one group each): the same result as on one
  device, and the compiled program has no collective at all."""
  images, labels = (jnp.concatenate([t, t + B]) for t in _batch())
  settings = _settings(group_size=2)
  params = mix.draw(settings, seed=0, step=5, batch=2 * B, height=H, width=W)
  fn = jax.jit(functools.partial(mix.mix_batch, settings=settings,
                                 num_classes=K))
  mesh = jax.make_mesh((8,), ('data',))
  split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  args = jax.device_put((images, labels, params), split)
  reference = fn(images, labels, params)
  sharded = fn(*args)
  for a, b in zip(reference, sharded):
    np.testing.assert_array_equal(a, b)
  assert hlo.collectives(fn.lower(*args).compile().as_text()) == []


def test_invalid_settings():
  with pytest.raises(ValueError, match='mix_group_size=3 must be even'):
    _settings(group_size=3).check(12)
  with pytest.raises(ValueError, match='divide the per-device batch of 2'):
    _settings(group_size=4).check(2)
  _settings(group_size=2).check(2)
  with pytest.raises(ValueError, match='groups of 4'):
    mix.draw(_settings(), seed=0, step=0, batch=6, height=H, width=W)
