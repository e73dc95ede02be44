"""Process start-up (``glmix_jax.launch``): on CPU, malloc keeps its memory."""

import subprocess
import sys

import pytest

from conftest import ROOT, subprocess_env
from glmix_jax import launch

TUNED = ':'.join(launch.MALLOC_TUNABLES)
# A CPU program with a 64 MiB temporary (the product, summed): 16,384 pages
# of 4 KiB to fault in on each run, unless malloc keeps them.
SCRIPT = """
import os, sys
print('start', os.getpid(), os.environ.get('GLIBC_TUNABLES', ''), flush=True)
from glmix_jax import launch
launch.initialize()
import jax, jax.numpy as jnp
f = jax.jit(lambda a: (a @ a).sum())
a = jnp.ones((4096, 4096))
f(a).block_until_ready()
def faults():
  return int(open('/proc/self/stat').read().rsplit(')', 1)[1].split()[7])
before = faults()
f(a).block_until_ready()
print('faults', faults() - before, 'argv', sys.argv[1:], flush=True)
"""


def _run(**env):
  base = {k: v for k, v in subprocess_env(JAX_NUM_CPU_DEVICES='1').items()
          if k != 'GLIBC_TUNABLES'}
  out = subprocess.run([sys.executable, '-c', SCRIPT, 'x', '--y=1'], cwd=ROOT,
                       env=dict(base, **env), capture_output=True, text=True,
                       timeout=300, check=True).stdout.splitlines()
  starts = [line.split()[1:] for line in out if line.startswith('start')]
  faults = next(int(line.split()[1]) for line in out
                if line.startswith('faults'))
  assert out[-1].endswith("argv ['x', '--y=1']"), out
  return starts, faults


@pytest.mark.skipif(not sys.platform.startswith('linux'),
                    reason='glibc tunables and /proc are Linux things')
def test_a_cpu_run_restarts_once_with_malloc_keeping_its_memory():
  """The entry points' start-up restarts the process once (same pid and
  arguments) with glibc's tunables, and a program's temporaries then cost
  no page faults on the next run; GLMIX_JAX_TUNE_MALLOC=0 keeps the
  system's malloc."""
  starts, faults = _run()
  pid = starts[0][0]
  assert starts == [[pid], [pid, TUNED]], starts
  assert faults < 1000, faults
  starts, faults = _run(GLMIX_JAX_TUNE_MALLOC='0')
  assert len(starts) == 1 and len(starts[0]) == 1, starts
  assert faults > 8000, faults
  # The user's own tunables are kept, and ours dropped for a peer process.
  starts, _ = _run(GLIBC_TUNABLES='glibc.malloc.tcache_count=0')
  assert starts[-1][1] == f'glibc.malloc.tcache_count=0:{TUNED}'
  assert launch.without_malloc_tuning(
      {'GLIBC_TUNABLES': starts[-1][1], 'A': '1'}) == {
          'GLIBC_TUNABLES': 'glibc.malloc.tcache_count=0', 'A': '1'}
  assert launch.without_malloc_tuning({'GLIBC_TUNABLES': TUNED}) == {}
