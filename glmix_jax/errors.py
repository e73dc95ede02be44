"""The errors that mean bad input or a failing environment, not a bug.

The commands (``train.py``, ``eval.py``, ``python -m glmix_jax.*``) report
these as one line, ``error: <what and how to fix it>``, with exit status 1
(``glmix_jax.cli``); anything else keeps its traceback. They sit on the ground
floor so that every layer can raise them without importing another.
"""

from __future__ import annotations

import os
from typing import Any


class DatasetError(ValueError):
  """A dataset that is missing, unknown, damaged or unusable as configured."""


class CheckpointError(RuntimeError):
  """A training checkpoint that cannot be restored or written."""


class ConfigChangedError(ValueError):
  """A resume whose config computes another function than the saved run."""


class NonFiniteError(RuntimeError):
  """Training produced too many non-finite losses or gradients."""


# ValueError: a wrong field value or argument; OSError: a missing file, a full
# disk, a path without permission.
USER_ERRORS = (ValueError, OSError, DatasetError, CheckpointError,
               ConfigChangedError, NonFiniteError)


def reason(error: BaseException, limit: int = 300) -> str:
  """``Type: message`` on one line (Orbax and tensorstore messages span
  lines), its middle cut to keep ``limit`` characters: the cause of a
  failed write (``No space left on device``) comes last."""
  text = ' '.join(str(error).split())
  if len(text) > limit:
    text = f'{text[:limit // 2]} ... {text[-limit // 2:]}'
  return f'{type(error).__name__}: {text}'


# Below this many free bytes a failed write is put down to a full disk.
NEARLY_FULL_BYTES = 1 << 20


def full_disk_note(path: Any) -> str:
  """' No space left on device (N bytes free).' when the file system holding
  ``path`` is (nearly) full, else ''. Some writers (TensorFlow's event file)
  lose the errno of a full disk and report only that they could not flush."""
  try:
    stat = os.statvfs(path)
  except OSError:
    return ''
  free = stat.f_bavail * stat.f_frsize
  if free >= NEARLY_FULL_BYTES:
    return ''
  return f' No space left on device ({free} bytes free).'


class ClosedOnExit:
  """A context manager that calls ``self.close()`` on leaving the block. If
  the block is left by an exception, an error of ``close`` is dropped, so
  that the error that ended the block is the one reported."""

  def __enter__(self) -> Any:
    return self

  def __exit__(self, error_type, error, traceback) -> None:
    del error, traceback
    try:
      self.close()
    except Exception:  # pylint: disable=broad-exception-caught
      if error_type is None:
        raise

  def close(self) -> None:
    raise NotImplementedError
