"""Few-shot linear probes (``glmix_jax.fewshot``, ``type='fewshot'`` evals)."""

import numpy as np
import pytest

from configs import tiny
from glmix_jax import checkpoint, fewshot, models, sharding, train_lib
from glmix_jax.data import input as data_input


def _ridge_by_lstsq(x, y, x_test, num_classes, l2):
  """The same probe as an augmented least-squares problem, [X; sqrt(l2) I] W
  = [Y; 0]: an independent route to the ridge solution."""
  mean, std = x.mean(0), x.std(0) + 1e-5
  design = lambda a: np.concatenate(
      [(a - mean) / std, np.full((len(a), 1), fewshot.BIAS_FEATURE)], 1)
  a = design(x)
  targets = 2.0 * np.eye(num_classes)[y] - 1
  stacked = np.concatenate([a, np.sqrt(l2) * np.eye(a.shape[1])])
  rhs = np.concatenate([targets, np.zeros((a.shape[1], num_classes))])
  weights = np.linalg.lstsq(stacked, rhs, rcond=None)[0]
  return np.argmax(design(x_test) @ weights, -1)


@pytest.mark.parametrize('n,d', [(40, 8), (12, 30)])  # primal, dual form
def test_ridge_accuracy_is_the_ridge_regression(n, d):
  rng = np.random.default_rng(0)
  x, y = rng.normal(size=(n, d)), np.arange(n) % 4
  x_test, y_test = rng.normal(size=(50, d)), rng.integers(0, 4, 50)
  for l2 in (1e-2, 2.0**10):
    want = np.mean(_ridge_by_lstsq(x, y, x_test, 4, l2) == y_test)
    got = fewshot.ridge_accuracy(x, y, x_test, y_test, num_classes=4,
                                 l2_reg=l2)
    assert got == want
  # Separated classes: the probe finds them from 2 shots each.
  centres = 5 * rng.normal(size=(3, d))
  x = np.repeat(centres, 2, 0) + 0.1 * rng.normal(size=(6, d))
  x_test = np.repeat(centres, 10, 0) + 0.1 * rng.normal(size=(30, d))
  assert fewshot.ridge_accuracy(x, np.repeat(np.arange(3), 2), x_test,
                                np.repeat(np.arange(3), 10), num_classes=3,
                                l2_reg=1.0) == 1.0


def test_shots_are_k_per_class_drawn_from_the_seed():
  labels = np.repeat(np.arange(5), 7)[::-1].copy()
  chosen = fewshot.shot_indices(labels, 3, seed=0)
  assert np.bincount(labels[chosen]).tolist() == [3] * 5
  assert len(set(chosen.tolist())) == 15
  np.testing.assert_array_equal(chosen, fewshot.shot_indices(labels, 3, 0))
  assert set(chosen) != set(fewshot.shot_indices(labels, 3, seed=1))
  # A class with fewer images than shots gives what it has.
  assert len(fewshot.shot_indices(labels, 10, seed=0)) == 35


def test_fewshot_evaluation_of_a_checkpoint(tiny_run):
  """``eval.py --evals=fewshot`` on the tiny run: a score per shot count and
  set of weights, each the ridge probe on the pre-logit features of that
  many training images per class, scored on the validation images."""
  config = tiny.get_config()
  results = train_lib.evaluate_checkpoint(config, workdir=str(tiny_run),
                                          evals=['fewshot'])
  assert sorted(results) == sorted(
      f'{w}fewshot_{k}shot' for w in ('', 'ema_') for k in (1, 5, 10, 25))
  # The 5-shot score, from features computed here with the model itself.
  _, state = checkpoint.latest_train_state(tiny_run)
  (evaluation,) = train_lib.open_evaluations(
      config, data_input.data_dir(config, str(tiny_run)), ['fewshot'])
  model, mesh = models.from_config(config), sharding.make_mesh()
  fn = fewshot.feature_fn(model, config.data.mean, config.data.std, mesh)

  def features(source):
    xs, ys = [], []
    for batch in sharding.device_batches(data_input.eval_batches(
        config, source, global_batch=16), mesh):
      x, y, mask = (np.asarray(a) for a in fn(
          state['params'], state['batch_stats'], batch))
      xs.append(x[mask])
      ys.append(y[mask])
    return np.concatenate(xs), np.concatenate(ys)

  labels = fewshot.split_labels(evaluation.train_source)
  picked = fewshot.shot_indices(labels, 5, config.seed)
  x_eval, y_eval = features(evaluation.source)
  x, y = features([evaluation.train_source[int(i)] for i in picked])
  np.testing.assert_array_equal(np.sort(y), np.repeat(np.arange(4), 5))
  assert results['fewshot_5shot'] == fewshot.ridge_accuracy(
      x, y, x_eval, y_eval, num_classes=4, l2_reg=2.0**10)
  assert 0 < results['fewshot_25shot'] <= 1


def test_an_unknown_evaluation_type_is_named(tiny_run):
  config = tiny.get_config()
  config.evals.fewshot.type = 'knn'
  with pytest.raises(ValueError, match="config.evals.fewshot.type='knn'; "
                     'choose one of classification, fewshot'):
    train_lib.open_evaluations(
        config, data_input.data_dir(config, str(tiny_run)), ['fewshot'])
