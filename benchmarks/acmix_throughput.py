r"""Forward throughput and peak memory of ACmix-ResNet-50 and ACmix-Swin-T.

Eval-mode forward at 224x224, float32, random init, on this machine's CPU.
Images/s is batch / median time of ``--repeats`` jitted calls after one
warm-up; peak memory is XLA's memory analysis of the compiled forward
(arguments + outputs + temporaries). Optionally times the official PyTorch
models in the same job for comparison:

  PYTHONPATH=. python benchmarks/acmix_throughput.py \
      [--torch_python=/work/torchvenv/bin/python --official=/path/to/ACmix]

``--official`` is a checkout of LeapLabTHU/ACmix (never part of this
repository); its models are imported from there, unmodified, and timed by a
separate process under ``--torch_python`` (torch only; torchvision and timm
are not needed) with ``torch.set_num_threads`` = CPU count.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np

from glmix_jax import models

MODELS = ('acmix_resnet50', 'acmix_swin_t')

# Runs in the torch venv: builds the official model, times eval forwards.
_TORCH_SCRIPT = textwrap.dedent('''
    import json, os, statistics, sys, time, types
    import torch
    root, name = sys.argv[1:3]
    batch, repeats = int(sys.argv[3]), int(sys.argv[4])
    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(0)
    if name == 'acmix_resnet50':
      # ResNet_ImageNet.py imports load_state_dict_from_url from a torchvision
      # module that no longer exists; it is torch.hub's (and unused here).
      for module in ('torchvision', 'torchvision.models',
                     'torchvision.models.utils'):
        sys.modules[module] = types.ModuleType(module)
      sys.modules['torchvision.models.utils'].load_state_dict_from_url = (
          torch.hub.load_state_dict_from_url)
      sys.path.insert(0, os.path.join(root, 'ResNet'))
      import ResNet_ImageNet
      model = ResNet_ImageNet.ACmix_ResNet(layers=[3, 4, 6, 3])
    else:
      # The model file takes three helpers from timm; timm 1.x imports a
      # torchvision that must match the torch build, so provide them directly
      # (DropPath is the identity in eval).
      layers = types.ModuleType('timm.models.layers')
      layers.DropPath = lambda rate=0.0: torch.nn.Identity()
      layers.to_2tuple = lambda x: (x, x)
      layers.trunc_normal_ = torch.nn.init.trunc_normal_
      for module in ('timm', 'timm.models'):
        sys.modules[module] = types.ModuleType(module)
      sys.modules['timm.models.layers'] = layers
      sys.path.insert(0, os.path.join(root, 'Swin-Transformer', 'models'))
      import swin_transformer_acmix as swin
      model = swin.SwinTransformer_acmix(drop_path_rate=0.2)
    model.eval()
    x = torch.randn(batch, 3, 224, 224)
    times = []
    with torch.no_grad():
      model(x)
      for _ in range(repeats):
        start = time.perf_counter()
        model(x)
        times.append(time.perf_counter() - start)
    print(json.dumps(dict(median_s=statistics.median(times), min_s=min(times),
                          max_s=max(times), torch=torch.__version__)))
''')


def time_jax(name: str, batch: int, repeats: int) -> dict:
  """Median / min / max seconds per batch and peak bytes of the forward."""
  model = models.build(name)
  images = jnp.asarray(
      np.random.default_rng(0).normal(size=(batch, 224, 224, 3)), jnp.float32)
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), images[:1])
  forward = jax.jit(lambda v, x: model.apply(v, x, train=False))
  compiled = forward.lower(variables, images).compile()
  memory = compiled.memory_analysis()
  compiled(variables, images).block_until_ready()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    compiled(variables, images).block_until_ready()
    times.append(time.perf_counter() - start)
  return dict(
      median_s=statistics.median(times), min_s=min(times), max_s=max(times),
      peak_bytes=(memory.argument_size_in_bytes + memory.output_size_in_bytes
                  + memory.temp_size_in_bytes),
      temp_bytes=memory.temp_size_in_bytes)


def time_torch(python: str, official: str, name: str, batch: int,
               repeats: int) -> dict:
  run = subprocess.run(
      [python, '-c', _TORCH_SCRIPT, official, name, str(batch), str(repeats)],
      capture_output=True, text=True, check=False)
  if run.returncode:
    raise RuntimeError(f'The official {name} failed:\n{run.stderr}')
  return json.loads(run.stdout.strip().splitlines()[-1])


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--models', nargs='+', default=list(MODELS))
  parser.add_argument('--torch_python', default=None)
  parser.add_argument('--official', default=None)
  args = parser.parse_args()
  print(f'jax {jax.__version__}, {os.cpu_count()} CPU cores, batch '
        f'{args.batch}, 224x224, float32, median of {args.repeats}')
  for name in args.models:
    ours = time_jax(name, args.batch, args.repeats)
    line = (f'{name:16s} jax   {args.batch / ours["median_s"]:6.2f} img/s '
            f'({ours["median_s"]:.3f} s/batch, {ours["min_s"]:.3f}-'
            f'{ours["max_s"]:.3f}), peak {ours["peak_bytes"] / 2**20:.0f} MiB '
            f'(temp {ours["temp_bytes"] / 2**20:.0f} MiB)')
    print(line, flush=True)
    if args.torch_python and args.official:
      ref = time_torch(args.torch_python, args.official, name, args.batch,
                       args.repeats)
      print(f'{name:16s} torch {args.batch / ref["median_s"]:6.2f} img/s '
            f'({ref["median_s"]:.3f} s/batch, {ref["min_s"]:.3f}-'
            f'{ref["max_s"]:.3f}; torch {ref["torch"]}); jax/torch speed-up '
            f'{ref["median_s"] / ours["median_s"]:.1f}x', flush=True)


if __name__ == '__main__':
  sys.exit(main())
