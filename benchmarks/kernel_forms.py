r"""Each model kernel's forms, A/B, at the shapes the models call them with.

``glmix_jax.models.kernels`` gives four kernels two forms each, the standard
XLA form (``'default'``: GPU, TPU) and a form tuned on XLA:CPU (``'cpu'``),
and picks one per platform; ``gelu`` and ``layer_norm`` have one form
everywhere, with a written backward pass instead of autodiff's. This script
measures each choice on the device JAX runs on:

1. each model is traced abstractly (``jax.eval_shape``, no compute) with the
   kernels wrapped to record every call: kernel, argument shapes and dtypes,
   static arguments;
2. every distinct call is compiled alone in each form and timed forward and
   forward + backward (``jax.vjp`` with a random cotangent; the backward of
   every input), the median of ``--repeats`` calls on random data;
3. per model and kernel, the seconds of all its calls in each form (each
   distinct call's time x how often the model makes it).

A form that loses on a platform where it is chosen is a wrong choice
(BENCHMARKS.md has this script's CPU table; on a GPU it has not run yet).
A kernel timed alone is not the kernel inside a model, where XLA fuses it
with its neighbours: confirm a change with the model's own timing.

  PYTHONPATH=. python benchmarks/kernel_forms.py --batch 128 \
      --dtype bfloat16 --json kernel_forms.json

``--dep_conv_blocks 1 2 8 32`` adds CPU ``dep_conv`` forms with other
block sizes (the choice of ``kernels.DEP_CONV_BLOCK_GROUPS``).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import functools
import json
import pathlib
import statistics
import sys
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp

from benchmarks import throughput
from glmix_jax import launch, models
from glmix_jax.models import kernels

# The one-form kernels, against what they replace: autodiff of the same
# forward (nn.gelu's erfc form for GELU, the formula XLA expands by default).
ONE_FORM = {
    'gelu': {'written': kernels.gelu,
             'autodiff': lambda x: jax.nn.gelu(x, approximate=False)},
    'layer_norm': {
        'written': kernels.layer_norm,
        'autodiff': lambda x, scale, bias, epsilon: kernels._layer_norm_fwd(  # pylint: disable=protected-access
            x, scale, bias, epsilon)[0]},
}


def forms(name: str, dep_conv_blocks: tuple[int, ...] = ()
          ) -> dict[str, tuple[Callable[..., jax.Array], int | None]]:
  """Kernel ``name``'s forms, by form name, each with the groups per block
  of the CPU ``dep_conv`` it is traced with (None: the default). With
  ``dep_conv_blocks``, ``grouped_shift_conv`` has a CPU form for each."""
  found = {form: (fn, None) for form, fn in
           (kernels.IMPLEMENTATIONS.get(name) or ONE_FORM[name]).items()}
  if name == 'grouped_shift_conv':
    found.update({f'cpu, blocks of {n}': (found['cpu'][0], n)
                  for n in dep_conv_blocks})
  return found


@contextlib.contextmanager
def dep_conv_block_groups(groups: int | None) -> Iterator[None]:
  """While open, the CPU ``dep_conv`` traces with ``groups`` groups per
  block (None: as it is)."""
  saved = kernels.DEP_CONV_BLOCK_GROUPS
  kernels.DEP_CONV_BLOCK_GROUPS = groups or saved
  try:
    yield
  finally:
    kernels.DEP_CONV_BLOCK_GROUPS = saved


@contextlib.contextmanager
def recorded_calls() -> Iterator[list[tuple[str, Any, dict]]]:
  """While open, every kernel call appends (name, abstract args, static
  args) to the yielded list, and computes as usual."""
  calls = []
  on_platform = kernels._on_platform  # pylint: disable=protected-access
  one_form = {name: getattr(kernels, name) for name in ONE_FORM}

  def abstract(args):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), args)

  def record_platform(name, *args, batched=None, **static):
    calls.append((name, abstract(args), static))
    return on_platform(name, *args, batched=batched, **static)

  def record_one_form(name):
    def call(*args):
      arrays = tuple(a for a in args if hasattr(a, 'shape'))
      static = {'epsilon': args[-1]} if name == 'layer_norm' else {}
      calls.append((name, abstract(arrays), static))
      return one_form[name](*args)
    return call

  kernels._on_platform = record_platform  # pylint: disable=protected-access
  for name in ONE_FORM:
    setattr(kernels, name, record_one_form(name))
  try:
    yield calls
  finally:
    kernels._on_platform = on_platform  # pylint: disable=protected-access
    for name, fn in one_form.items():
      setattr(kernels, name, fn)


def model_calls(name: str, batch: int, size: int, dtype: str
                ) -> collections.Counter:
  """How often model ``name``'s forward makes each distinct kernel call."""
  model = models.build(name, dtype=dtype)
  images = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), images)
  with recorded_calls() as calls:
    jax.eval_shape(functools.partial(model.apply, train=False),
                   variables, images)
  return collections.Counter(
      (kernel, args, tuple(sorted(static.items())))
      for kernel, args, static in calls)


def _random(args, seed: int):
  leaves, tree = jax.tree.flatten(args)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return jax.tree.unflatten(tree, [
      jax.random.normal(k, a.shape, jnp.float32).astype(a.dtype)
      for k, a in zip(keys, leaves)])


def median_seconds(call: Callable[[], Any], repeats: int,
                   budget_s: float) -> float:
  """Median seconds of ``call`` over ``repeats`` calls after a warm-up, or
  over as many as fit in ``budget_s`` (at least one): a form with a long
  sequential loop (the CPU forms on a GPU) can take seconds a call."""
  seconds = throughput.timed(call)
  warm = seconds()
  return statistics.median(
      seconds() for _ in range(max(1, min(repeats, int(budget_s / warm)))))


def time_forms(kernel: str, args, static: tuple, repeats: int,
               budget_s: float, dep_conv_blocks: tuple[int, ...] = ()
               ) -> dict[str, dict[str, float]]:
  """Median seconds of one call of each of ``kernel``'s forms
  (``forms``), forward and forward + backward, on random inputs shaped
  like ``args``."""
  inputs = _random(args, 0)
  results = {}
  for form, (fn, groups) in forms(kernel, dep_conv_blocks).items():
    f = functools.partial(fn, **dict(static))
    cotangent = _random(jax.eval_shape(f, *inputs), 1)
    with dep_conv_block_groups(groups):
      forward = jax.jit(f).lower(*inputs).compile()
      # The cotangent is an argument: as a constant, XLA folds the
      # backward's pads of it at compile time (seconds each, on a GPU).
      both = jax.jit(lambda a, c, f=f: jax.vjp(f, *a)[1](c)
                     ).lower(inputs, cotangent).compile()
    results[form] = {
        what: median_seconds(lambda c=c: jax.block_until_ready(c()),
                             repeats, budget_s)
        for what, c in (('forward', lambda: forward(*inputs)),
                        ('forward_backward', lambda: both(inputs, cotangent)))}
  return results


def _describe(args, static: tuple) -> str:
  shapes = ' '.join(
      'x'.join(map(str, a.shape)) for a in jax.tree.leaves(args))
  return shapes + ''.join(f' {k}={v}' for k, v in static)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--models', nargs='+',
                      default=['glnet_stl', 'acmix_resnet50', 'acmix_swin_t'])
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--size', type=int, default=224)
  parser.add_argument('--dtype', default='float32')
  parser.add_argument('--repeats', type=int, default=10)
  parser.add_argument('--budget_s', type=float, default=1.0,
                      help='timed seconds per form and call, at most about')
  parser.add_argument('--dep_conv_blocks', nargs='*', type=int, default=[],
                      help="also the CPU dep_conv with these groups per "
                      "block (its default: kernels.DEP_CONV_BLOCK_GROUPS)")
  parser.add_argument('--json', default=None)
  args = parser.parse_args(argv)
  device = jax.devices()[0]
  print(f'{device.platform}: {device.device_kind}, jax {jax.__version__}, '
        f'batch {args.batch}, {args.size}x{args.size}, {args.dtype}; ms per '
        'model step in each kernel (all its calls), forward and forward + '
        'backward', flush=True)
  print('| model | kernel | calls (distinct) | form | forward ms '
        '| fwd + bwd ms |\n|---|---|---:|---|---:|---:|', flush=True)
  timed_calls, results = {}, {}
  for name in args.models:
    totals = collections.defaultdict(lambda: collections.defaultdict(float))
    counts = collections.Counter()
    distinct = collections.Counter()
    for (kernel, call_args, static), n in model_calls(
        name, args.batch, args.size, args.dtype).items():
      key = (kernel, _describe(call_args, static))
      if key not in timed_calls:
        timed_calls[key] = time_forms(kernel, call_args, static,
                                      args.repeats, args.budget_s,
                                      tuple(args.dep_conv_blocks))
      counts[kernel] += n
      distinct[kernel] += 1
      for form, t in timed_calls[key].items():
        for what, seconds in t.items():
          totals[(kernel, form)][what] += n * seconds
    results[name] = {f'{k}/{f}': dict(v, calls=counts[k])
                     for (k, f), v in totals.items()}
    for (kernel, form), t in sorted(totals.items()):
      print(f'| {name} | {kernel} | {counts[kernel]} ({distinct[kernel]}) '
            f'| {form} | {1e3 * t["forward"]:.2f} '
            f'| {1e3 * t["forward_backward"]:.2f} |', flush=True)
    if args.json:  # after every model: a run stopped early keeps its rows
      pathlib.Path(args.json).write_text(json.dumps(dict(
          date=datetime.date.today().isoformat(), jax=jax.__version__,
          device=f'{device.platform}: {device.device_kind}', batch=args.batch,
          size=args.size, dtype=args.dtype, repeats=args.repeats,
          models=results,
          calls={f'{k} {d}': v for (k, d), v in timed_calls.items()}),
          indent=1))
  return 0


if __name__ == '__main__':
  launch.tune_malloc_for_cpu()
  sys.exit(main())
