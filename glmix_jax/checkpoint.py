"""Checkpoints on disk (Orbax), local or on any ``etils.epath`` path.

Two kinds:

* A *model checkpoint* directory, as written by ``python -m glmix_jax.convert``,
  holds ``model.json`` (the registered model name and its field overrides, so
  the model can be rebuilt) and ``variables/`` (an Orbax PyTree checkpoint of
  ``{'params': ..., 'batch_stats': ...}``). An existing one is never
  overwritten.
* *Training checkpoints* in ``WORKDIR/checkpoints/<step>/``: the whole train
  state (parameters, BN statistics, optimizer state, EMA and the step, which
  is also the data position), saved asynchronously and atomically by an Orbax
  ``CheckpointManager``. A crash never leaves a half-written checkpoint
  behind as the latest one.
"""

from __future__ import annotations

import json
from typing import Any

import jax

import flax.linen as nn
import orbax.checkpoint as ocp
from etils import epath

from glmix_jax import models

_MODEL_FILE = 'model.json'
_VARIABLES_DIR = 'variables'


def save_variables(directory: str | epath.Path, variables: Any, *, model: str,
                   overrides: dict | None = None) -> epath.Path:
  """Writes a model checkpoint to ``directory``, which must not hold one."""
  directory = epath.Path(directory).absolute()
  if directory.exists() and any(directory.iterdir()):
    raise FileExistsError(f'{directory} is not empty; choose a new directory '
                          'so that no checkpoint is overwritten.')
  directory.mkdir(parents=True, exist_ok=True)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(directory / _VARIABLES_DIR, variables)
  (directory / _MODEL_FILE).write_text(json.dumps(
      {'model': model, 'overrides': overrides or {}}, indent=2))
  return directory


def load_variables(directory: str | epath.Path) -> tuple[nn.Module, Any]:
  """The model (rebuilt from the registry) and its variables."""
  directory = epath.Path(directory).absolute()
  meta_file = directory / _MODEL_FILE
  if not meta_file.exists() or not (directory / _VARIABLES_DIR).exists():
    raise FileNotFoundError(
        f'{directory} is not a model checkpoint (it needs {_MODEL_FILE} and '
        f'{_VARIABLES_DIR}/); make one with python -m glmix_jax.convert.')
  meta = json.loads(meta_file.read_text())
  model = models.build(meta['model'], **meta['overrides'])
  with ocp.StandardCheckpointer() as checkpointer:
    variables = checkpointer.restore(directory / _VARIABLES_DIR)
  return model, variables


class CheckpointError(RuntimeError):
  """A training checkpoint that exists but cannot be restored."""


def train_manager(workdir: str | epath.Path, *, save_every: int, keep: int,
                  keep_every: int | None) -> ocp.CheckpointManager:
  """Saves every ``save_every`` steps; keeps the last ``keep`` checkpoints
  plus every ``keep_every``-th step (None: none extra)."""
  options = ocp.CheckpointManagerOptions(
      save_interval_steps=save_every, max_to_keep=keep,
      keep_period=keep_every, create=True, cleanup_tmp_directories=True,
      enable_async_checkpointing=True)
  return ocp.CheckpointManager(epath.Path(workdir) / 'checkpoints',
                               options=options)


def save_now(manager: ocp.CheckpointManager, step: int, state: Any) -> None:
  """Saves ``state`` at ``step`` and returns once it is on disk.

  An asynchronous save still in flight would make Orbax skip this one, so it
  is awaited first.
  """
  manager.wait_until_finished()
  if step not in manager.all_steps():
    if not manager.save(step, args=ocp.args.StandardSave(state), force=True):
      raise CheckpointError(f'Orbax declined to save step {step} in '
                            f'{manager.directory}.')
  manager.wait_until_finished()


def restore_latest(manager: ocp.CheckpointManager, abstract_state: Any) -> Any:
  """The latest saved train state, laid out like ``abstract_state`` (a tree
  of ``jax.ShapeDtypeStruct`` with shardings), or None if there is none.

  Raises:
    CheckpointError: naming the directory, when the latest checkpoint exists
      but cannot be restored (the caller must then not train over it).
  """
  step = manager.latest_step()
  if step is None:
    return None
  try:
    return manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
  except Exception as e:  # any Orbax / tensorstore / structure failure
    raise CheckpointError(
        f'Cannot restore the checkpoint {manager.directory / str(step)} '
        f'({type(e).__name__}: {str(e)[:300]}). It was left untouched; use '
        'another --workdir, or move that checkpoint away to resume from an '
        'earlier one.') from e


def latest_train_state(workdir: str | epath.Path) -> tuple[int, dict[str, Any]]:
  """The step and train state (a plain dict: ``params``, ``batch_stats``,
  ``ema_params`` (None without EMA), ...) of the latest checkpoint in a
  ``train.py`` workdir, restored as saved, for evaluation or inspection.

  Raises:
    FileNotFoundError: when the workdir holds no training checkpoint.
  """
  manager = train_manager(workdir, save_every=1, keep=1, keep_every=None)
  step = manager.latest_step()
  if step is None:
    raise FileNotFoundError(f'No training checkpoint in {workdir}/'
                            'checkpoints; train first, or pass '
                            '--checkpoint=DIR.')
  return step, manager.restore(step, args=ocp.args.StandardRestore())


def abstract(tree: Any) -> Any:
  """``jax.ShapeDtypeStruct``s (with shardings) of a tree of arrays."""
  return jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
      tree)
