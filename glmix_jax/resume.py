"""A workdir holds one run: which config fields a resume may change.

``train.py`` writes the run's config to ``WORKDIR/config.json`` when the run
starts. A later command on the same workdir resumes that run from its latest
checkpoint, and ends bitwise where the uninterrupted run would, so it must
compute the same function: only the fields in ``EXECUTION_FIELDS``, which
change how the run executes and not what it computes, may differ. Anything
else (a learning rate, a clipping norm, the batch, the model) is refused with
the fields named, before any checkpoint is read.
"""

from __future__ import annotations

import json
from typing import Any

import ml_collections
from etils import epath

from glmix_jax.errors import ConfigChangedError

CONFIG_FILE = 'config.json'

EXECUTION_FIELDS = frozenset({
    'data.data_dir',  # where the same records live
    'data.num_workers', 'data.num_threads', 'data.prefetch',  # input speed
    'log_steps',  # reporting cadence
    'eval_batch_size',  # evaluation reads the state, never changes it
    'checkpoint_steps', 'keep_checkpoints', 'keep_checkpoint_every',
    'max_bad_steps',  # how many skipped non-finite steps to tolerate
    'mesh_shape',  # where the state lives, not what it is
    'model.remat', 'model.scan_blocks',  # memory trades, same function
})

# Whole blocks a resume may change: evaluations (``config.evals``) read the
# train state and never change it.
EXECUTION_BLOCKS = ('evals.',)

# Fields added to the configs after runs were saved: a run saved without one
# computed what this value computes, so a resume with it is the same run.
ADDED_FIELDS = {
    'init_from': '', 'init_weights': 'raw', 'init_head': 'auto',  # transfer
    'freeze_backbone': False,
    'optimizer.layer_decay': 1.0,
}

# Fields that earlier configs had and that only steered evaluation
# (replaced by ``config.evals`` and ``eval_batch_size``): ignored.
RETIRED_FIELDS = frozenset({'eval_steps', 'data.eval_split'})

_SHOWN = 8  # changed fields listed by name; the rest are counted


def as_saved(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The config as ``config.json`` holds it (JSON types: tuples are lists)."""
  return json.loads(json.dumps(config.to_dict(), default=str))


def _flat(tree: dict[str, Any], prefix: str = '') -> dict[str, Any]:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flat(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = value
  return flat


def changed_fields(saved: dict[str, Any], current: dict[str, Any]
                   ) -> list[tuple[str, Any, Any]]:
  """``(field, saved value, current value)`` for every field outside
  ``EXECUTION_FIELDS`` and ``EXECUTION_BLOCKS`` that differs; a field only
  one side has shows ``'(absent)'`` on the other (a saved run without one of
  the ``ADDED_FIELDS`` had its value; ``RETIRED_FIELDS`` are ignored)."""
  old, new = {**ADDED_FIELDS, **_flat(saved)}, _flat(current)
  absent = '(absent)'
  return [(name, old.get(name, absent), new.get(name, absent))
          for name in sorted(old.keys() | new.keys())
          if name not in EXECUTION_FIELDS
          and name not in RETIRED_FIELDS
          and not name.startswith(EXECUTION_BLOCKS)
          and old.get(name, absent) != new.get(name, absent)]


def check_resumable(workdir: str | epath.Path,
                    config: ml_collections.ConfigDict) -> None:
  """Raises ConfigChangedError if ``config`` cannot resume the run saved in
  ``workdir`` (a workdir without ``config.json`` is not checked)."""
  path = epath.Path(workdir) / CONFIG_FILE
  if not path.exists():
    return
  changes = changed_fields(json.loads(path.read_text()), as_saved(config))
  if not changes:
    return
  listed = ', '.join(f'{name} ({old!r} in the run, {new!r} now)'
                     for name, old, new in changes[:_SHOWN])
  more = (f' and {len(changes) - _SHOWN} more' if len(changes) > _SHOWN
          else '')
  raise ConfigChangedError(
      f'{workdir} holds a run whose config differs in {listed}{more}. A '
      'resumed run must compute what the saved run computes: to resume it, '
      f'use the values of its config ({path}); to train with the new ones, '
      'pass a new --workdir.')
