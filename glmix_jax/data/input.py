"""From a config to batch iterators: the dataset, the transforms, the splits.

The config's ``data`` block names the TFDS dataset and splits; its
``augmentation`` block the training transforms (``augment.train_transform``).
``data.synthetic`` (classes, images_per_class, image_size) marks the
synthetic mini-ImageNet: it is written and prepared under the workdir on
first use, so a demo needs nothing but the code.
"""

from __future__ import annotations

import functools
import os
from typing import Iterator

import jax
import ml_collections
from jax.experimental import multihost_utils
from etils import epath

from glmix_jax.data import augment, mix, pipeline, prepare, synthetic


def transform_config(config: ml_collections.ConfigDict
                     ) -> ml_collections.ConfigDict:
  """The fields ``augment`` reads: image size, normalisation, augmentation."""
  data = config.data
  return ml_collections.ConfigDict(dict(
      image_size=data.image_size, interpolation=data.interpolation,
      mean=data.mean, std=data.std, eval_crop_pct=data.eval_crop_pct,
      augmentation=config.augmentation))


def num_workers(config: ml_collections.ConfigDict) -> int:
  """``data.num_workers``; -1: one per core this process may use (its CPU
  affinity, which a launcher that binds cores per task narrows), less an
  eighth (at least one) kept for the trainer: its dispatch, the host-to-device
  copies and the runtime's threads."""
  requested = config.data.num_workers
  if requested >= 0:
    return requested
  cores = len(os.sched_getaffinity(0))
  return max(1, cores - max(1, cores // 8))


def _parallelism(config: ml_collections.ConfigDict) -> dict[str, int]:
  return dict(num_workers=num_workers(config),
              num_threads=config.data.num_threads,
              prefetch=config.data.prefetch)


def data_dir(config: ml_collections.ConfigDict, workdir: str) -> str | None:
  """The TFDS data_dir; prepares the synthetic dataset there if configured."""
  data = config.data
  if not data.get('synthetic'):
    return data.data_dir
  root = epath.Path(data.data_dir or epath.Path(workdir) / 'data')
  if jax.process_index() == 0 and not (root / 'imagenet2012').exists():
    manual = root / 'manual'
    synthetic.write_dataset(manual, seed=config.seed,
                            **data.synthetic.to_dict())
    prepare.prepare('imagenet2012', data_dir=str(root), manual_dir=str(manual))
  multihost_utils.sync_global_devices('synthetic dataset ready')
  return str(root)


def train_batches(config: ml_collections.ConfigDict, source, *,
                  start_step: int, global_batch: int) -> Iterator[dict]:
  """This process's training batches from ``start_step`` on, with the
  step's Mixup/CutMix draws (``mix.draw``) when mixing is on."""
  batches = pipeline.train_batches(
      source,
      functools.partial(augment.train_transform, cfg=transform_config(config)),
      seed=config.seed, global_batch=global_batch, start_step=start_step,
      process_index=jax.process_index(), process_count=jax.process_count(),
      repeats=config.augmentation.repeated_augmentation,
      **_parallelism(config))
  settings = mix.MixSettings.from_config(config.augmentation)
  if not settings.enabled:
    return batches
  size = config.data.image_size
  return ({**batch, **mix.process_slice(
      mix.draw(settings, seed=config.seed, step=step, batch=global_batch,
               height=size, width=size),
      jax.process_index(), jax.process_count())}
          for step, batch in enumerate(batches, start_step))


def eval_batches(config: ml_collections.ConfigDict, source, *,
                 global_batch: int) -> Iterator[dict]:
  """This process's padded evaluation batches (with ``'mask'``)."""
  return pipeline.eval_batches(
      source,
      functools.partial(augment.eval_transform, cfg=transform_config(config)),
      local_batch=global_batch // jax.process_count(),
      process_index=jax.process_index(), process_count=jax.process_count(),
      **_parallelism(config))


def with_class_count(config: ml_collections.ConfigDict,
                     workdir: str) -> ml_collections.ConfigDict:
  """``config``, or when ``data.num_classes`` is 0 a copy with the class
  count of the dataset's label (its TFDS builder)."""
  if config.data.num_classes:
    return config
  config = config.copy_and_resolve_references()
  config.data.num_classes = pipeline.class_count(
      config.data.dataset, data_dir(config, workdir))
  return config
