"""Mixup / CutMix / label smoothing on device (glmix_jax.data.mix)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from glmix_jax.data import mix

K = 10
B, H, W = 8, 12, 10


def _batch():
  """Image i is the constant i + 1: every output pixel names its source."""
  images = jnp.broadcast_to(
      jnp.arange(1.0, B + 1)[:, None, None, None], (B, H, W, 3))
  labels = jnp.arange(B) % K  # distinct labels
  return images, labels


def _mix(key, images, labels, **overrides):
  kwargs = dict(num_classes=K, mixup_alpha=0.8, cutmix_alpha=1.0,
                mix_prob=1.0, switch_prob=0.5, label_smoothing=0.1)
  kwargs.update(overrides)
  return mix.mix_batch(key, images, labels, **kwargs)


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
  out, targets = _mix(jax.random.key(0), images, labels, mix_prob=0.0)
  np.testing.assert_array_equal(out, images)
  np.testing.assert_array_equal(targets, mix.smooth_targets(labels, K, 0.1))


@pytest.mark.parametrize('seed', range(4))
def test_mixup_blends_with_reversed_batch(seed):
  images, labels = _batch()
  out, targets = _mix(jax.random.key(seed), images, labels, cutmix_alpha=0.0,
                      label_smoothing=0.0)
  lam = float(targets[0, labels[0]])
  assert 0.0 < lam < 1.0
  expected = lam * images + (1 - lam) * images[::-1]
  np.testing.assert_allclose(out, expected, rtol=1e-6)
  # Partner of image i is B-1-i, weighted 1 - lam; one lam for the batch.
  np.testing.assert_allclose(targets[np.arange(B), labels[::-1]], 1 - lam,
                             rtol=1e-6)
  np.testing.assert_allclose(targets[np.arange(B), labels], lam, rtol=1e-6)


@pytest.mark.parametrize('seed', range(6))
def test_cutmix_lambda_is_pasted_area_fraction(seed):
  images, labels = _batch()
  out, targets = _mix(jax.random.key(seed), images, labels, mixup_alpha=0.0,
                      label_smoothing=0.0)
  out = np.asarray(out)
  own = out == np.asarray(images)
  pasted = out == np.asarray(images[::-1])
  assert np.all(own | pasted)  # a select, never a blend
  # The same rectangle in every image.
  box = pasted[0, :, :, 0]
  assert np.all(pasted[..., 0] == box)
  rows, cols = np.nonzero(box)
  if rows.size:
    assert box[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()
  lam = 1.0 - box.mean()
  np.testing.assert_allclose(targets[np.arange(B), labels], lam, rtol=1e-6)
  np.testing.assert_allclose(targets[np.arange(B), labels[::-1]], 1 - lam,
                             rtol=1e-6, atol=1e-7)


def test_targets_rows_sum_to_one_and_smoothing_folded_in():
  images, labels = _batch()
  for seed in range(5):
    _, targets = _mix(jax.random.key(seed), images, labels)
    np.testing.assert_allclose(targets.sum(axis=1), 1.0, rtol=1e-6)
    # Classes in neither pair member keep exactly eps / K.
    untouched = np.ones((B, K), bool)
    untouched[np.arange(B), labels] = False
    untouched[np.arange(B), labels[::-1]] = False
    np.testing.assert_allclose(np.asarray(targets)[untouched], 0.01,
                               rtol=1e-6)


def test_switch_and_lambda_statistics():
  """Over many batches: CutMix about switch_prob of the time, E[lam] = 0.5."""
  images, labels = _batch()
  keys = jax.random.split(jax.random.key(1), 2000)
  fn = jax.jit(jax.vmap(functools.partial(
      _mix, images=images, labels=labels, label_smoothing=0.0)))
  out, targets = fn(keys)
  out = np.asarray(out)
  is_select = np.all((out == np.asarray(images)) |
                     (out == np.asarray(images[::-1])), axis=(1, 2, 3, 4))
  assert 0.45 < is_select.mean() < 0.55  # std 0.011
  lam = np.asarray(targets[:, 0, labels[0]])
  mixup_lam = lam[~is_select]
  assert abs(mixup_lam.mean() - 0.5) < 0.03
  # Beta(0.8, 0.8): variance 0.64 / (2.56 * 2.6) ~ 0.096.
  assert 0.08 < mixup_lam.var() < 0.11
  # Clipping the CutMix box at the borders only removes pasted area, so the
  # corrected lambda sits above Beta(1, 1)'s mean of 0.5.
  assert 0.55 < lam[is_select].mean() < 0.8


def test_jit_matches_eager_and_keeps_dtype():
  images, labels = _batch()
  images = images.astype(jnp.bfloat16)
  fn = functools.partial(_mix, num_classes=K)
  eager = fn(jax.random.key(3), images, labels)
  jitted = jax.jit(fn)(jax.random.key(3), images, labels)
  assert jitted[0].dtype == jnp.bfloat16
  assert jitted[1].dtype == jnp.float32
  for a, b in zip(eager, jitted):
    np.testing.assert_allclose(np.asarray(a, np.float32),
                               np.asarray(b, np.float32), rtol=1e-6)


def test_batch_sharded_over_devices_gives_same_result():
  images, labels = _batch()
  mesh = jax.make_mesh((8,), ('data',))
  sharding = jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec('data'))
  fn = jax.jit(_mix)
  reference = fn(jax.random.key(5), images, labels)
  sharded = fn(jax.random.key(5), jax.device_put(images, sharding),
               jax.device_put(labels, sharding))
  for a, b in zip(reference, sharded):
    np.testing.assert_array_equal(a, b)


def test_invalid_arguments():
  images, labels = _batch()
  with pytest.raises(ValueError, match='even'):
    _mix(jax.random.key(0), images[:3], labels[:3])
  with pytest.raises(ValueError, match='smooth_targets'):
    _mix(jax.random.key(0), images, labels, mixup_alpha=0.0, cutmix_alpha=0.0)
