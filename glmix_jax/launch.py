"""Process start-up for the entry points: multi-host initialisation, and on
CPU glibc's malloc tuned to keep the memory it frees.

Multi-host: on a TPU pod slice or a SLURM / Open MPI GPU cluster, set
``GLMIX_JAX_DISTRIBUTED=1`` and ``jax.distributed`` finds its peers itself;
elsewhere set ``JAX_COORDINATOR_ADDRESS`` (host:port of process 0),
``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``. Either must happen before JAX
touches a device, which is why the entry points call ``initialize()`` first.
"""

from __future__ import annotations

import os
import platform
import sys

import jax

# XLA:CPU allocates a program's temporaries afresh on every execution, and
# glibc's malloc hands such large blocks back to the kernel when freed, so
# each step maps its memory again page by page: ~330 K page faults per
# glnet_stl train step at batch 8 (1.3 GB), 0.9-1.0 s of kernel time in a
# 2.7 s step, and 2-3 s after another process has churned memory (the
# kernel then compacts to find pages). With these tunables (read at process
# start only) malloc keeps what it frees (one arena, no separate mappings,
# no trimming) on transparent huge pages: no faults after the first step
# (BENCHMARKS.md).
MALLOC_TUNABLES = ('glibc.malloc.hugetlb=1', 'glibc.malloc.arena_max=1',
                   'glibc.malloc.mmap_max=0',
                   f'glibc.malloc.trim_threshold={1 << 40}')


def initialize() -> None:
  """``jax.distributed.initialize`` when the environment asks for it, else
  ``tune_malloc_for_cpu``; quiets TensorFlow's C++ start-up logs (TFDS imports it
  later, in this process and in the input workers, which inherit the
  environment)."""
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  address = os.environ.get('JAX_COORDINATOR_ADDRESS')
  if address:
    jax.distributed.initialize(
        coordinator_address=address,
        num_processes=int(os.environ['JAX_NUM_PROCESSES']),
        process_id=int(os.environ['JAX_PROCESS_ID']))
  elif os.environ.get('GLMIX_JAX_DISTRIBUTED') == '1':
    jax.distributed.initialize()
  else:  # a restart would leave the other processes' coordinator behind
    tune_malloc_for_cpu()
  if jax.process_count() > 1:
    print(f'process {jax.process_index()} of {jax.process_count()}: '
          f'{jax.local_device_count()} local of {jax.device_count()} devices',
          flush=True)


def tune_malloc_for_cpu() -> None:
  """On CPU, restarts this process once (same pid, argv and environment)
  with ``MALLOC_TUNABLES`` added to ``GLIBC_TUNABLES``. Nothing happens on
  GPU or TPU (the step's memory is the device's), when they are set, when
  the C library is not glibc, or with ``GLMIX_JAX_TUNE_MALLOC=0``."""
  tunables = os.environ.get('GLIBC_TUNABLES', '')
  if (os.environ.get('GLMIX_JAX_TUNE_MALLOC') == '0'
      or set(MALLOC_TUNABLES) <= set(tunables.split(':'))
      or platform.libc_ver()[0] != 'glibc'
      or jax.default_backend() != 'cpu'):
    return
  env = dict(os.environ, GLIBC_TUNABLES=':'.join(
      filter(None, (tunables, *MALLOC_TUNABLES))))
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, sys.orig_argv, env)


def without_malloc_tuning(env: dict[str, str]) -> dict[str, str]:
  """``env`` less what ``tune_malloc_for_cpu`` added (for a process that
  should run with the system's defaults, e.g. a peer being benchmarked)."""
  tunables = [t for t in env.get('GLIBC_TUNABLES', '').split(':')
              if t and t not in MALLOC_TUNABLES]
  env = {k: v for k, v in env.items() if k != 'GLIBC_TUNABLES'}
  if tunables:
    env['GLIBC_TUNABLES'] = ':'.join(tunables)
  return env
