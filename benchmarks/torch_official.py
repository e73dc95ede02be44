r"""Runs an official PyTorch model (GLNet or ACmix) from its own checkout, one
timed call per request, so that ``benchmarks/throughput.py`` can alternate it
call by call with ours.

Run by ``benchmarks/throughput.py`` in a separate process under a torch
interpreter (``--torch_python``); never imported by the project, and needs
torch only. The official code is imported unmodified from ``--official`` (a
checkout of rayleizhu/GLMix or LeapLabTHU/ACmix outside this repository).

Protocol, one line each: after building the model and one warm-up call it
prints a JSON line (torch version, threads); then for every line read from
stdin it makes one call and prints its seconds; it exits at end of input.
With ``--stage_times N`` it prints instead one JSON line, the median seconds
of each part of an official GLNet's eval forward over N calls, and exits
(``benchmarks/profile_stages.py``). With ``--block K`` each call is instead
the first block of an official GLNet's stage K on the input it gets in an
eval forward, in eval mode: its forward, or (``--mode=train``) its forward
and backward with the sum of its output as the loss (no update).

On a GPU (``--device=cuda``) a call's seconds end at ``torch.cuda.
synchronize()``, and ``--dtype=bfloat16`` runs it under ``torch.autocast``
(bfloat16 products and convolutions, float32 weights and reductions: the
official training scripts' mixed precision, which is float16 there: apex amp
in ACmix's Swin, a GradScaler in GLMix's token-labeling script).

  python benchmarks/torch_official.py --official=/tmp/GLMix --model=glnet_stl \
      --mode=train --batch=8 --size=224 <<< $'\n\n\n'
"""

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
import types

import torch
import torch.nn.functional as F


def _module(name: str, **attrs) -> types.ModuleType:
  module = types.ModuleType(name)
  module.__dict__.update(attrs)
  sys.modules[name] = module
  return module


class _DropPath(torch.nn.Module):
  """What timm's DropPath computes: per-sample stochastic depth."""

  def __init__(self, drop_prob=0.0):
    super().__init__()
    self.drop_prob = drop_prob

  def forward(self, x):
    if not self.training or not self.drop_prob:
      return x
    keep = 1.0 - self.drop_prob
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask / keep


class _LayerNorm2d(torch.nn.LayerNorm):
  """What timm's LayerNorm2d computes: LayerNorm over C of an NCHW map."""

  def __init__(self, num_channels, eps=1e-6, affine=True):
    super().__init__(num_channels, eps=eps, elementwise_affine=affine)

  def forward(self, x):
    x = x.permute(0, 2, 3, 1)
    x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias,
                     self.eps)
    return x.permute(0, 3, 1, 2)


def _provide_timm_helpers():
  """The official files take a few helpers from timm (and fairscale). timm
  1.x imports a torchvision that must match the torch build exactly, so the
  helpers are provided directly instead (same computation)."""
  layers = _module('timm.models.layers', DropPath=_DropPath,
                   LayerNorm2d=_LayerNorm2d, to_2tuple=lambda x: (x, x),
                   trunc_normal_=torch.nn.init.trunc_normal_)
  _module('timm')
  _module('timm.models', register_model=lambda fn: fn, layers=layers)
  _module('fairscale')
  _module('fairscale.nn')
  # Activation checkpointing is off in the official configs (never called).
  _module('fairscale.nn.checkpoint', checkpoint_wrapper=lambda m: m)


def build(root: str, name: str) -> torch.nn.Module:
  """The official model ``name`` (a registered name of this project)."""
  _provide_timm_helpers()
  if name.startswith('glnet_'):
    if name.endswith('_tklb'):
      raise ValueError('token-labeling variants are not supported here.')
    sys.path.insert(0, root)
    from models import glnet  # pylint: disable=import-outside-toplevel
    return getattr(glnet, name)()
  if name == 'acmix_resnet50':
    # ResNet_ImageNet.py imports load_state_dict_from_url from a torchvision
    # module that no longer exists; it is torch.hub's (and unused here).
    for module in ('torchvision', 'torchvision.models'):
      _module(module)
    _module('torchvision.models.utils',
            load_state_dict_from_url=torch.hub.load_state_dict_from_url)
    sys.path.insert(0, os.path.join(root, 'ResNet'))
    import ResNet_ImageNet  # pylint: disable=import-outside-toplevel
    return ResNet_ImageNet.ACmix_ResNet(layers=[3, 4, 6, 3])
  if name == 'acmix_swin_t':
    sys.path.insert(0, os.path.join(root, 'Swin-Transformer', 'models'))
    import swin_transformer_acmix as swin  # pylint: disable=import-outside-toplevel
    return swin.SwinTransformer_acmix(drop_path_rate=0.2)
  raise ValueError(f'No official builder for {name!r}.')


def step_function(model: torch.nn.Module, mode: str, images: torch.Tensor,
                  dtype: str = 'float32'):
  """A no-argument callable that returns when its work is done: one eval
  forward, or one AdamW training step (forward, cross-entropy, backward,
  update), under bfloat16 autocast if ``dtype`` says so."""
  autocast, done = _autocast_and_sync(images.device.type, dtype)
  if mode == 'forward':
    model.eval()

    def forward():
      with torch.no_grad(), autocast():
        model(images)
      done()

    return forward
  model.train()
  optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3,
                                weight_decay=0.05)
  labels = torch.randint(0, 1000, (images.shape[0],), device=images.device)

  def train_step():
    optimizer.zero_grad(set_to_none=True)
    with autocast():
      loss = F.cross_entropy(model(images), labels)
    loss.backward()
    optimizer.step()
    done()

  return train_step


def _autocast_and_sync(device: str, dtype: str):
  """A context factory for ``dtype``'s autocast (bfloat16 or none), and the
  wait for the device's queued work."""
  autocast = lambda: torch.autocast(device, dtype=torch.bfloat16,
                                    enabled=dtype == 'bfloat16')
  return autocast, (torch.cuda.synchronize if device == 'cuda'
                    else lambda: None)


def block_function(model: torch.nn.Module, stage: int, mode: str,
                   images: torch.Tensor, dtype: str = 'float32'):
  """A no-argument callable: the first block of an official GLNet's
  ``stage`` (1-4) on the input it gets in an eval forward of ``images``,
  in eval mode; its forward, or for ``mode='train'`` its forward and
  backward (the sum of its output as the loss: gradients of its parameters
  and its input)."""
  block = model.stages[stage - 1].blocks[0]
  inputs = []
  hook = block.register_forward_pre_hook(
      lambda _, args: inputs.append(args[0].detach()))
  model.eval()
  with torch.no_grad():
    model(images)
  hook.remove()
  x = inputs[0].requires_grad_(mode == 'train')
  autocast, done = _autocast_and_sync(images.device.type, dtype)

  def forward():
    with torch.no_grad(), autocast():
      block(x)
    done()

  def forward_backward():
    block.zero_grad(set_to_none=True)
    x.grad = None
    with autocast():
      loss = block(x).float().sum()
    loss.backward()
    done()

  return forward if mode == 'forward' else forward_backward


def stage_times(model: torch.nn.Module, images: torch.Tensor,
                repeats: int) -> dict[str, float]:
  """Median eval-forward seconds of each part of an official GLNet (its
  ``downsample_layers[i]`` as ``down{i}``, ``stages[i]`` as ``stage{i+1}``,
  timed by forward hooks) and of the whole forward (``total``), over
  ``repeats`` calls after one warm-up."""
  times: dict[str, list[float]] = {}

  def hook(name, module):
    module.register_forward_pre_hook(
        lambda *_: times.setdefault(name, []).append(-time.perf_counter()))
    def done(*_):
      times[name][-1] += time.perf_counter()
    module.register_forward_hook(done)

  for i, (down, stage) in enumerate(zip(model.downsample_layers,
                                        model.stages)):
    hook(f'down{i}', down)
    hook(f'stage{i + 1}', stage)
  model.eval()
  total = []
  with torch.no_grad():
    for _ in range(repeats + 1):
      start = time.perf_counter()
      model(images)
      total.append(time.perf_counter() - start)
  medians = {name: statistics.median(t[1:]) for name, t in times.items()}
  return dict(medians, total=statistics.median(total[1:]))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--official', required=True)
  parser.add_argument('--model', required=True)
  parser.add_argument('--mode', choices=('forward', 'train'), required=True)
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--size', type=int, default=224)
  parser.add_argument('--threads', type=int, default=os.cpu_count())
  parser.add_argument('--device', choices=('cpu', 'cuda'), default='cpu')
  parser.add_argument('--dtype', choices=('float32', 'bfloat16'),
                      default='float32')
  parser.add_argument('--stage_times', type=int, default=0, metavar='N',
                      help='print the median seconds of each part of an '
                      'eval forward over N calls (stage_times) and exit')
  parser.add_argument('--block', type=int, default=0, choices=range(5),
                      metavar='K', help="time stage K's first block "
                      '(block_function) instead of the model')
  args = parser.parse_args()
  torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  with contextlib.redirect_stdout(sys.stderr):  # stdout is the protocol's
    model = build(args.official, args.model).to(args.device)
  images = torch.randn(args.batch, 3, args.size, args.size,
                       device=args.device)
  if args.stage_times:
    print(json.dumps(stage_times(model, images, args.stage_times)))
    return
  call = (block_function(model, args.block, args.mode, images, args.dtype)
          if args.block else
          step_function(model, args.mode, images, args.dtype))
  call()  # warm-up
  cuda = args.device == 'cuda'
  print(json.dumps(dict(
      torch=torch.__version__, threads=torch.get_num_threads(),
      device=torch.cuda.get_device_name() if cuda else 'cpu',
      peak_bytes=torch.cuda.max_memory_allocated() if cuda else None)),
        flush=True)
  for _ in sys.stdin:
    start = time.perf_counter()
    call()
    print(time.perf_counter() - start, flush=True)


if __name__ == '__main__':
  main()
