r"""Where a GLNet forward's time goes, part by part, beside the official model.

Times the eval forward of each part of a GLNet: the stem and the three
transitions (``down0`` ... ``down3``) and the four stages (``stage1`` ...
``stage4``), each a jitted program fed the previous part's output, and the
whole forward (``total``; ``rest`` is total less the parts: the final norm,
pool and head, and what the split programs do not share). Our calls
alternate as in ``benchmarks/throughput.py``. With ``--torch_python`` and
``--official`` the official model's parts are timed by forward hooks in one
forward (``torch_official.py --stage_times``), in a separate process after
ours: read the two columns' shares, and the ratios only from runs close in
time on a quiet machine.

With ``--blocks`` it also times the first block of each stage (``block1``
... ``block4``) on that stage's input, forward and forward + backward (the
sum of its output as the loss; gradients of the parameters and the input),
in eval mode, its calls alternating with the official block's
(``torch_official.py --block``) as ``throughput.py`` alternates models: the
official / ours column is the median over rounds.

  PYTHONPATH=. python benchmarks/profile_stages.py --model glnet_stl \
      [--batch 8 --size 224] [--blocks] \
      [--torch_python=/tmp/torchenv/bin/python --official=/tmp/GLMix]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import os
import pathlib
import subprocess
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import throughput
from glmix_jax import launch, models
from glmix_jax.models import glnet

PARTS = ('down0', 'stage1', 'down1', 'stage2', 'down2', 'stage3', 'down3',
         'stage4')
BLOCKS = ('block1', 'block2', 'block3', 'block4')  # each stage's first block


class _Part(glnet.GLNet):
  """One part of a GLNet (``PARTS``, or a stage's first block, ``BLOCKS``,
  built with one block a stage), with the whole model's variables."""
  part: str = 'down0'

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    i = int(self.part[-1])
    if self.part.startswith('down'):
      return self._downsample(i, x, False)
    return self._stage(i - 1, x, np.zeros(self.depths[i - 1]), False)


def _fields(model: glnet.GLNet) -> dict:
  """The model's constructor fields, to build a ``_Part`` of it."""
  return {f.name: getattr(model, f.name) for f in dataclasses.fields(model)
          if f.init and f.name not in ('parent', 'name')}


def part_programs(name: str, batch: int, size: int, overrides: dict
                  ) -> tuple[dict, dict, jax.Array]:
  """name -> (jitted function, its input) for every part and ``total``, and
  the last part's output (stage 4's map) for checking."""
  model = models.build(name, **overrides)
  if not isinstance(model, glnet.GLNet) or model.token_label_head:
    raise ValueError(f'{name} is not a plain GLNet; profile_stages times '
                     'GLNet stages only.')
  images = jax.random.normal(jax.random.PRNGKey(0), (batch, size, size, 3))
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), images)
  fields = _fields(model)
  programs = {'total': (jax.jit(model.apply), images)}
  x = images
  for part in PARTS:
    apply = jax.jit(_Part(**fields, part=part).apply)
    programs[part] = (apply, x)
    x = apply(variables, x)
  return programs, variables, x


def block_programs(name: str, programs: dict, variables: dict,
                   overrides: dict) -> dict:
  """block -> (forward, forward + backward, its input) for ``BLOCKS``, each
  on its stage's input in ``programs`` (``part_programs``)."""
  model = models.build(name, **overrides)
  fields = dict(_fields(model), depths=(1,) * len(model.depths))
  blocks = {}
  for block, stage in zip(BLOCKS, PARTS[1::2]):
    apply = _Part(**fields, part=block).apply
    loss = lambda params, x, apply=apply: jnp.sum(
        apply({**variables, 'params': params}, x))
    blocks[block] = (jax.jit(apply), jax.jit(jax.grad(loss, argnums=(0, 1))),
                     programs[stage][1])
  return blocks


def time_blocks(blocks: dict, variables: dict, repeats: int,
                official: Callable | None = None) -> dict:
  """(block, 'forward' | 'train') -> timings of ours (``jax``) and, given
  ``official`` (``throughput.official_calls`` with all but the mode and the
  extra arguments bound), of the official block (``torch``), their calls
  alternating, and ``speedup``: the median over rounds of official / ours."""
  results = {}
  for k, (block, (forward, backward, x)) in enumerate(blocks.items(), 1):
    for mode, fn, arg in (('forward', forward, variables),
                          ('train', backward, variables['params'])):
      with contextlib.ExitStack() as stack:
        calls = dict(jax=throughput.timed(
            lambda fn=fn, arg=arg, x=x: jax.block_until_ready(fn(arg, x))))
        if official:
          calls['torch'] = stack.enter_context(
              official(mode=mode, extra_args=(f'--block={k}',)))[1]
        result = throughput.time_calls(calls, repeats)
      if official:
        result['speedup'] = throughput.paired_ratio(result['torch'],
                                                    result['jax'])
      results[block, mode] = result
  return results


def official_parts(python: str, official: str, name: str, *, batch: int,
                   size: int, repeats: int) -> dict[str, float]:
  """The official model's median seconds by part (``torch_official.py``)."""
  script = pathlib.Path(__file__).with_name('torch_official.py')
  out = subprocess.run(
      [python, str(script), f'--official={official}', f'--model={name}',
       '--mode=forward', f'--batch={batch}', f'--size={size}',
       f'--threads={os.cpu_count()}', f'--stage_times={repeats}'],
      capture_output=True, text=True, check=False,
      env=launch.without_malloc_tuning(dict(os.environ)))
  if out.returncode:
    raise RuntimeError(f'The official {name} failed:\n{out.stderr}')
  return json.loads(out.stdout.splitlines()[-1])


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--model', default='glnet_stl')
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--size', type=int, default=224)
  parser.add_argument('--repeats', type=int, default=10)
  parser.add_argument('--override', action='append', default=[])
  parser.add_argument('--blocks', action='store_true',
                      help="also each stage's first block, forward and "
                      'forward + backward')
  parser.add_argument('--torch_python')
  parser.add_argument('--official')
  args = parser.parse_args(argv)
  overrides = throughput.parse_overrides(args.override)
  programs, variables, _ = part_programs(args.model, args.batch, args.size,
                                         overrides)
  timing = throughput.time_calls(
      {part: throughput.timed(
          lambda f=f, x=x: jax.block_until_ready(f(variables, x)))
       for part, (f, x) in programs.items()}, args.repeats)
  ours = {part: t['median_s'] for part, t in timing.items()}
  with_official = bool(args.torch_python and args.official)
  theirs = (official_parts(args.torch_python, args.official, args.model,
                           batch=args.batch, size=args.size,
                           repeats=args.repeats)
            if with_official else {})
  for times in (ours, theirs):
    if times:
      times['rest'] = times['total'] - sum(times[p] for p in PARTS)
  print(f'{args.model}, batch {args.batch}, {args.size}x{args.size}, '
        f'float32, eval; median ms of {args.repeats} (share of total)')
  print('| part | ours | official | official / ours |\n|---|---:|---:|---:|')
  for part in (*PARTS, 'rest', 'total'):
    cells = [f'{1e3 * t[part]:.1f} ({t[part] / t["total"]:.0%})'
             if t else '-' for t in (ours, theirs)]
    ratio = (f'{theirs[part] / ours[part]:.2f}x'
             if theirs and part != 'rest' else '-')
    print(f'| {part} | {cells[0]} | {cells[1]} | {ratio} |', flush=True)
  if args.blocks:
    official_block = functools.partial(
        throughput.official_calls, args.torch_python, args.official,
        args.model, batch=args.batch, size=args.size,
        threads=os.cpu_count(), dtype='float32') if with_official else None
    print_blocks(time_blocks(
        block_programs(args.model, programs, variables, overrides),
        variables, args.repeats, official_block))


def print_blocks(results: dict):
  """``time_blocks``' results as a table, a row per block."""
  print('\nfirst block of each stage, eval mode; median ms\n'
        '| block | ours forward | official forward | official / ours '
        '| ours fwd + bwd | official fwd + bwd | official / ours |\n'
        '|---|---:|---:|---:|---:|---:|---:|')
  for block in BLOCKS:
    cells = []
    for mode in ('forward', 'train'):
      r = results[block, mode]
      cells += [f'{1e3 * r["jax"]["median_s"]:.1f}',
                f'{1e3 * r["torch"]["median_s"]:.1f}' if 'torch' in r else '-',
                f'{r["speedup"]:.2f}x' if 'speedup' in r else '-']
    print(f'| {block} | ' + ' | '.join(cells) + ' |', flush=True)


if __name__ == '__main__':
  launch.tune_malloc_for_cpu()  # as train.py runs
  main()
