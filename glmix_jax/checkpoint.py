"""Model checkpoints on disk (Orbax), local or on any ``etils.epath`` path.

A *model checkpoint* directory, as written by ``python -m glmix_jax.convert``,
holds ``model.json`` (the registered model name and its field overrides, so
the model can be rebuilt) and ``variables/`` (an Orbax PyTree checkpoint of
``{'params': ..., 'batch_stats': ...}``). An existing checkpoint is never
overwritten.
"""

from __future__ import annotations

import json
from typing import Any

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
  """The model (rebuilt from the registry) and its variables from ``directory``."""
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
