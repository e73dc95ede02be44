"""SIGTERM during training: requested once, and the handler put back after."""

import os
import signal

from glmix_jax import preemption


def test_sigterm_is_caught_inside_and_the_old_handler_is_back_after():
  seen = []
  previous = signal.signal(signal.SIGTERM, lambda *_: seen.append('outer'))
  try:
    with preemption.Preemption() as preempt:
      assert not preempt.reached(1)
      os.kill(os.getpid(), signal.SIGTERM)
      assert preempt.reached(2)
      assert seen == []  # the run's handler, not the caller's
    os.kill(os.getpid(), signal.SIGTERM)  # a notebook's own handler again
    assert seen == ['outer']
  finally:
    signal.signal(signal.SIGTERM, previous)
