r"""Forward and training-step throughput, compile time, memory and MFU.

For any registered model, batch, resolution and compute dtype, on whatever
device JAX runs on (CPU, GPU, TPU):

* forward: the jitted eval-mode ``model.apply``;
* train: ``train_lib.train_step`` (forward, backward, AdamW update, the
  finite-step guard) with drop path on, no Mixup/CutMix and no EMA, the state
  donated as in training.

Each is compiled ahead of time (``jit(...).lower(...).compile()``, timed),
run once to warm up, then timed ``--repeats`` times; images/s uses the
median. Peak memory is the device's ``peak_bytes_in_use`` where the backend
reports it (GPU, TPU), else XLA's memory analysis of the compiled program
(arguments + outputs + temporaries - donated aliases; CPU). MFU is model
FLOPs / time / the device's measured peak, where model FLOPs are 2 x the exact
MACs of ``summary.count_macs`` (x 3 for a training step: forward + two
backward products) and the peak is the best of a few large square matmuls in
the same dtype on the same device.

With ``--torch_python`` and ``--official`` the official PyTorch model is
timed in the same job (``benchmarks/torch_official.py``, a separate process,
``torch.set_num_threads(--torch_threads)``) for the same mode, batch and
size; its train step is AdamW + cross-entropy.

  PYTHONPATH=. python benchmarks/throughput.py --models glnet_stl \
      --batch 8 --size 224 --dtype float32 --modes forward train \
      [--override remat=full --override scan_blocks=True] \
      [--torch_python=/work/torch-main/bin/python --official=/tmp/GLMix] \
      [--json out.json]
"""

from __future__ import annotations

import argparse
import ast
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
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from glmix_jax import models, train_lib
from glmix_jax.models import summary

MODES = ('forward', 'train')
_TORCH_SCRIPT = pathlib.Path(__file__).with_name('torch_official.py')


def time_calls(call: Callable[[], Any], repeats: int) -> dict[str, float]:
  """Seconds per call (median, min, max) of ``repeats`` calls after one
  warm-up; ``call`` must block until its result is ready."""
  call()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    call()
    times.append(time.perf_counter() - start)
  return dict(median_s=statistics.median(times), min_s=min(times),
              max_s=max(times))


def matmul_peak_flops(dtype: jnp.dtype, size: int, repeats: int) -> float:
  """Best FLOP/s of a (size x size) @ (size x size) matmul in ``dtype``."""
  a = jnp.ones((size, size), dtype)
  matmul = jax.jit(lambda x, y: x @ y)
  timing = time_calls(lambda: matmul(a, a).block_until_ready(), repeats)
  return 2 * size**3 / timing['min_s']


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


def _compile(fn, *args) -> tuple[Any, float]:
  start = time.perf_counter()
  compiled = fn.lower(*args).compile()
  return compiled, time.perf_counter() - start


def _forward(model, variables, images):
  forward = jax.jit(lambda v, x: model.apply(v, x, train=False))
  compiled, seconds = _compile(forward, variables, images)
  call = lambda: compiled(variables, images).block_until_ready()
  return compiled, seconds, call


def _train(model, images, seed: int = 0):
  tx = optax.adamw(1e-3, weight_decay=0.05)
  state = jax.jit(functools.partial(
      train_lib.init_state, model, tx, (1,) + images.shape[1:], seed,
      False))()
  labels = jnp.arange(images.shape[0]) % 1000
  batch = dict(image=images, label=labels)
  no_mix = ml_collections.FrozenConfigDict(dict(
      mixup_alpha=0.0, cutmix_alpha=0.0, mix_prob=0.0, switch_prob=0.0,
      label_smoothing=0.0, label_smoothing_spread='eps_over_k'))
  step = jax.jit(functools.partial(
      train_lib.train_step, model=model, tx=tx, schedule=lambda s: 1e-3,
      mix_config=no_mix, num_classes=model.num_classes, seed=seed,
      ema_decay=0.0), donate_argnums=(0,))
  compiled, seconds = _compile(step, state, batch)
  holder = [state]

  def call():
    holder[0], metrics = compiled(holder[0], batch)
    jax.block_until_ready(metrics)

  return compiled, seconds, call


def benchmark_jax(name: str, mode: str, *, batch: int, size: int,
                  dtype: str, repeats: int, overrides: dict) -> dict:
  """One (model, mode) measurement of this project's implementation."""
  model = models.build(name, dtype=dtype, **overrides)
  images = jnp.asarray(np.random.default_rng(0).normal(
      size=(batch, size, size, 3)), jnp.float32)
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), images[:1])
  macs, _ = summary.count_macs(model, variables, (1, size, size, 3))
  if mode == 'forward':
    compiled, compile_s, call = _forward(model, variables, images)
  else:
    del variables
    compiled, compile_s, call = _train(model, images)
  result = dict(compile_s=compile_s, **_peak_bytes(compiled),
                flops=2 * macs['total'] * batch * (3 if mode == 'train' else 1))
  if repeats:  # else compile only
    result.update(time_calls(call, repeats))
    result['images_per_s'] = batch / result['median_s']
  result['device_peak_bytes'] = _device_peak_bytes()
  return result


def benchmark_torch(python: str, official: str, name: str, mode: str, *,
                    batch: int, size: int, repeats: int, threads: int) -> dict:
  """One (model, mode) measurement of the official PyTorch code."""
  run = subprocess.run(
      [python, str(_TORCH_SCRIPT), f'--official={official}', f'--model={name}',
       f'--mode={mode}', f'--batch={batch}', f'--size={size}',
       f'--repeats={repeats}', f'--threads={threads}'],
      capture_output=True, text=True, check=False)
  if run.returncode:
    raise RuntimeError(f'The official {name} failed:\n{run.stderr}')
  result = json.loads(run.stdout.strip().splitlines()[-1])
  result['images_per_s'] = batch / result['median_s']
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


def format_row(name: str, mode: str, r: dict, peak_flops: float) -> str:
  ours = r['jax']
  memory = ours['device_peak_bytes'] or ours['compiled_peak_bytes']
  timing = '| - | - |'
  if 'median_s' in ours:
    timing = (f'| {ours["images_per_s"]:.2f} | {ours["median_s"]:.3f} '
              f'({ours["min_s"]:.3f}-{ours["max_s"]:.3f}) |')
  mfu = ('-' if 'median_s' not in ours else
         f'{100 * ours["flops"] / ours["median_s"] / peak_flops:.1f}%')
  row = (f'| {name} | {mode} {timing} {ours["compile_s"]:.1f} | '
         f'{_mib(memory)} | {mfu} |')
  if 'torch' in r:
    ref = r['torch']
    row += (f' {ref["images_per_s"]:.2f} | '
            f'{ref["median_s"] / ours["median_s"]:.2f}x |')
  return row


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
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
  parser.add_argument('--json', default=None)
  args = parser.parse_args(argv)
  overrides = parse_overrides(args.override)
  device = jax.devices()[0]
  peak = matmul_peak_flops(jnp.dtype(args.dtype), args.matmul_size, 5)
  header = dict(
      date=datetime.date.today().isoformat(), jax=jax.__version__,
      device=f'{device.platform}: {device.device_kind}',
      cpu_count=os.cpu_count(), host=platform.processor() or platform.machine(),
      load_average=os.getloadavg(), batch=args.batch, size=args.size,
      dtype=args.dtype, repeats=args.repeats, overrides=overrides,
      matmul_peak_flops=peak)
  print(f'{header["device"]}, jax {jax.__version__}, batch {args.batch}, '
        f'{args.size}x{args.size}, {args.dtype}, overrides {overrides}; '
        f'measured matmul peak {peak / 1e9:.1f} GFLOP/s; load '
        f'{header["load_average"][0]:.1f}', flush=True)
  print('| model | mode | img/s | s/batch (min-max) | compile s | peak MiB '
        '| MFU | official img/s | speed-up |\n|---|---|---:|---|---:|---:|'
        '---:|---:|---:|', flush=True)
  results = {}
  for name in args.models:
    for mode in args.modes:
      r = dict(jax=benchmark_jax(
          name, mode, batch=args.batch, size=args.size, dtype=args.dtype,
          repeats=args.repeats, overrides=overrides))
      official = _official_checkout(args.official, name)
      if args.torch_python and official:
        r['torch'] = benchmark_torch(
            args.torch_python, official, name, mode, batch=args.batch,
            size=args.size, repeats=args.repeats, threads=args.torch_threads)
      results[f'{name}/{mode}'] = r
      print(format_row(name, mode, r, peak), flush=True)
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(
        dict(header, load_average_end=os.getloadavg(), results=results),
        indent=1))


def _official_checkout(checkouts: list[str], name: str) -> str | None:
  """The checkout among ``checkouts`` that holds the official ``name``."""
  marker = 'models/glnet.py' if name.startswith('glnet_') else 'ResNet'
  return next((c for c in checkouts
               if os.path.exists(os.path.join(c, marker))), None)


if __name__ == '__main__':
  sys.exit(main())
