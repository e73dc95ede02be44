"""Few-shot linear probes on frozen features, an evaluation of any weights.

The closed-form probe of big_vision's ``evaluators/fewshot_lsr.py`` (as in
BiT, Kolesnikov et al. 2020, and ViT, Dosovitskiy et al. 2021, Sec. 4.1):
for each shot count k, k training images of every class (the first k of
each class in a permutation of the training split drawn from the seed), the
model's pre-logit features (``'pre_logits'``, the classifier's input) of
those images and of every evaluation image, both with the evaluation
transform; then a ridge regression to the one-hot targets in {-1, +1}:

  X = standardise(features) (train mean and std), with a constant column 100
  (an in effect unregularised bias);  W = (X^T X + l2 I)^-1 X^T Y,

solved in float64 on the host (in the N x N dual form when there are fewer
images than features), and the top-1 accuracy of argmax(X_eval W).

A ``config.evals`` entry with ``type='fewshot'`` runs it (``eval.py --evals``
or in training): ``train_split`` gives the shots, ``split`` the images scored,
``shots`` the k values, ``l2_reg`` the ridge; scores are
``'<name>_<k>shot'``.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from glmix_jax import sharding
from glmix_jax.data import input as data_input
from glmix_jax.data import on_device, pipeline

BIAS_FEATURE = 100.0  # large, so that the ridge barely shrinks the bias


def feature_fn(model, mean: Sequence[float], std: Sequence[float],
               mesh: jax.sharding.Mesh) -> Callable:
  """The jitted ``(params, batch_stats, batch) -> (pre_logits, label,
  mask)``, in evaluation mode, replicated on every process."""

  def features(params, batch_stats, batch):
    images = on_device.normalize(batch['image'], mean, std)
    _, maps = model.apply({'params': params, 'batch_stats': batch_stats},
                          images, train=False, return_features=True)
    return (maps['pre_logits'].astype(jnp.float32), batch['label'],
            batch['mask'])

  replicated = NamedSharding(mesh, PartitionSpec())
  return jax.jit(sharding.traced_on(mesh, features), out_shardings=replicated)


class _Subset:
  """Records ``indices`` of a random-access source, in that order."""

  def __init__(self, source, indices: np.ndarray):
    self._source, self._indices = source, indices

  def __len__(self) -> int:
    return len(self._indices)

  def __getitem__(self, i: int):
    return self._source[int(self._indices[i])]


def shot_indices(labels: np.ndarray, shots: int, seed: int) -> np.ndarray:
  """The first ``shots`` records of each class in the seed's permutation of
  the split (sorted by class, then by that order)."""
  order = np.random.default_rng(seed).permutation(len(labels))
  chosen = []
  for label in np.unique(labels):
    of_class = order[labels[order] == label]
    chosen.extend(of_class[:shots])
  return np.asarray(chosen, np.int64)


def split_labels(source) -> np.ndarray:
  """Every record's label (the images are not decoded)."""
  return np.asarray([pipeline.read_record(source, i)['label']
                     for i in range(len(source))], np.int64)


def ridge_accuracy(x_train: np.ndarray, y_train: np.ndarray,
                   x_test: np.ndarray, y_test: np.ndarray, *,
                   num_classes: int, l2_reg: float) -> float:
  """Top-1 on (x_test, y_test) of the ridge regression described above."""
  x_train, x_test = (np.asarray(x, np.float64) for x in (x_train, x_test))
  mean, std = x_train.mean(0), x_train.std(0) + 1e-5

  def design(x):
    x = (x - mean) / std
    return np.concatenate([x, np.full((len(x), 1), BIAS_FEATURE)], axis=1)

  x, targets = design(x_train), 2.0 * np.eye(num_classes)[y_train] - 1.0
  n, d = x.shape
  if n >= d:
    weights = np.linalg.solve(x.T @ x + l2_reg * np.eye(d), x.T @ targets)
  else:  # the same W, through the n x n system: X^T (X X^T + l2 I)^-1 Y
    weights = x.T @ np.linalg.solve(x @ x.T + l2_reg * np.eye(n), targets)
  return float(np.mean(np.argmax(design(x_test) @ weights, -1) == y_test))


def _features(fn: Callable, params, batch_stats, batches, mesh
              ) -> tuple[np.ndarray, np.ndarray]:
  xs, ys = [], []
  for batch in sharding.device_batches(batches, mesh):
    x, y, mask = jax.device_get(fn(params, batch_stats, batch))
    xs.append(x[mask])
    ys.append(y[mask])
  return np.concatenate(xs), np.concatenate(ys)


def run(config: ml_collections.ConfigDict, entry: ml_collections.ConfigDict,
        *, name: str, train_source, eval_source, model,
        weights: dict[str, Any], batch_stats, mesh,
        global_batch: int) -> dict[str, float]:
  """``'<weights><name>_<k>shot'`` top-1 scores of the evaluation ``entry``
  (a ``config.evals`` item of type fewshot) for each set of ``weights``."""
  fn = feature_fn(model, config.data.mean, config.data.std, mesh)
  labels = split_labels(train_source)
  batches = functools.partial(data_input.eval_batches, config,
                              global_batch=global_batch)
  scores = {}
  for prefix, params in weights.items():
    x_eval, y_eval = _features(fn, params, batch_stats,
                               batches(eval_source), mesh)
    for k in entry.shots:
      # Each shot set's features come with their labels (on several
      # processes the rows come back in another order than the records).
      x_shots, y_shots = _features(
          fn, params, batch_stats, batches(_Subset(
              train_source, shot_indices(labels, k, config.seed))), mesh)
      scores[f'{prefix}{name}_{k}shot'] = ridge_accuracy(
          x_shots, y_shots, x_eval, y_eval, l2_reg=entry.l2_reg,
          # the probed dataset's classes, whatever the classifier's
          num_classes=int(max(labels.max(), y_eval.max())) + 1)
  return scores
