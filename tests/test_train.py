"""Training: sharded = single-device steps, the NaN guard's step, bad
configs. Two processes = one, and faults mid-run (signals, damaged
checkpoints, a full disk), are in test_faults.py."""

import functools
import json
import subprocess
import sys
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

import hlo
from conftest import ROOT, subprocess_env, train_cmd
from configs import tiny
from glmix_jax import checkpoint, metrics, models, optim, sharding, train_lib
from glmix_jax.data import mix


def run_train(workdir, *flags, config='configs/tiny.py', **env):
  return subprocess.run(train_cmd(workdir, *flags, config=config),
                        capture_output=True,
                        text=True, cwd=ROOT, env=subprocess_env(**env),
                        timeout=600, check=False)


@pytest.fixture(name='reference_run')
def _reference_run(tiny_run):
  """An uninterrupted tiny run, and the dataset the other runs share."""
  return tiny_run


def _tiny_lr(t):
  """configs/tiny.py's learning rate at update t: peak 2e-3 x 16 / 64, a
  linear warm-up over 1 epoch (86 // 16 = 5 steps), a cosine to 1e-5 over
  the other 7 of 12 steps."""
  peak = 2e-3 * 16 / 64
  if t < 5:
    return peak * t / 5
  return 1e-5 + (peak - 1e-5) * 0.5 * (1 + np.cos(np.pi * (t - 5) / 7))


def test_tiny_run_trains_logs_and_evaluates(reference_run):
  records = [json.loads(l) for l in
             (reference_run / 'metrics.jsonl').read_text().splitlines()]
  steps = [r for r in records if 'loss' in r]
  assert [r['step'] for r in steps] == list(range(1, 13))
  # Each record: the lr its update used (update step - 1), finite figures.
  np.testing.assert_allclose([r['lr'] for r in steps],
                             [_tiny_lr(t) for t in range(12)], rtol=1e-5,
                             atol=1e-12)
  assert all(np.isfinite(r['loss']) and np.isfinite(r['grad_norm']) and
             r['bad_steps'] == 0 for r in steps)
  final = records[-1]
  assert final['val_count'] == final['ema_val_count'] == 10  # 10 % of 96
  saved = json.loads((reference_run / 'config.json').read_text())
  assert (saved['model_name'], saved['global_batch_size']) == ('glnet_stl',
                                                               16)
  # Every 4 steps, the last 3 kept.
  assert checkpoint.saved_steps(reference_run) == [4, 8, 12]
  # Every report but the first (which includes compiling).
  waits = [r['input_wait'] for r in records[1:] if 'loss' in r]
  assert len(waits) == 11 and all(0 <= w < 1 for w in waits)


def _timed_loop(input_seconds, step_seconds, steps=12):
  """``steps`` of a loop that waits ``input_seconds`` for each batch and
  computes ``step_seconds``; the input-wait figure of its report."""
  def slow_batches():
    while True:
      time.sleep(input_seconds)
      yield {}
  inputs = metrics.TimedInput(slow_batches())
  progress = metrics.Progress(steps, 16, 0, inputs=inputs,
                              raise_input='--config.data.num_workers')
  progress.report(0)
  for _ in range(steps):
    next(inputs)
    time.sleep(step_seconds)
  return progress.report(steps)['input_wait'], progress


def test_input_wait_is_the_share_of_time_spent_waiting_for_batches():
  wait, progress = _timed_loop(0.03, 0.03)
  assert 0.35 < wait < 0.65
  warning = progress.input_warning()
  assert 'input-bound' in warning and '--config.data.num_workers' in warning
  assert '\n' not in warning
  assert progress.input_warning() is None  # said once
  assert metrics.progress_line(12, 12, {'input_wait': wait}).endswith(
      f'input wait {wait:.0%}')
  wait, progress = _timed_loop(0.0, 0.03)
  assert wait < 0.05 and progress.input_warning() is None


def test_eval_reproduces_the_final_evaluation_of_training(reference_run):
  done = subprocess.run(
      [sys.executable, str(ROOT / 'eval.py'), '--config=configs/tiny.py',
       f'--workdir={reference_run}'], capture_output=True, text=True,
      cwd=ROOT, env=subprocess_env(), timeout=600, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  final = json.loads((reference_run / 'metrics.jsonl').read_text()
                     .splitlines()[-1])
  line = done.stdout.strip().splitlines()[-1]
  assert '(step 12)' in line
  for key in ('val_top1', 'val_count', 'ema_val_top1', 'ema_val_loss'):
    value = float(line.split(f' {key} ')[1].split()[0])
    assert value == pytest.approx(final[key], abs=1e-4)


@pytest.mark.parametrize('config,flag,message', [
    ('tiny', '--config.model_name=glnet_xxl', "Unknown model 'glnet_xxl'"),
    ('tiny', '--config.global_batch_size=12', 'not divisible by the 8 devices'),
    ('glnet_stl', f'--config.data.data_dir={ROOT}/nonexistent',
     'imagenet2012 is not prepared'),
    ('tiny', '--config.no_such_field=1', 'no_such_field'),
    ('tiny', '--config.modle=x',
     "no such config field: 'modle' Did you mean \"model\" instead"),
    ('tiny', '--config.model_name=glnet_4g_tklb', 'is a token-labeling model'),
    ('glnet.py:variant=5g', None, "Unknown GLNet variant '5g'; known: stl"),
    ('tiny', f'--config.init_from={ROOT}/nonexistent',
     'is neither a train.py workdir with a checkpoint nor a model checkpoint'),
    ('glnet.py:varient=stl', None,
     "Unknown config argument 'varient'; known: runlocal, variant."),
])
def test_bad_config_is_one_clear_line(tmp_path, config, flag, message):
  if ':' not in config:
    config += '.py'
  done = run_train(tmp_path / 'run', *[flag] * bool(flag),
                   config=f'configs/{config}')
  assert done.returncode != 0
  assert 'Traceback' not in done.stderr
  (line,) = [l for l in done.stderr.splitlines() if l.startswith('error:')]
  assert message in line


# ---------------------------------------------------------------------------
# In-process: the step function itself.


# Small enough that the tiny model's weights (its kernels: biases and norm
# scales have at most 128 elements) are split under FSDP.
FSDP_MIN_SIZE = 256


def tiny_setup(batch=16, optimizer='adamw', mesh=None, dtype='float32'):
  config = tiny.get_config()
  config.model.dtype = dtype
  if optimizer == 'sgd':  # Adam would amplify rounding in near-zero gradients
    config.optimizer.update(name='sgd', momentum=0.9, weight_decay_rule='all')
  model = models.from_config(config)
  schedule = optim.warmup_cosine(1e-3, total=10, warmup=0)
  shape = (1, 32, 32, 3)
  params = jax.eval_shape(functools.partial(
      train_lib.init_variables, model, shape, 0))['params']
  tx = optim.make_optimizer(config.optimizer, schedule, params)
  config.ema_decay = 0.9
  state = train_lib.init_state(model, tx, shape, 0, True)
  step = train_lib.make_train_step(
      config, model, tx, schedule, mesh=mesh,
      shardings=None if mesh is None else sharding.state_shardings(
          state, mesh, min_size=FSDP_MIN_SIZE), donate=False)
  rng = np.random.default_rng(0)
  settings = mix.MixSettings.from_config(config.augmentation)
  batches = [dict(image=rng.integers(0, 256, (batch, 32, 32, 3), np.uint8),
                  label=rng.integers(0, 4, batch),
                  **mix.draw(settings, seed=0, step=i, batch=batch, height=32,
                             width=32)) for i in range(2)]
  return state, step, batches


def test_sharded_step_equals_single_device_step():
  mesh = sharding.make_mesh()
  state, step, batches = tiny_setup(optimizer='sgd')
  _, sharded_step, _ = tiny_setup(optimizer='sgd', mesh=mesh)
  replicated = NamedSharding(mesh, PartitionSpec())
  sharded = jax.device_put(state, replicated)
  single = jax.device_put(state, jax.devices()[0])
  for batch in batches:
    sharded, m8 = sharded_step(sharded, sharding.global_batch(batch, mesh))
    single, m1 = step(single, jax.device_put(batch, jax.devices()[0]))
    np.testing.assert_allclose(m8['loss'], m1['loss'], rtol=1e-5)
  assert len(sharded.params['head']['kernel'].sharding.device_set) == 8
  jax.tree_util.tree_map(
      functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-6),
      (sharded.params, sharded.batch_stats), (single.params, single.batch_stats))


def test_fsdp_on_a_2d_mesh_computes_the_data_parallel_step():
  """(data 2, fsdp 4): large arrays split 4 ways, small ones replicated; the
  losses and parameters of pure data parallelism to 1e-6."""
  fsdp_mesh = sharding.make_mesh((2, 4))
  dp_mesh = sharding.make_mesh()
  state, dp_step, batches = tiny_setup(optimizer='sgd', mesh=dp_mesh)
  _, fsdp_step, _ = tiny_setup(optimizer='sgd', mesh=fsdp_mesh)
  where = sharding.state_shardings(state, fsdp_mesh,
                                   min_size=FSDP_MIN_SIZE)
  for x, at in zip(jax.tree_util.tree_leaves(state),
                   jax.tree_util.tree_leaves(where)):
    split = 'fsdp' in at.spec
    assert split == (x.size >= FSDP_MIN_SIZE), (x.shape, at.spec)
  assert all(s.spec == PartitionSpec() for s in jax.tree_util.tree_leaves(
      sharding.state_shardings(state, dp_mesh, min_size=FSDP_MIN_SIZE)))
  a = jax.device_put(state, where)
  b = jax.device_put(state, NamedSharding(dp_mesh, PartitionSpec()))
  for batch in batches:
    a, loss_a = fsdp_step(a, sharding.global_batch(batch, fsdp_mesh))
    b, loss_b = dp_step(b, sharding.global_batch(batch, dp_mesh))
    np.testing.assert_allclose(loss_a['loss'], loss_b['loss'], rtol=1e-6)
  jax.tree_util.tree_map(
      functools.partial(np.testing.assert_allclose, rtol=1e-6, atol=1e-7),
      a.params, b.params)


def test_fsdp_gathers_parameters_within_groups_in_the_compute_dtype(
    tmp_path):
  """With (data 2, fsdp 4) a bfloat16 model's weights are gathered over the
  4 devices of an FSDP group (never across the data axis), in bfloat16,
  half the bytes of the float32 master weights; no activation moves."""
  mesh = sharding.make_mesh((2, 4))
  state, step, batches = tiny_setup(mesh=mesh, dtype='bfloat16')
  where = sharding.state_shardings(state, mesh, min_size=FSDP_MIN_SIZE)
  text = hlo.partitioned(step.lower(jax.device_put(state, where),
                                    sharding.global_batch(batches[0], mesh)),
                         tmp_path)
  assert {kind for kind, _ in hlo.collectives(text)} == {'all-gather',
                                                          'all-reduce'}
  gathers = hlo.collective_lines(text, 'all-gather')
  assert len(gathers) >= 20  # the tiny model's split kernels
  for line in gathers:
    groups = sorted(sorted(g) for g in hlo.replica_groups(line, mesh))
    assert groups == [[0, 1, 2, 3], [4, 5, 6, 7]], line
    assert hlo.shape_of(line).startswith('bf16'), line


class _PerExample(nn.Module):
  """A model whose train-mode logits for an image depend on that image alone:
  no BatchNorm (whose statistics are those of each forward pass's batch) and
  no dropout or drop path (whose keys differ per forward pass)."""
  num_classes: int = 4
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images, train=False):
    del train
    x = nn.gelu(nn.Conv(8, (3, 3), strides=(2, 2), name='stem')(images))
    return nn.Dense(self.num_classes, name='head')(x.mean(axis=(1, 2)))


def _recipe_step(config, model, accum_steps):
  """The training loop's schedule and optimizer (``recipe_optimizer``: a
  warm-up-free cosine over 4 updates, the config's optimizer, wrapped in
  ``optax.MultiSteps`` when accumulating), state and jitted step, for
  ``accum_steps`` passes per update of ``config.global_batch_size``
  images."""
  plan = train_lib._Plan(  # pylint: disable=protected-access
      total_steps=4, warmup_steps=0, steps_per_epoch=4,
      accum_steps=accum_steps,
      pass_batch=config.global_batch_size // accum_steps)
  shape = (1, 16, 16, 3)
  params = jax.eval_shape(functools.partial(
      train_lib.init_variables, model, shape, 0))['params']
  schedule, tx = train_lib.recipe_optimizer(config, plan, params)
  state = train_lib.init_state(model, tx, shape, 0, True)
  step = train_lib.make_train_step(config, model, tx, schedule,
                                   accum_steps=accum_steps, donate=False)
  return schedule, state, step


@pytest.mark.parametrize('optimizer', ['adamw', 'sgd'])
def test_k_accumulated_passes_are_one_step_on_their_concatenated_batch(
    optimizer):
  """grad_accum_steps=4 over 4 micro-batches of 4 is one step of the full
  batch of 16: the parameters, EMA and optimizer state after each update
  equal (to 1e-5, float32) those of accum 1 on the 4 micro-batches
  concatenated, for 2 updates (the schedule's step 0, then step 1); the
  micro-steps in between change neither parameters, EMA nor the optimizer's
  moments. AdamW (the recipe's) with clipping active: the mean gradient is
  clipped, not each pass's; AdamW and clipping are blind to the gradient's
  scale, so SGD with momentum and no clipping checks that it is the mean of
  the k gradients, not their sum.

  Exact in the math only where a forward pass's per-example losses do not
  depend on the rest of its batch, so: a model without BatchNorm (its
  statistics, and so its gradients, are per micro-batch; its running
  averages take one momentum step per pass) and without dropout / drop path
  (keys per pass), Mixup / CutMix off (they mix labels within a group, and
  draw per pass), no random erasing (keys per pass); label smoothing is per
  example and stays on.
  """
  k, micro = 4, 4
  config = tiny.get_config()
  config.augmentation.update(mixup_alpha=0.0, cutmix_alpha=0.0)
  config.update(global_batch_size=k * micro, grad_accum_steps=k,
                ema_decay=0.9)
  if optimizer == 'sgd':
    config.optimizer.update(name='sgd', momentum=0.9, weight_decay=1e-4,
                            weight_decay_rule='all', grad_clip_norm=0.0,
                            lr=0.1)
  else:
    config.optimizer.grad_clip_norm = 0.05  # below every step's norm
  model = _PerExample()
  schedule, accum_state, accum_step = _recipe_step(config, model, k)
  _, full_state, full_step = _recipe_step(config, model, 1)
  rng = np.random.default_rng(0)
  close = functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-8)
  for update in range(2):
    full_batch = dict(
        image=rng.integers(0, 256, (k * micro, 16, 16, 3), np.uint8),
        label=rng.integers(0, 4, k * micro))
    before = accum_state
    losses = []
    for i in range(k):
      accum_state, m = accum_step(accum_state, jax.tree_util.tree_map(
          lambda x, i=i: x[i * micro:(i + 1) * micro], full_batch))
      losses.append(float(m['loss']))
      np.testing.assert_allclose(m['lr'], schedule(update), rtol=1e-6)
      assert int(accum_state.step) == update * k + i + 1
      if i < k - 1:  # accumulated only
        jax.tree_util.tree_map(
            np.testing.assert_array_equal,
            (accum_state.params, accum_state.ema_params,
             accum_state.opt_state.inner_opt_state),
            (before.params, before.ema_params,
             before.opt_state.inner_opt_state))
    full_state, m = full_step(full_state, full_batch)
    if optimizer == 'adamw':  # clipping is active
      assert float(m['grad_norm']) > config.optimizer.grad_clip_norm
    np.testing.assert_allclose(np.mean(losses), m['loss'], rtol=1e-5)
    assert int(accum_state.opt_state.gradient_step) == update + 1
    assert not np.allclose(accum_state.params['head']['kernel'],
                           before.params['head']['kernel'])
    jax.tree_util.tree_map(
        close, (accum_state.params, accum_state.ema_params,
                accum_state.opt_state.inner_opt_state),
        (full_state.params, full_state.ema_params, full_state.opt_state))
  peak = config.optimizer.lr * 16 / 64  # the linear scaling rule
  np.testing.assert_allclose(schedule(1), 1e-5 + (peak - 1e-5) * 0.5 * (
      1 + np.cos(np.pi / 4)), rtol=1e-6)  # cosine step 1 of 4


def test_non_finite_step_is_skipped_and_reported():
  state, step, batches = tiny_setup()
  # uint8 pixels cannot be NaN; a diverged weight makes the loss NaN.
  head = dict(state.params['head'],
              bias=state.params['head']['bias'].at[1].set(np.nan))
  state = state.replace(params=dict(state.params, head=head))
  after, metrics = step(state, batches[0])
  assert not bool(metrics['finite'])
  assert int(after.step) == 1 and int(after.bad_steps) == 1
  jax.tree_util.tree_map(np.testing.assert_array_equal,
                         (after.params, after.batch_stats, after.opt_state),
                         (state.params, state.batch_stats, state.opt_state))
  assert int(metrics['bad_steps']) == 1
  with pytest.raises(train_lib.NonFiniteError, match='at step 7'):
    train_lib._check_finite(7, metrics, max_bad=0, last_checkpoint=4)
  train_lib._check_finite(7, metrics, max_bad=1, last_checkpoint=4)
