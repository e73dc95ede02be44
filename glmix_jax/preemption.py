"""SIGTERM as a preemption notice: save at a step every process agrees on.

Cluster schedulers (SLURM, Kubernetes, TPU maintenance events) send SIGTERM
some time before they kill a job. Every process of a run must then save the
*same* step, since a checkpoint save is collective; a process that stopped
alone would leave the others waiting in the next step's all-reduce.

* One process: a Python SIGTERM handler raises a flag; the loop saves the
  step it is at and stops. The previous handler is put back on exit, so a
  notebook that trains twice keeps its own.
* Several processes (``jax.distributed``): JAX's preemption service catches
  SIGTERM in every process that receives it, tells the others through the
  coordination service, and they agree on a step
  (``multihost_utils.reached_preemption_sync_point``); no Python handler is
  installed, as it would replace that one.
"""

from __future__ import annotations

import signal
import threading

import jax
from jax.experimental import multihost_utils


class Preemption:
  """``with Preemption() as p: ... if p.reached(step): save and stop``.

  ``reached`` must be called at every step, by every process, with the same
  sequence of steps.
  """

  def __init__(self):
    self._requested = False
    self._previous = None
    self._distributed = jax.process_count() > 1

  def __enter__(self) -> 'Preemption':
    # signal.signal is only allowed in the main thread; elsewhere (a thread
    # of a notebook server) SIGTERM keeps its own handler.
    if (not self._distributed and
        threading.current_thread() is threading.main_thread()):
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None

  def _handle(self, signum, frame) -> None:
    del signum, frame
    self._requested = True

  def reached(self, step: int) -> bool:
    """Whether to save ``step`` and stop."""
    if self._distributed:
      return multihost_utils.reached_preemption_sync_point(step)
    return self._requested
