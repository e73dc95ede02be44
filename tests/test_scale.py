"""At the users' scale: what the compiler makes of each model's train step and
forward pass under the 8-device data-parallel mesh, and what the programs
lowered for GPU (``cuda``) and TPU contain.

Each design at its official fixture's size (every kind of block present), in
bfloat16. Compiled for 8 CPU devices: each device does 1/8 of the work, moves
no activations (only the all-reduces of gradients, BatchNorm statistics and
metrics), and its loops run over its own examples. Lowered for cuda and tpu:
the MACs are ``summary.count_macs``'s, there is no loop and no branch to sync
with the host, and float32 products run at full precision.
"""

import collections
import re

import jax
import ml_collections
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec

import hlo
from configs import common
from glmix_jax import models, sharding, train_lib
from glmix_jax.data import mix
from glmix_jax.models import kernels, layers, summary

BATCH = 16  # 2 images per device
TINY = {  # name -> (image size, the design at its fixture's size)
    'glnet_stl': (64, dict(dims=(32, 64, 96, 128), depths=(1, 1, 2, 1))),
    # Stage 3 alternates GLMix and MHSA: one of each.
    'glnet_4g': (64, dict(dims=(32, 64, 96, 128), depths=(1, 1, 2, 1))),
    'acmix_resnet50': (128, dict(depths=(1, 1, 1, 1), width_per_group=16)),
    'acmix_swin_t': (224, dict(embed_dim=32, depths=(2, 2, 2, 2),
                               num_heads=(1, 2, 4, 8))),
}
# The CPU kernels' loops, with blocks and tiles made small enough that these
# sizes have several per device (the functions do not change): GLNet's
# depthwise kernel gradient walks stage 1's 16 rows of each of a device's 2
# images one by one (32 trips; the global batch would make it 256); ACmix's
# local attention takes one (image, head) slab per tile, 2 x 4 per device
# (64 for the global batch), and 49 window offsets in each. Threefry's 5
# rounds (dropout, drop path, random erasing's noise) are a loop on CPU.
KERNEL_GRAD_BLOCK = 512
# In GLNet-4G also the MLPs' depthwise convs of stages 2 and 3 (8 and 4 rows
# of 2 images).
LOOPS = {'glnet_stl': {5, 32}, 'glnet_4g': {5, 8, 16, 32},
         'acmix_resnet50': {5, 8, 49}, 'acmix_swin_t': {5}}
OPTIMIZER = optax.adamw(1e-3, weight_decay=0.05)


def step_and_inputs(name, size, overrides, *, mesh, dtype='float32'):
  """The recipe's train step (Mixup/CutMix in groups of 2, EMA) for
  ``name``, its abstract state and batch, and the model."""
  model = models.build(name, num_classes=10, dtype=dtype, **overrides)
  augmentation = common.deit_augmentation()
  augmentation.mix_group_size = 2
  config = ml_collections.ConfigDict(dict(
      augmentation=augmentation, data=dict(num_classes=10, mean=common.IMAGENET_MEAN,
                std=common.IMAGENET_STD), seed=0,
      ema_decay=0.9999))
  tx = OPTIMIZER
  state = jax.eval_shape(lambda: train_lib.init_state(
      model, tx, (1, size, size, 3), 0, True))
  settings = mix.MixSettings.from_config(augmentation)
  # The recipe's batch: uint8 pixels, random-erasing boxes, mixing draws.
  batch = dict(image=np.zeros((BATCH, size, size, 3), np.uint8),
               erase_box=np.zeros((BATCH, 4), np.int32),
               label=np.zeros(BATCH, np.int32),
               **mix.draw(settings, seed=0, step=0, batch=BATCH, height=size,
                          width=size))
  split = None if mesh is None else NamedSharding(
      mesh, PartitionSpec(sharding.DATA_AXIS))
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=split)
           for k, v in batch.items()}
  step = train_lib.make_train_step(config, model, tx, lambda s: 1e-3,
                                   mesh=mesh)
  return step, state, batch, model


def forward(model, mesh):
  apply = lambda v, x: model.apply(v, x, train=False)
  return jax.jit(apply if mesh is None else sharding.traced_on(mesh, apply))


def update_flops(state) -> float:
  """XLA's FLOPs of the step's per-parameter work, which data parallelism
  repeats on every device (FSDP would split it): the gradient and parameter
  norms, the AdamW update and the EMA: about 10 % of a device's step in the
  tiny GLNet-4G here, under 0.1 % at 224 px and 128 images per device."""
  def update(state, grads):
    updates, opt_state = OPTIMIZER.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = jax.tree.map(lambda e, p: 0.9999 * e + 0.0001 * p,
                       state.ema_params, params)
    return (optax.tree.norm(grads), optax.tree.norm(params), params,
            opt_state, ema)
  return jax.jit(update).trace(state, state.params).lower().cost_analysis(
      )['flops']


def size_of(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


@pytest.fixture(name='programs', scope='module', params=sorted(TINY))
def _programs(request):
  """Each design's train step and forward: compiled for the 8 CPU devices
  and compiled for one device (XLA's FLOP count of the unpartitioned
  program) in float32, lowered for cuda and tpu in bfloat16."""
  name = request.param
  size, overrides = TINY[name]
  mesh = sharding.make_mesh()
  result = dict(name=name)
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(kernels, 'KERNEL_GRAD_BLOCK_ELEMENTS', KERNEL_GRAD_BLOCK)
    patch.setattr(kernels, 'LOCAL_ATTENTION_TILE', 1)
    # float32 for the CPU (which computes bfloat16 in float32, with extra
    # conversions), bfloat16 for GPU and TPU.
    for on, dtype in ((mesh, 'float32'), (None, 'float32'),
                      (mesh, 'bfloat16')):
      step, state, batch, model = step_and_inputs(
          name, size, overrides, mesh=on, dtype=dtype)
      variables = dict(params=state.params, batch_stats=state.batch_stats)
      traced = dict(train=step.trace(state, batch),
                    forward=forward(model, on).trace(variables,
                                                     batch['image']))
      for kind, program in traced.items():
        if dtype == 'bfloat16':
          for platform in ('cuda', 'tpu'):
            result[kind, platform] = program.lower(
                lowering_platforms=(platform,)).as_text(dialect='hlo',
                                                        debug_info=True)
        elif on is None:
          # XLA's count for the unpartitioned program, after the same
          # optimisations as the partitioned one: a fused producer counts
          # once per fusion that reads it, whole-size even where the fusion
          # slices it (the CPU dep_conv's blocks read the head-map FC so),
          # so the counts before and after fusion differ.
          result[kind, 'one device flops'] = program.lower().compile(
              ).cost_analysis()['flops']
          result['update flops'] = update_flops(state)
        else:
          compiled = program.lower().compile()
          result[kind] = compiled.as_text()
          result[kind, 'flops'] = compiled.cost_analysis()['flops']
  result.update(params=size_of(state.params),
                batch_stats=size_of(state.batch_stats),
                macs=summary.count_macs(model, variables,
                                        (BATCH, size, size, 3))[0]['total'])
  return result


# ---------------------------------------------------------------------------
# Compiled for the 8 CPU devices.


# Gradients of batch-independent intermediates that XLA sums over the
# devices before folding them into their parameters, as a fraction of the
# parameters: ACmix-ResNet's positional maps (``conv_p`` of the coordinate
# grid, an H x W x d map per module) and ACmix-Swin's relative-position
# biases expanded to heads x 49 x 49 per block (1.4 % at full size). They do
# not grow with the batch.
POSITIONAL = {'acmix_resnet50': 0.01, 'acmix_swin_t': 0.15}


def test_train_step_moves_only_gradients_and_statistics(programs):
  """All-reduces only: of every gradient (summed over the devices once), of
  BatchNorm's batch mean and variance and their gradients (SyncBN), and of a
  few metrics. Pairing images across devices (Mixup) or gathering
  activations would add all-gathers, all-to-alls or permutes."""
  moved = hlo.collectives(programs['train'])
  assert {kind for kind, _ in moved} == {'all-reduce'}, moved
  total = sum(size for _, size in moved)
  params = programs['params']
  assert params <= total <= (
      params * (1 + POSITIONAL.get(programs['name'], 0))
      + 2 * programs['batch_stats'] + 64), (
          total, params, programs['batch_stats'])


def test_forward_moves_nothing(programs):
  """Evaluation uses BatchNorm's running statistics: no collective at all."""
  assert hlo.collectives(programs['forward']) == []


@pytest.mark.parametrize('kind', ['train', 'forward'])
def test_each_device_does_an_eighth_of_the_work(programs, kind):
  """An eighth of the model's work; the train step's per-parameter update
  is the same on every device (``update_flops``)."""
  per_device = programs[kind, 'flops']
  whole = programs[kind, 'one device flops']
  repeated = programs['update flops'] if kind == 'train' else 0.0
  assert 8 * per_device - 7 * repeated == pytest.approx(whole, rel=0.1), (
      per_device, repeated, whole)


def test_loops_run_over_each_devices_examples(programs):
  trips = set(hlo.trip_counts(programs['train']))
  assert trips == LOOPS[programs['name']], trips


# ---------------------------------------------------------------------------
# Lowered for GPU and TPU from this CPU.


PLATFORMS = pytest.mark.parametrize('platform', ['cuda', 'tpu'])


def program_macs(text):
  return hlo.macs(text, elementwise_scope=kernels.ELEMENTWISE_MACS_SCOPE,
                  uncounted_scope=layers.UNCOUNTED_MACS_SCOPE)


@PLATFORMS
def test_lowered_programs_do_the_summarys_macs(programs, platform):
  """The standard forms only (no CPU trick that does more MACs): the forward
  exactly ``count_macs``; the train step three products per MAC (forward,
  input gradient, weight gradient), less the input gradient of the stem's
  convolution of the images, which nothing needs."""
  forward = program_macs(programs['forward', platform])
  assert forward['total'] == programs['macs']
  train = program_macs(programs['train', platform])['total']
  assert train == pytest.approx(
      3 * programs['macs'] - forward['of the images'], rel=0.02)


@PLATFORMS
def test_lowered_train_step_has_no_loop_or_branch(programs, platform):
  """A while loop or a conditional makes a GPU read its predicate back to
  the host, stalling the queue of launches: none in the step (the
  non-finite guard selects, Mixup's numbers come from the host)."""
  ops = collections.Counter(re.findall(r'= .+? ([a-z][\w-]*)\(',
                                       programs['train', platform]))
  assert ops['while'] == 0 and ops['conditional'] == 0, ops


@PLATFORMS
def test_float32_products_run_at_full_precision(programs, platform):
  """In a bfloat16 model every product of two float32 operands is one the
  README promises in float32 (GLNet's slot logits and initial slots, forward
  and backward), and runs at HIGHEST precision: not TF32 on a GPU, not bf16
  passes on a TPU."""
  text = programs['train', platform]
  shapes = dict(re.findall(r'^\s*(?:ROOT )?(\S+) = (\S+) ', text, re.M))
  float32 = collections.Counter()
  for line in text.splitlines():
    match = re.search(r' dot\(([^,]+), ([^)]+)\)', line)
    if not match:
      continue
    if all(shapes[o.strip()].startswith('f32') for o in match.groups()):
      float32['highest' if 'operand_precision={highest,highest}' in line
              else 'default'] += 1
  assert float32['default'] == 0, float32
  if programs['name'].startswith('glnet'):
    assert float32['highest'] > 0
