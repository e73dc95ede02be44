r"""Forward and training-step throughput, compile time, memory and MFU.

For any registered model, batch, resolution and compute dtype, on whatever
device JAX runs on (CPU, GPU, TPU):

* forward: the jitted eval-mode ``model.apply``;
* train: ``train_lib.train_step`` (forward, backward, AdamW update, the
  finite-step guard) with drop path on, no Mixup/CutMix and no EMA, the state
  donated as in training.

Each is compiled ahead of time (``jit(...).lower(...).compile()``; wall-clock
and process CPU seconds), run once to warm up, then timed ``--repeats``
times; images/s uses the median. Peak memory is the device's
``peak_bytes_in_use`` where the backend reports it (GPU, TPU: the process's
peak so far, so the rows after the first of a process are at least the
earlier ones'), else XLA's memory analysis of the compiled program
(arguments + outputs + temporaries - donated aliases; CPU). MFU is model
FLOPs / time / the device's measured peak, where model FLOPs are 2 x the
exact MACs of ``summary.count_macs`` (x 3 for a training step: forward + two
backward products) and the peak is the best of a few large square matmuls
in the same dtype on the same device.

With ``--torch_python`` and ``--official`` the official PyTorch model runs in
the same job (``benchmarks/torch_official.py``, a separate process,
``torch.set_num_threads(--torch_threads)``) for the same mode, batch and
size; its train step is AdamW + cross-entropy. Its calls alternate with ours,
one of each per round, each process idle while the other runs, and the
speed-up is the median over rounds of official / ours seconds: on a shared
machine whose load drifts, timing one after the other moved the ratio by
+-10 %.

On a GPU or TPU, the accelerator measurement (bfloat16, batch 128 per
device, glnet_stl, glnet_4g, acmix_resnet50, acmix_swin_t) is one command::

  PYTHONPATH=. python benchmarks/throughput.py --preset accelerator \
      --json accelerator.json

On one H200 (BENCHMARKS.md, 2026-12-04) each forward compiled in about 25 s
and GLNet-STL's train step had not compiled after ~110 s: the preset takes
longer than 10 minutes there. ``benchmarks/accelerator.sh`` runs it model by
model within a time budget, with ``benchmarks/kernel_forms.py``.

On the CPU, against the official code::

  PYTHONPATH=. python benchmarks/throughput.py --models glnet_stl \
      --batch 8 --size 224 --dtype float32 --modes forward train \
      [--override remat=full --override scan_blocks=True] \
      [--torch_python=/work/torch-main/bin/python --official=/tmp/GLMix] \
      [--json out.json]
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import datetime
import functools
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from configs import common
from glmix_jax import launch, models, train_lib
from glmix_jax.models import summary

MODES = ('forward', 'train')
# ``--preset accelerator``: the GPU / TPU measurement in one command
# (bfloat16, the four headline models, a per-device batch that fits in 16 GB).
ACCELERATOR_PRESET = dict(
    models=['glnet_stl', 'glnet_4g', 'acmix_resnet50', 'acmix_swin_t'],
    dtype='bfloat16', batch=128, repeats=10, matmul_size=8192)
# Dense bfloat16 peak FLOP/s per chip from the vendors' data sheets (no
# sparsity), by a substring of ``device.device_kind``: MFU over these is the
# figure papers quote; MFU over the measured matmul peak says how close the
# model's products run to the best this chip does with XLA.
PEAK_BF16_FLOPS = {
    'H200': 989e12, 'H100': 989e12, 'A100': 312e12, 'L40S': 362e12,
    'L4': 121e12, 'A10G': 70e12, 'TPU v6': 918e12, 'TPU v5p': 459e12,
    'TPU v5': 197e12, 'TPU v4': 275e12,
}


def table_peak_flops(device) -> float | None:
  """The data-sheet dense bfloat16 peak of ``device``, if in the table."""
  kind = device.device_kind
  return next((peak for name, peak in PEAK_BF16_FLOPS.items()
               if name in kind), None)
_TORCH_SCRIPT = pathlib.Path(__file__).with_name('torch_official.py')


def timed(call: Callable[[], Any]) -> Callable[[], float]:
  """``call`` as a callable that returns its own wall-clock seconds; ``call``
  must block until its result is ready."""
  def run() -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start
  return run


def time_calls(calls: dict[str, Callable[[], float]], repeats: int
               ) -> dict[str, dict[str, float]]:
  """Seconds per call (median, min, max, and every call's in ``times_s``) of
  each of ``calls`` (callables that return their own seconds), after one
  warm-up call each.

  The calls alternate, one of each per round, so that a change in the
  machine's load (a shared VM) hits all of them alike; the ratio of two is
  best read from the paired rounds (``paired_ratio``).
  """
  for call in calls.values():
    call()
  times = {name: [] for name in calls}
  for _ in range(repeats):
    for name, call in calls.items():
      times[name].append(call())
  return {name: dict(median_s=statistics.median(t), min_s=min(t),
                     max_s=max(t), times_s=t) for name, t in times.items()}


def paired_ratio(slow: dict, fast: dict) -> float:
  """Median over rounds of slow / fast seconds (``time_calls`` results)."""
  return statistics.median(a / b for a, b in zip(slow['times_s'],
                                                 fast['times_s']))


def matmul_peak_flops(dtype: jnp.dtype, size: int, repeats: int) -> float:
  """Best FLOP/s of a (size x size) @ (size x size) matmul in ``dtype``, on
  random data (a GPU multiplies constant data faster)."""
  a = jax.random.normal(jax.random.PRNGKey(0), (size, size), dtype)
  matmul = jax.jit(lambda x, y: x @ y)
  timing = time_calls(
      dict(matmul=timed(lambda: matmul(a, a).block_until_ready())), repeats)
  return 2 * size**3 / timing['matmul']['min_s']


def _peak_bytes(compiled) -> dict[str, int | None]:
  """XLA's static estimate of a compiled program's peak, and its parts."""
  memory = compiled.memory_analysis()
  if memory is None:
    return dict(compiled_peak_bytes=None, temp_bytes=None)
  return dict(
      compiled_peak_bytes=(memory.argument_size_in_bytes
                           + memory.output_size_in_bytes
                           + memory.temp_size_in_bytes
                           - memory.alias_size_in_bytes),
      temp_bytes=memory.temp_size_in_bytes)


def _device_peak_bytes() -> int | None:
  stats = jax.devices()[0].memory_stats()
  return stats.get('peak_bytes_in_use') if stats else None


def _compile(fn, *args) -> tuple[Any, dict[str, float]]:
  """``fn`` compiled for ``args``, and the wall-clock and process CPU seconds
  that took (XLA compiles on the host, partly on several threads; other jobs
  on a shared machine stretch the wall-clock figure, not the CPU one)."""
  wall, cpu = time.perf_counter(), time.process_time()
  compiled = fn.lower(*args).compile()
  return compiled, dict(compile_s=time.perf_counter() - wall,
                        compile_cpu_s=time.process_time() - cpu)


def _forward(model, variables, images):
  forward = jax.jit(lambda v, x: model.apply(v, x, train=False))
  compiled, compile_times = _compile(forward, variables, images)
  call = lambda: compiled(variables, images).block_until_ready()
  return compiled, compile_times, call


def _train(model, images, seed: int = 0):
  tx = optax.adamw(1e-3, weight_decay=0.05)
  state = jax.jit(functools.partial(
      train_lib.init_state, model, tx, (1,) + images.shape[1:], seed,
      False))()
  labels = jnp.arange(images.shape[0]) % 1000
  # The step takes uint8 pixels, as the input pipeline delivers them.
  pixels = jnp.clip(images * 64 + 128, 0, 255).astype(jnp.uint8)
  batch = dict(image=pixels, label=labels)
  augmentation = common.deit_augmentation()
  augmentation.update(mixup_alpha=0.0, cutmix_alpha=0.0, label_smoothing=0.0)
  config = ml_collections.ConfigDict(dict(
      augmentation=augmentation,
      data=dict(num_classes=model.num_classes, mean=common.IMAGENET_MEAN,
                std=common.IMAGENET_STD),
      seed=seed, ema_decay=0.0))
  step = train_lib.make_train_step(config, model, tx, lambda s: 1e-3)
  compiled, compile_times = _compile(step, state, batch)
  holder = [state]

  def call():
    holder[0], metrics = compiled(holder[0], batch)
    jax.block_until_ready(metrics)

  return compiled, compile_times, call


def prepare_jax(name: str, mode: str, *, batch: int, size: int, dtype: str,
                overrides: dict) -> tuple[dict, Callable[[], None]]:
  """This project's ``name`` compiled for ``mode``: its compile time, memory
  and FLOPs per call, and the call to time."""
  model = models.build(name, dtype=dtype, **overrides)
  images = jnp.asarray(np.random.default_rng(0).normal(
      size=(batch, size, size, 3)), jnp.float32)
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), images[:1])
  macs, _ = summary.count_macs(model, variables, (1, size, size, 3))
  if mode == 'forward':
    compiled, compile_times, call = _forward(model, variables, images)
  else:
    del variables
    compiled, compile_times, call = _train(model, images)
  return dict(**compile_times, **_peak_bytes(compiled),
              flops=2 * macs['total'] * batch * (3 if mode == 'train' else 1)
              ), call


@contextlib.contextmanager
def official_calls(python: str, official: str, name: str, mode: str, *,
                   batch: int, size: int, threads: int, dtype: str,
                   tuned_malloc: bool = False, extra_args: tuple = ()
                   ) -> Iterator[tuple[dict, Callable[[], float]]]:
  """The official PyTorch ``name`` in a server process
  (``benchmarks/torch_official.py``, given ``extra_args`` too), on the GPU
  when JAX runs on one, in ``dtype`` (bfloat16: under autocast): its
  versions, and a callable that makes one call there and returns the
  seconds it took. It runs with the system's malloc settings, as a user runs
  it, unless ``tuned_malloc`` (then with ours,
  ``launch.tune_malloc_for_cpu``)."""
  device = 'cuda' if jax.devices()[0].platform == 'gpu' else 'cpu'
  server = subprocess.Popen(
      [python, str(_TORCH_SCRIPT), f'--official={official}', f'--model={name}',
       f'--mode={mode}', f'--batch={batch}', f'--size={size}',
       f'--threads={threads}', f'--device={device}', f'--dtype={dtype}',
       *extra_args],
      stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True, env=dict(os.environ) if tuned_malloc
      else launch.without_malloc_tuning(dict(os.environ)))

  def reply() -> str:
    line = server.stdout.readline()
    if not line:
      raise RuntimeError(f'The official {name} failed:\n{server.stderr.read()}')
    return line

  def call() -> float:
    server.stdin.write('call\n')
    server.stdin.flush()
    return float(reply())

  try:
    yield json.loads(reply()), call
  finally:
    server.stdin.close()
    server.wait()


def benchmark(name: str, mode: str, *, batch: int, size: int, dtype: str,
              repeats: int, overrides: dict, torch_python: str | None = None,
              official: str | None = None,
              torch_threads: int = os.cpu_count() or 1,
              official_tuned_malloc: bool = False) -> dict:
  """One (model, mode) measurement of ours (``jax``) and, given a torch
  interpreter and checkout, of the official code (``torch``), their calls
  alternating; ``speedup`` is the median over rounds of official / ours."""
  ours, call = prepare_jax(name, mode, batch=batch, size=size, dtype=dtype,
                           overrides=overrides)
  result = dict(jax=ours)
  with contextlib.ExitStack() as stack:
    calls = dict(jax=timed(call))
    if torch_python and official:
      versions, calls['torch'] = stack.enter_context(official_calls(
          torch_python, official, name, mode, batch=batch, size=size,
          threads=torch_threads, dtype=dtype,
          tuned_malloc=official_tuned_malloc))
      result['torch'] = versions
    if repeats:  # else compile only
      for who, timing in time_calls(calls, repeats).items():
        result[who].update(timing, images_per_s=batch / timing['median_s'])
  if 'torch' in result and repeats:
    result['speedup'] = paired_ratio(result['torch'], result['jax'])
  ours['device_peak_bytes'] = _device_peak_bytes()
  return result


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
  """``['remat=full', 'scan_blocks=True']`` -> model field overrides."""
  overrides = {}
  for pair in pairs:
    key, _, value = pair.partition('=')
    try:
      overrides[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      overrides[key] = value  # a bare string, e.g. remat=full
  return overrides


def _mib(n: int | None) -> str:
  return '-' if n is None else f'{n / 2**20:.0f}'


def format_row(name: str, mode: str, r: dict, peak_flops: float,
               table_peak: float | None = None) -> str:
  """A table row; MFU over the measured ``peak_flops`` and, when known, over
  the chip's data-sheet ``table_peak``."""
  ours = r['jax']
  memory = ours['device_peak_bytes'] or ours['compiled_peak_bytes']
  timing = '| - | - |'
  if 'median_s' in ours:
    timing = (f'| {ours["images_per_s"]:.2f} | {ours["median_s"]:.3f} '
              f'({ours["min_s"]:.3f}-{ours["max_s"]:.3f}) |')
  mfu = lambda peak: ('-' if 'median_s' not in ours or not peak else
                      f'{100 * ours["flops"] / ours["median_s"] / peak:.1f}%')
  row = (f'| {name} | {mode} {timing} {ours["compile_s"]:.1f} '
         f'({ours["compile_cpu_s"]:.1f}) | '
         f'{_mib(memory)} | {mfu(peak_flops)} | {mfu(table_peak)} |')
  if 'speedup' in r:
    row += f' {r["torch"]["images_per_s"]:.2f} | {r["speedup"]:.2f}x |'
  return row


def parse_args(argv=None) -> argparse.Namespace:
  """The command line, with ``--preset``'s defaults."""
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--preset', choices=['accelerator'], default=None,
                      help='accelerator: bf16, batch 128, the four headline '
                      'models (flags given explicitly still win)')
  parser.add_argument('--models', nargs='+', default=['glnet_stl'])
  parser.add_argument('--modes', nargs='+', choices=MODES, default=list(MODES))
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--size', type=int, default=224)
  parser.add_argument('--dtype', default='float32')
  parser.add_argument('--repeats', type=int, default=5,
                      help='timed calls; 0: compile only')
  parser.add_argument('--override', action='append', default=[],
                      help='model field=value, e.g. remat=full (repeatable)')
  parser.add_argument('--matmul_size', type=int, default=2048)
  parser.add_argument('--torch_python', default=None)
  parser.add_argument('--official', nargs='+', default=[],
                      help='official checkouts: GLMix and/or ACmix')
  parser.add_argument('--torch_threads', type=int, default=os.cpu_count())
  parser.add_argument('--official_tuned_malloc', action='store_true',
                      help='the official code with our malloc tunables too '
                      "(launch.tune_malloc_for_cpu; default: the system's)")
  parser.add_argument('--json', default=None)
  if args_preset(argv) == 'accelerator':
    parser.set_defaults(**ACCELERATOR_PRESET)
  return parser.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  overrides = parse_overrides(args.override)
  device = jax.devices()[0]
  peak = matmul_peak_flops(jnp.dtype(args.dtype), args.matmul_size, 5)
  table_peak = (table_peak_flops(device) if args.dtype == 'bfloat16'
                else None)
  header = dict(
      date=datetime.date.today().isoformat(), jax=jax.__version__,
      device=f'{device.platform}: {device.device_kind}',
      cpu_count=os.cpu_count(), host=platform.processor() or platform.machine(),
      load_average=os.getloadavg(),
      glibc_tunables=os.environ.get('GLIBC_TUNABLES', ''),
      batch=args.batch, size=args.size,
      dtype=args.dtype, repeats=args.repeats, overrides=overrides,
      matmul_peak_flops=peak, table_peak_flops=table_peak)
  print(f'{header["device"]}, jax {jax.__version__}, batch {args.batch}, '
        f'{args.size}x{args.size}, {args.dtype}, overrides {overrides}; '
        f'measured matmul peak {peak / 1e9:.1f} GFLOP/s; data-sheet peak '
        f'{"-" if table_peak is None else f"{table_peak / 1e12:.0f} TFLOP/s"}'
        f'; load {header["load_average"][0]:.1f}; GLIBC_TUNABLES '
        f'{header["glibc_tunables"] or "-"}', flush=True)
  print('| model | mode | img/s | s/batch (min-max) | compile s (CPU s) '
        '| peak MiB | MFU (measured peak) | MFU (data sheet) '
        '| official img/s | speed-up |\n'
        '|---|---|---:|---|---:|---:|---:|---:|---:|---:|', flush=True)
  results = {}
  for name in args.models:
    for mode in args.modes:
      r = benchmark(
          name, mode, batch=args.batch, size=args.size, dtype=args.dtype,
          repeats=args.repeats, overrides=overrides,
          torch_python=args.torch_python,
          official=_official_checkout(args.official, name),
          torch_threads=args.torch_threads,
          official_tuned_malloc=args.official_tuned_malloc)
      results[f'{name}/{mode}'] = r
      print(format_row(name, mode, r, peak, table_peak), flush=True)
      if args.json:  # after every row: a run stopped early keeps its rows
        pathlib.Path(args.json).write_text(json.dumps(
            dict(header, load_average_end=os.getloadavg(), results=results),
            indent=1))


def args_preset(argv) -> str | None:
  """The ``--preset`` of ``argv`` (sys.argv when None), read before the
  other flags so that it sets their defaults."""
  pre = argparse.ArgumentParser(add_help=False)
  pre.add_argument('--preset', default=None)
  return pre.parse_known_args(argv)[0].preset


def _official_checkout(checkouts: list[str], name: str) -> str | None:
  """The checkout among ``checkouts`` that holds the official ``name``."""
  marker = 'models/glnet.py' if name.startswith('glnet_') else 'ResNet'
  return next((c for c in checkouts
               if os.path.exists(os.path.join(c, marker))), None)


if __name__ == '__main__':
  # The official code shares a GPU with us: JAX must not take 75 % of its
  # memory up front (set before tune_malloc_for_cpu starts JAX's backend).
  if parse_args().torch_python:
    os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
  launch.tune_malloc_for_cpu()  # as train.py runs
  sys.exit(main())
