"""Training metrics: TensorBoard, a JSON-lines file, and the progress line.

Only process 0 writes files; every process may print.
"""

from __future__ import annotations

import json
import time
from typing import Any, Callable, Iterator, Mapping

import jax
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
    # clu's TensorBoard writer imports TensorFlow: only a run that writes
    # metrics loads it, so the models and the train step import without it
    # (an accelerator image with JAX but no TensorFlow).
    from clu import metric_writers  # pylint: disable=g-import-not-at-top
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
                    f'{self._workdir} ({errors.reason(e)}).'
                    f'{errors.full_disk_note(self._workdir)} Free space or fix '
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
                    f'({errors.reason(e)}).'
                    f'{errors.full_disk_note(self._workdir)}') from e


# A run whose steps wait for input longer than this share of the time is
# input-bound: the devices idle while the host makes batches. Judged over at
# least INPUT_BOUND_STEPS steps, so one slow batch is not a verdict.
INPUT_BOUND = 0.1
INPUT_BOUND_STEPS = 10


class TimedInput:
  """An iterator of batches that counts the wall seconds its caller waits in
  ``next``: with batches made ahead (workers, prefetch), that is the time
  the training loop, and so the devices, wait for input."""

  def __init__(self, batches: Iterator[Any]):
    self._batches = batches
    self.waited = 0.0

  def __iter__(self) -> TimedInput:
    return self

  def __next__(self) -> Any:
    start = time.perf_counter()
    try:
      return next(self._batches)
    finally:
      self.waited += time.perf_counter() - start


class Progress:
  """Images/s, ETA and the share of time spent waiting for input, measured
  between reports (compilation excluded).

  ``raise_input``: what to raise when the run is input-bound (named in the
  one warning ``input_warning`` gives).
  """

  def __init__(self, total_steps: int, global_batch: int, start_step: int,
               inputs: TimedInput | None = None, raise_input: str = ''):
    self._total = total_steps
    self._batch = global_batch
    self._inputs = inputs
    self._raise_input = raise_input
    self._last = (start_step, None, 0.0)
    self._first = None  # (step, time, waited) of the first report
    self._warned = False

  def report(self, step: int) -> dict[str, float]:
    """Rates since the previous report; none on the first (it compiles)."""
    last_step, last_time, last_waited = self._last
    now = time.perf_counter()
    waited = self._inputs.waited if self._inputs is not None else 0.0
    self._last = (step, now, waited)
    if self._first is None:
      self._first = self._last
    if last_time is None or step == last_step:
      return {}
    per_step = (now - last_time) / (step - last_step)
    images = self._batch / per_step
    rates = {'images_per_sec': images,
             'images_per_sec_per_device': images / jax.device_count(),
             'eta_minutes': per_step * (self._total - step) / 60}
    if self._inputs is not None:
      rates['input_wait'] = (waited - last_waited) / (now - last_time)
    return rates

  def input_warning(self) -> str | None:
    """Once per run, a line saying that since the first report (at least
    ``INPUT_BOUND_STEPS`` steps) the run has been input-bound, and what to
    raise; None otherwise."""
    if self._warned or self._inputs is None or self._first is None:
      return None
    first_step, first_time, first_waited = self._first
    step, now, waited = self._last
    if step - first_step < INPUT_BOUND_STEPS or now == first_time:
      return None
    wait = (waited - first_waited) / (now - first_time)
    if wait <= INPUT_BOUND:
      return None
    self._warned = True
    return (f'warning: the training steps waited for input {wait:.0%} of '
            f'the time over the last {step - first_step} steps: this run is '
            f'input-bound. Raise {self._raise_input}, or use a host with more '
            'CPU cores per device.')


def progress_line(step: int, total: int, scalars: Mapping[str, float]) -> str:
  """One human-readable line: step, loss, accuracy, lr, speed, ETA."""
  parts = [f'step {step}/{total}']
  formats = (('loss', 'loss {:.4f}'), ('accuracy', 'acc {:.3f}'),
             ('lr', 'lr {:.2e}'), ('images_per_sec', '{:.1f} img/s'),
             ('images_per_sec_per_device', '({:.1f}/device)'),
             ('input_wait', 'input wait {:.0%}'),
             ('eta_minutes', 'ETA {:.1f} min'))
  parts += [fmt.format(scalars[k]) for k, fmt in formats if k in scalars]
  return '  '.join(parts)
