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
  """The jitted ``(weights, batch_stats, batch) -> ({name: pre_logits},
  label, mask)`` for a dict of parameter sets (raw, EMA) evaluated on the
  same decoded batch, in evaluation mode, replicated on every process."""

  def features(weights, batch_stats, batch):
    images = on_device.normalize(batch['image'], mean, std)

    def pre_logits(params):
      _, maps = model.apply({'params': params, 'batch_stats': batch_stats},
                            images, train=False, return_features=True)
      return maps['pre_logits'].astype(jnp.float32)

    return ({name: pre_logits(params) for name, params in weights.items()},
            batch['label'], batch['mask'])

  replicated = NamedSharding(mesh, PartitionSpec())
  return jax.jit(sharding.traced_on(mesh, features), out_shardings=replicated)


class _Subset:
  """Records ``indices`` of a random-access source, in that order."""

  def __init__(self, source, indices: Sequence[int]):
    self._source, self._indices = source, list(indices)

  def __len__(self) -> int:
    return len(self._indices)

  def __getitem__(self, i: int):
    return self._source[int(self._indices[i])]


def shots_by_class(label_of: Callable[[int], int], num_records: int,
                   shots: int, seed: int, num_classes: int | None = None
                   ) -> dict[int, list[int]]:
  """For each class, its first ``shots`` records in the seed's permutation
  of the split (fewer if the split has fewer). Labels are read in that
  order, and only until each of ``num_classes`` classes (if known) has its
  shots: a few times shots x classes records, not all of ImageNet's 1.28M.
  The k-shot set of any k <= shots is the first k of each class."""
  chosen: dict[int, list[int]] = {}
  full = 0
  for index in np.random.default_rng(seed).permutation(num_records):
    of_class = chosen.setdefault(int(label_of(int(index))), [])
    if len(of_class) < shots:
      of_class.append(int(index))
      full += len(of_class) == shots
      if full == num_classes:
        break
  return dict(sorted(chosen.items()))


def label_classes(source) -> int | None:
  """The classes of a TFDS source's ``label`` feature, if it declares them."""
  info = getattr(source, 'dataset_info', None)
  label = (info.features['label']
           if info is not None and 'label' in info.features else None)
  return getattr(label, 'num_classes', None)


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


def _features(fn: Callable, weights: dict[str, Any], batch_stats, batches,
              mesh) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """Every weight set's features of the unpadded examples, and their labels
  (on several processes the rows come back in another order than the
  records, so each row keeps its own label)."""
  xs, ys = {name: [] for name in weights}, []
  for batch in sharding.device_batches(batches, mesh):
    x, y, mask = jax.device_get(fn(weights, batch_stats, batch))
    for name in weights:
      xs[name].append(x[name][mask])
    ys.append(y[mask])
  return {name: np.concatenate(x) for name, x in xs.items()}, np.concatenate(ys)


def run(config: ml_collections.ConfigDict, entry: ml_collections.ConfigDict,
        *, name: str, train_source, eval_source, model,
        weights: dict[str, Any], batch_stats, mesh,
        global_batch: int) -> dict[str, float]:
  """``'<weights><name>_<k>shot'`` top-1 scores of the evaluation ``entry``
  (a ``config.evals`` item of type fewshot) for each set of ``weights``.
  Each image is decoded once for all weight sets, and each shot image once
  for all k: the features of shots [k_prev, k) of every class are added to
  those of the smaller sets."""
  fn = feature_fn(model, config.data.mean, config.data.std, mesh)
  batches = functools.partial(data_input.eval_batches, config,
                              global_batch=global_batch)
  shots = sorted(entry.shots)
  by_class = shots_by_class(
      lambda i: pipeline.read_record(train_source, i)['label'],
      len(train_source), shots[-1], config.seed, label_classes(train_source))
  x_eval, y_eval = _features(fn, weights, batch_stats, batches(eval_source),
                             mesh)
  # the probed dataset's classes, whatever the classifier's
  num_classes = int(max(max(by_class), y_eval.max())) + 1
  x_shots = {prefix: np.zeros((0, x.shape[1]), x.dtype)
             for prefix, x in x_eval.items()}
  y_shots = np.zeros((0,), y_eval.dtype)
  scores, done = {}, 0
  for k in shots:
    added = [i for of_class in by_class.values() for i in of_class[done:k]]
    if added:
      x_new, y_new = _features(fn, weights, batch_stats,
                               batches(_Subset(train_source, added)), mesh)
      x_shots = {p: np.concatenate([x_shots[p], x_new[p]]) for p in x_shots}
      y_shots = np.concatenate([y_shots, y_new])
    done = k
    for prefix in weights:
      scores[f'{prefix}{name}_{k}shot'] = ridge_accuracy(
          x_shots[prefix], y_shots, x_eval[prefix], y_eval,
          num_classes=num_classes, l2_reg=entry.l2_reg)
  return scores
