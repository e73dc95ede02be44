"""Training metrics: TensorBoard, a JSON-lines file, and the progress line.

Only process 0 writes files; every process may print.
"""

from __future__ import annotations

import json
import time
from typing import Any, Callable, Mapping

import jax
from clu import metric_writers
from etils import epath

from glmix_jax import errors


class MetricWriter(errors.ClosedOnExit):
  """Writes scalars to TensorBoard (``clu``) and ``WORKDIR/metrics.jsonl``,
  and hands them to ``on_write(step, scalars)`` if given (e.g. a notebook's
  live plot)."""

  def __init__(self, workdir: str | epath.Path,
               on_write: Callable[[int, dict[str, float]], None] | None = None):
    self._workdir = epath.Path(workdir)
    self._on_write = on_write
    self._lead = jax.process_index() == 0
    self._tb = metric_writers.create_default_writer(
        str(self._workdir), just_logging=not self._lead, asynchronous=False)

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    """Raises OSError, naming the workdir, when the files cannot be written
    (a full disk)."""
    scalars = {k: float(v) for k, v in scalars.items()}
    try:
      self._tb.write_scalars(step, scalars)
      if self._lead:
        with (self._workdir / 'metrics.jsonl').open('a') as f:
          f.write(json.dumps({'step': step, **scalars}) + '\n')
    except Exception as e:  # TensorFlow's ResourceExhaustedError, OSError
      raise OSError(f'Cannot write the metrics of step {step} in '
                    f'{self._workdir} ({errors.reason(e)}). Free space or fix '
                    'the path, then run the same command to resume.') from e
    if self._on_write is not None:
      self._on_write(step, scalars)

  def write_json(self, name: str, content: Any) -> None:
    if self._lead:
      (self._workdir / name).write_text(json.dumps(content, indent=2,
                                                   default=str))

  def close(self) -> None:
    try:
      self._tb.close()
    except Exception as e:  # pylint: disable=broad-exception-caught
      raise OSError(f'Cannot close the metrics files in {self._workdir} '
                    f'({errors.reason(e)}).') from e


class Progress:
  """Images/s and ETA, measured between reports (compilation excluded)."""

  def __init__(self, total_steps: int, global_batch: int, start_step: int):
    self._total = total_steps
    self._batch = global_batch
    self._last = (start_step, None)

  def report(self, step: int) -> dict[str, float]:
    """Rates since the previous report; none on the first (it compiles)."""
    last_step, last_time = self._last
    now = time.perf_counter()
    self._last = (step, now)
    if last_time is None or step == last_step:
      return {}
    per_step = (now - last_time) / (step - last_step)
    images = self._batch / per_step
    return {'images_per_sec': images,
            'images_per_sec_per_device': images / jax.device_count(),
            'eta_minutes': per_step * (self._total - step) / 60}


def progress_line(step: int, total: int, scalars: Mapping[str, float]) -> str:
  """One human-readable line: step, loss, accuracy, lr, speed, ETA."""
  parts = [f'step {step}/{total}']
  formats = (('loss', 'loss {:.4f}'), ('accuracy', 'acc {:.3f}'),
             ('lr', 'lr {:.2e}'), ('images_per_sec', '{:.1f} img/s'),
             ('images_per_sec_per_device', '({:.1f}/device)'),
             ('eta_minutes', 'ETA {:.1f} min'))
  parts += [fmt.format(scalars[k]) for k, fmt in formats if k in scalars]
  return '  '.join(parts)
