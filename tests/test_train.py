"""Training: sharded = single-device steps, the NaN guard's step, bad
configs. Two processes = one, and faults mid-run (signals, damaged
checkpoints, a full disk), are in test_faults.py."""

import functools
import json
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec

import hlo
from conftest import ROOT, subprocess_env, train_cmd
from configs import tiny
from glmix_jax import metrics, optim, sharding, train_lib
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


def test_tiny_run_trains_logs_and_evaluates(reference_run):
  records = [json.loads(l) for l in
             (reference_run / 'metrics.jsonl').read_text().splitlines()]
  assert [r['step'] for r in records if 'loss' in r] == list(range(1, 13))
  final = records[-1]
  assert final['eval_count'] == final['ema_eval_count'] == 10  # 10 % of 96
  assert (reference_run / 'config.json').exists()
  assert list((reference_run / 'checkpoints').iterdir())
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
  for key in ('eval_top1', 'eval_count', 'ema_eval_top1', 'ema_eval_loss'):
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
])
def test_bad_config_is_one_clear_line(tmp_path, config, flag, message):
  done = run_train(tmp_path / 'run', flag, config=f'configs/{config}.py')
  assert done.returncode != 0
  assert 'Traceback' not in done.stderr
  (line,) = [l for l in done.stderr.splitlines() if l.startswith('error:')]
  assert message in line


# ---------------------------------------------------------------------------
# In-process: the step function itself.


# Small enough that the tiny model's weights (its kernels: biases and norm
# scales have at most 128 elements) are split under FSDP.
FSDP_MIN_SIZE = 256


def tiny_setup(batch=16, optimizer='adamw', accum_steps=1, mesh=None,
               dtype='float32'):
  config = tiny.get_config()
  config.model.dtype = dtype
  if optimizer == 'sgd':  # Adam would amplify rounding in near-zero gradients
    config.optimizer.update(name='sgd', momentum=0.9, weight_decay_rule='all')
  model = train_lib.build_model(config)
  schedule = optim.warmup_cosine(1e-3, total=10, warmup=0)
  shape = (1, 32, 32, 3)
  params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                             jnp.zeros(shape)))['params']
  tx = optim.make_optimizer(config.optimizer, schedule, params)
  if accum_steps > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=accum_steps)
  config.ema_decay = 0.9
  state = train_lib.init_state(model, tx, shape, 0, True)
  step = train_lib.make_train_step(
      config, model, tx, schedule, accum_steps=accum_steps, mesh=mesh,
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


def test_gradient_accumulation_updates_every_k_passes():
  state, step, batches = tiny_setup(accum_steps=2)
  first, _ = step(state, batches[0])
  jax.tree_util.tree_map(np.testing.assert_array_equal,
                         (first.params, first.ema_params),
                         (state.params, state.ema_params))
  second, metrics = step(first, batches[1])
  assert int(second.step) == 2
  assert not np.allclose(second.params['head']['kernel'],
                         state.params['head']['kernel'])
  assert not np.allclose(second.ema_params['head']['kernel'],
                         state.ema_params['head']['kernel'])
  np.testing.assert_allclose(metrics["lr"], 1e-3)  # update 0 of the schedule


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
