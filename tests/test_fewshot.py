"""Few-shot linear probes (``glmix_jax.fewshot``, ``type='fewshot'`` evals)."""

import jax
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
  read = []

  def label_of(i):
    read.append(i)
    return labels[i]

  chosen = fewshot.shots_by_class(label_of, len(labels), 3, seed=0,
                                  num_classes=5)
  assert sorted(chosen) == list(range(5))
  flat = [i for of_class in chosen.values() for i in of_class]
  assert [len(c) for c in chosen.values()] == [3] * 5
  assert all(labels[i] == c for c, of_class in chosen.items() for i in of_class)
  assert len(set(flat)) == 15
  # The first 3 of each class in the seed's order, reading labels only until
  # every class has them.
  order = np.random.default_rng(0).permutation(len(labels)).tolist()
  assert read == order[:len(read)] and len(read) < len(labels)
  for c, of_class in chosen.items():
    assert of_class == [i for i in order if labels[i] == c][:3]
  assert chosen == fewshot.shots_by_class(labels.__getitem__, 35, 3, 0)
  assert chosen != fewshot.shots_by_class(labels.__getitem__, 35, 3, seed=1)
  # A class with fewer images than shots gives what it has.
  assert sum(map(len, fewshot.shots_by_class(labels.__getitem__, 35, 10, 0,
                                             5).values())) == 35


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
      x, y, mask = (np.asarray(a) for a in jax.tree.leaves(fn(
          {'raw': state['params']}, state['batch_stats'], batch)))
      xs.append(x[mask])
      ys.append(y[mask])
    return np.concatenate(xs), np.concatenate(ys)

  source = evaluation.train_source
  picked = fewshot.shots_by_class(lambda i: source[i]['label'], len(source),
                                  5, config.seed)
  x_eval, y_eval = features(evaluation.source)
  x, y = features([source[i] for of_class in picked.values()
                   for i in of_class])
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
