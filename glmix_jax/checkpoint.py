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
import time
from typing import Any, Sequence

import flax.linen as nn
import jax
import orbax.checkpoint as ocp
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec

from glmix_jax import errors, models, sharding
from glmix_jax.errors import CheckpointError, reason

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


def _manager(workdir: str | epath.Path, *, save_every: int = 1, keep: int = 1,
             keep_every: int | None = None, writer: bool = True,
             handler: Any = None) -> ocp.CheckpointManager:
  """An Orbax manager of ``WORKDIR/checkpoints``; a reader (``writer=False``:
  eval.py beside a training run) creates, cleans and saves nothing.
  ``handler``: the items' handler (Orbax's standard one; a reader of part of
  a state passes a PyTree handler, the same format on disk)."""
  options = ocp.CheckpointManagerOptions(
      save_interval_steps=save_every, max_to_keep=keep,
      keep_period=keep_every, create=writer,
      # Partial saves of a killed run are removed when the next run starts.
      cleanup_tmp_directories=writer, enable_async_checkpointing=writer)
  return ocp.CheckpointManager(
      _directory(workdir), options=options,
      item_handlers=handler or ocp.StandardCheckpointHandler())


def _directory(workdir: str | epath.Path) -> epath.Path:
  return epath.Path(workdir) / 'checkpoints'


def saved_steps(workdir: str | epath.Path) -> list[int]:
  """The steps of the complete training checkpoints in ``workdir``, from the
  disk (a partial save is not one)."""
  directory = _directory(workdir)
  return (sorted(ocp.path.step.checkpoint_steps(directory))
          if directory.is_dir() else [])


def _restore(manager: ocp.CheckpointManager, step: int,
             abstract_state: Any = None, args: Any = None) -> Any:
  """Restores ``step`` (into ``abstract_state``, or with restore
  ``args``); any failure is a CheckpointError naming it."""
  try:
    return manager.restore(
        step, args=args or ocp.args.StandardRestore(abstract_state))
  except Exception as e:  # any Orbax / tensorstore / structure failure
    raise CheckpointError(
        f'Cannot restore the checkpoint {manager.directory / str(step)} '
        f'({reason(e)}). It was left untouched; use another --workdir, or '
        'move that checkpoint away to resume from an earlier one.') from e


class TrainCheckpoints(errors.ClosedOnExit):
  """The training checkpoints of a workdir, ``WORKDIR/checkpoints/<step>/``.

  Saves are asynchronous: ``save`` returns once the state is copied off the
  devices, and the files are written while training goes on. Orbax writes a
  step into a temporary directory and renames it when complete, so a killed
  process leaves no half-written checkpoint under a step's name (the next run
  removes the temporary one). ``close`` (on leaving the ``with`` block, by
  any exit: the run's end, an error, SIGTERM, Ctrl-C) waits for the save in
  flight to commit; one that failed (a full disk) is removed, and the
  checkpoints before it are kept.

  Usage::

    with TrainCheckpoints(workdir, save_every=1000, keep=3) as checkpoints:
      state = checkpoints.restore_latest(abstract_state)
      ...
      checkpoints.save(step, state)
  """

  def __init__(self, workdir: str | epath.Path, *, save_every: int, keep: int,
               keep_every: int | None = None):
    self._workdir = workdir
    self._manager = _manager(workdir, save_every=save_every, keep=keep,
                             keep_every=keep_every)
    self.directory = self._manager.directory
    self.last_saved: int | None = self._manager.latest_step()

  def restore_latest(self, abstract_state: Any) -> Any:
    """The latest saved state, laid out like ``abstract_state`` (a tree of
    ``jax.ShapeDtypeStruct`` with shardings), or None if there is none.

    Raises:
      CheckpointError: naming the directory, when the latest checkpoint
        exists but cannot be restored (the caller must not train over it).
    """
    step = self._manager.latest_step()
    return None if step is None else _restore(self._manager, step,
                                              abstract_state)

  def should_save(self, step: int) -> bool:
    """Whether ``save(step, ...)`` writes: every ``save_every`` steps."""
    return self._manager.should_save(step)

  def save(self, step: int, state: Any, *, wait: bool = False) -> None:
    """Saves ``state`` at ``step`` if ``should_save(step)`` or ``wait``; with
    ``wait``, returns once it is on disk.

    Raises:
      CheckpointError: naming the step and the cause, when this save or the
        one before it (still in flight) cannot be written.
    """
    try:
      if wait:
        # An asynchronous save still in flight would make Orbax skip this one.
        self._manager.wait_until_finished()
      if step not in self._manager.all_steps() and self._manager.save(
          step, args=ocp.args.StandardSave(state), force=wait):
        self.last_saved = step
      if wait:
        self._manager.wait_until_finished()
    except Exception as e:  # tensorstore / OS errors of the writer threads
      raise self._write_error(e) from e

  def close(self) -> None:
    """Waits for the save in flight; removes it if it failed (and raises)."""
    try:
      self._manager.close()
    except Exception as e:  # pylint: disable=broad-exception-caught
      raise self._write_error(e) from e

  def _write_error(self, error: Exception) -> CheckpointError:
    failed = self.last_saved
    self._remove_partial_saves()
    # From the disk: after a failed save Orbax's own list of steps is off.
    self.last_saved = max(saved_steps(self._workdir), default=None)
    kept = (f'the latest complete checkpoint, step {self.last_saved}, is '
            'intact' if self.last_saved is not None else
            'no earlier checkpoint exists')
    return CheckpointError(
        f'Cannot write the checkpoint of step {failed} in {self.directory} '
        f'({reason(error)}); {kept}. Free space or fix the path, then run '
        'the same command to resume.')

  def _remove_partial_saves(self, settle_s: float = 0.5,
                            limit_s: float = 30.0) -> None:
    """Removes the temporary directories of failed saves. Writes that Orbax
    abandoned still complete in tensorstore once removing frees space, and
    recreate files there, so this repeats until none has reappeared for
    ``settle_s`` (at most ``limit_s``)."""
    if jax.process_index() != 0:
      return
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
      partial = [p for p in (self.directory.iterdir()
                             if self.directory.exists() else ())
                 if ocp.path.step.is_tmp_checkpoint(p)]
      if not partial:
        return
      for path in partial:
        path.rmtree(missing_ok=True)
      time.sleep(settle_s)


def latest_train_state(workdir: str | epath.Path,
                       fields: Sequence[str] | None = None
                       ) -> tuple[int, dict[str, Any]]:
  """The step and train state (a plain dict: ``params``, ``batch_stats``,
  ``ema_params`` (None without EMA), ...) of the latest checkpoint in a
  ``train.py`` workdir, restored as saved, for evaluation or inspection;
  with ``fields``, only those entries are read (e.g. not the optimizer's
  moments, twice the parameters' size). Reads only: a run still training
  there is not disturbed.

  Raises:
    FileNotFoundError: when the workdir holds no training checkpoint.
    CheckpointError: when the latest one cannot be restored.
  """
  steps = saved_steps(workdir)
  if not steps:
    raise FileNotFoundError(f'No training checkpoint in {workdir}/'
                            'checkpoints; train first, or pass '
                            '--checkpoint=DIR.')
  manager = _manager(workdir, writer=False)
  try:
    saved = manager.item_metadata(steps[-1])
  except Exception:  # pylint: disable=broad-exception-caught
    saved = None  # unreadable: _restore names the checkpoint
  # Replicated over this process's mesh, whatever devices and processes the
  # run that saved it had.
  replicated = NamedSharding(sharding.make_mesh(), PartitionSpec())
  as_saved = lambda tree: jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
      tree)
  if fields is None or saved is None:
    target = None if saved is None else as_saved(dict(saved))
    state = _restore(manager, steps[-1], target)
    return steps[-1], (state if fields is None else
                       {k: v for k, v in state.items() if k in fields})
  # Only ``fields`` (the saved ones: EMA may be None) are read from disk.
  target = {k: as_saved(v) for k, v in dict(saved).items()
            if k in fields and v is not None}
  reader = _manager(workdir, writer=False,
                    handler=ocp.PyTreeCheckpointHandler())
  return steps[-1], _restore(reader, steps[-1], args=ocp.args.PyTreeRestore(
      target, restore_args=ocp.checkpoint_utils.construct_restore_args(
          target), partial_restore=True))
