"""Test setup: 8 fake CPU devices and a persistent compilation cache.

Both must be configured before JAX initialises its backend, so this module
sets them at import time, before any test module imports JAX.
"""

import os
import pathlib
import socket
import subprocess
import sys

os.environ.setdefault('JAX_NUM_CPU_DEVICES', '8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

from glmix_jax import launch  # pylint: disable=g-import-not-at-top,wrong-import-position

ROOT = pathlib.Path(__file__).resolve().parent.parent
DATA = ROOT / 'tests' / 'data'
# The official-code fixtures; the two largest are read from here, not copied.
SHARED_REFERENCE = ROOT.parent / 'shared' / 'reference'

CACHE_DIR = os.environ.get('GLMIX_JAX_CACHE', str(ROOT / '.jax_cache'))
jax.config.update('jax_compilation_cache_dir', CACHE_DIR)
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
# Compiling is most of the suite's time, and LLVM's optimisation of the CPU
# code most of compiling: the tests compile without it (XLA's HLO passes,
# SPMD partitioning included, still run, so the partitioned programs that
# test_scale reads are the same: the same collectives, loops and FLOPs).
# Values differ only in rounding; every comparison is of runs made alike.
jax.config.update('jax_disable_most_optimizations', True)


@pytest.fixture(scope='session', autouse=True)
def _eight_devices():
  assert jax.device_count() == 8, 'tests expect 8 fake CPU devices'


def reference_file(name: str) -> pathlib.Path:
  """A fixture of the official code: tests/data first, then ../shared.

  A missing one skips the test locally (a clone without ../shared) but fails
  it where the environment variable ``CI`` is set (``.ci/run`` exports
  ``CI=1``), so that CI never passes with parity tests silently skipped.
  """
  for folder in (DATA, SHARED_REFERENCE):
    if (folder / name).exists():
      return folder / name
  reason = (f'{name} is neither in tests/data nor in {SHARED_REFERENCE} '
            '(the shared reference folder sits beside the repository in CI).')
  if os.environ.get('CI'):
    pytest.fail(f'{reason} CI is set: a missing reference fixture fails the '
                'run.', pytrace=False)
  pytest.skip(reason)


@pytest.fixture(scope='session')
def label_dataset(tmp_path_factory):
  """A TFDS imagenet2012 prepared offline from a label-in-pixels synthetic
  set: 12 classes x 20 train images, 30 validation images (48 px)."""
  from glmix_jax.data import prepare, synthetic  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp('label_dataset')
  synthetic.write_dataset(root / 'manual', classes=12, images_per_class=20,
                          image_size=48, val_images=30, label_in_pixels=True)
  prepare.prepare('imagenet2012', data_dir=str(root / 'tfds'),
                  manual_dir=str(root / 'manual'))
  return str(root / 'tfds')


def subprocess_env(**extra):
  """The environment of a command run as a user would, with the tests' JAX
  settings (8 CPU devices, the shared compilation cache)."""
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS='cpu',
             JAX_COMPILATION_CACHE_DIR=CACHE_DIR,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0',
             JAX_DISABLE_MOST_OPTIMIZATIONS='1', JAX_NUM_CPU_DEVICES='8',
             # what train.py's start-up would restart itself with (on CPU,
             # launch.tune_malloc_for_cpu), set here to spare the restart
             GLIBC_TUNABLES=':'.join(launch.MALLOC_TUNABLES))
  env.update(extra)
  return env


def train_cmd(workdir, *flags, config='configs/tiny.py'):
  return [sys.executable, str(ROOT / 'train.py'), f'--config={config}',
          f'--workdir={workdir}', *flags]


def start_two_processes(workdir, *flags, **popen_args):
  """``train.py`` as two processes of one run (4 CPU devices each, a
  coordinator on 127.0.0.1), as on two hosts."""
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  return [subprocess.Popen(
      train_cmd(workdir, *flags), cwd=ROOT, text=True,
      env=subprocess_env(JAX_NUM_CPU_DEVICES='4',
                         JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{port}',
                         JAX_NUM_PROCESSES='2', JAX_PROCESS_ID=str(k)),
      **popen_args) for k in range(2)]


@pytest.fixture(scope='session')
def tiny_run(tmp_path_factory):
  """A workdir of ``python train.py --config=configs/tiny.py``, run once per
  session: the training tests compare against it, the visualisation and
  notebook tests read its checkpoint (none may write into it)."""
  workdir = tmp_path_factory.mktemp('tiny_run')
  done = subprocess.run(train_cmd(workdir), capture_output=True, text=True,
                        cwd=ROOT, env=subprocess_env(), timeout=600,
                        check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  assert 'Final evaluation' in done.stdout
  return workdir
