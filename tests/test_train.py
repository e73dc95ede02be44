"""Training: sharded = single-device steps, exact resume after SIGKILL, clean
SIGTERM preemption, the NaN guard, two processes = one, bad configs."""

import functools
import json
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from conftest import ROOT, subprocess_env, train_cmd
from configs import tiny
from glmix_jax import checkpoint, optim, sharding, train_lib


def run_train(workdir, *flags, config='configs/tiny.py', **env):
  return subprocess.run(train_cmd(workdir, *flags, config=config),
                        capture_output=True,
                        text=True, cwd=ROOT, env=subprocess_env(**env),
                        timeout=600, check=False)


def final_params(workdir):
  manager = checkpoint.train_manager(workdir, save_every=1, keep=1,
                                     keep_every=None)
  step = manager.latest_step()
  state = manager.restore(step, args=ocp.args.StandardRestore())
  return step, state['params'], state['ema_params']


def losses(workdir):
  lines = (workdir / 'metrics.jsonl').read_text().splitlines()
  return [(r['step'], r['loss']) for r in map(json.loads, lines) if 'loss' in r]


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


def test_sigkill_and_restart_ends_bitwise_equal(reference_run, tmp_path):
  data = f'--config.data.data_dir={reference_run / "data"}'
  process = subprocess.Popen(train_cmd(tmp_path, data), cwd=ROOT,
                             env=subprocess_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
  checkpoints = tmp_path / 'checkpoints'
  deadline = time.time() + 300
  while time.time() < deadline and not (checkpoints / '8').exists():
    time.sleep(0.05)
  process.kill()  # SIGKILL: no handler runs
  process.wait()
  assert (checkpoints / '8').exists() and not (checkpoints / '12').exists()
  done = run_train(tmp_path, data)
  assert done.returncode == 0, done.stderr[-3000:]
  step, params, ema = final_params(tmp_path)
  ref_step, ref_params, ref_ema = final_params(reference_run)
  assert step == ref_step == 12
  for tree, ref in ((params, ref_params), (ema, ref_ema)):
    jax.tree_util.tree_map(np.testing.assert_array_equal, tree, ref)


def test_sigterm_saves_the_current_step_and_exits_zero(reference_run,
                                                      tmp_path):
  process = subprocess.Popen(
      train_cmd(tmp_path, f'--config.data.data_dir={reference_run / "data"}',
                '--config.total_steps=100000', '--config.checkpoint_steps=1000'),
      cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True)
  for line in process.stdout:  # wait until it is really training
    if line.startswith('step 3/'):
      break
  process.send_signal(signal.SIGTERM)
  out, _ = process.communicate(timeout=300)
  assert process.returncode == 0, out[-3000:]
  assert 'Preempted (SIGTERM): saved step' in out
  saved = int(out.split('saved step ')[1].split(';')[0])
  listing = sorted(p.name for p in (tmp_path / 'checkpoints').iterdir())
  assert saved >= 3 and str(saved) in listing, (listing, out[-2000:])


def test_unrestorable_checkpoint_is_named_and_left_untouched(reference_run,
                                                            tmp_path):
  import shutil  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / 'run'
  shutil.copytree(reference_run / 'checkpoints', workdir / 'checkpoints')
  latest = max(int(p.name) for p in (workdir / 'checkpoints').iterdir()
               if p.name.isdigit())
  for path in (workdir / 'checkpoints' / str(latest)).rglob('*'):
    if path.is_file():
      path.write_bytes(b'corrupt')
  before = sorted((p.name, p.stat().st_size)
                  for p in (workdir / 'checkpoints').rglob('*'))
  done = run_train(workdir, f'--config.data.data_dir={reference_run / "data"}')
  assert done.returncode == 1
  assert f'Cannot restore the checkpoint {workdir}/checkpoints/{latest}' in (
      done.stderr)
  assert sorted((p.name, p.stat().st_size)
                for p in (workdir / 'checkpoints').rglob('*')) == before


def test_two_processes_give_the_losses_of_one(reference_run, tmp_path):
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  data = f'--config.data.data_dir={reference_run / "data"}'
  processes = [subprocess.Popen(
      train_cmd(tmp_path, data, '--config.total_steps=4'), cwd=ROOT,
      env=subprocess_env(JAX_NUM_CPU_DEVICES='4',
                         JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{port}',
                         JAX_NUM_PROCESSES='2', JAX_PROCESS_ID=str(k)),
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for k in range(2)]
  outs = [p.communicate(timeout=600)[0] for p in processes]
  for p, out in zip(processes, outs):
    assert p.returncode == 0, out[-3000:]
  assert 'process 1 of 2: 4 local of 8 devices' in outs[1]
  two = losses(tmp_path)
  one = losses(reference_run)[:4]
  assert [s for s, _ in two] == [1, 2, 3, 4]
  np.testing.assert_allclose([l for _, l in two], [l for _, l in one],
                             rtol=2e-5)


@pytest.mark.parametrize('config,flag,message', [
    ('tiny', '--config.model_name=glnet_xxl', "Unknown model 'glnet_xxl'"),
    ('tiny', '--config.global_batch_size=12', 'not divisible by the 8 devices'),
    ('glnet_stl', f'--config.data.data_dir={ROOT}/nonexistent',
     'imagenet2012 is not prepared'),
    ('tiny', '--config.no_such_field=1', 'no_such_field'),
    ('tiny', '--config.model_name=glnet_4g_tklb', 'is a token-labeling model'),
])
def test_bad_config_is_one_clear_line(tmp_path, config, flag, message):
  done = run_train(tmp_path / 'run', flag, config=f'configs/{config}.py')
  assert done.returncode != 0
  assert message in done.stderr
  assert 'Traceback' not in done.stderr


# ---------------------------------------------------------------------------
# In-process: the step function itself.


def tiny_setup(batch=16, optimizer='adamw', accum_steps=1):
  config = tiny.get_config()
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
  step = jax.jit(functools.partial(
      train_lib.train_step, model=model, tx=tx, schedule=schedule,
      mix_config=train_lib.ml_collections.FrozenConfigDict(
          train_lib._mix_fields(config)),
      num_classes=4, seed=0, ema_decay=0.9, accum_steps=accum_steps))
  state = train_lib.init_state(model, tx, shape, 0, True)
  rng = np.random.default_rng(0)
  batches = [dict(image=rng.normal(size=(batch, 32, 32, 3)).astype(np.float32),
                  label=rng.integers(0, 4, batch)) for _ in range(2)]
  return state, step, batches


def test_sharded_step_equals_single_device_step():
  state, step, batches = tiny_setup(optimizer='sgd')
  mesh = sharding.make_mesh()
  replicated = NamedSharding(mesh, PartitionSpec())
  sharded = jax.device_put(state, replicated)
  single = jax.device_put(state, jax.devices()[0])
  for batch in batches:
    sharded, m8 = step(sharded, sharding.global_batch(batch, mesh))
    single, m1 = step(single, jax.device_put(batch, jax.devices()[0]))
    np.testing.assert_allclose(m8['loss'], m1['loss'], rtol=1e-5)
  assert len(sharded.params['head']['kernel'].sharding.device_set) == 8
  jax.tree_util.tree_map(
      functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-6),
      (sharded.params, sharded.batch_stats), (single.params, single.batch_stats))


def test_fsdp_shards_the_state_and_computes_the_same_step():
  state, step, batches = tiny_setup(optimizer='sgd')
  mesh = sharding.make_mesh()
  fsdp = train_lib.state_shardings(state, mesh, fsdp=True)
  replicated = train_lib.state_shardings(state, mesh, fsdp=False)
  assert fsdp.params['head']['kernel'].spec == PartitionSpec('data', None)
  assert fsdp.params['head']['bias'].spec == PartitionSpec()  # 4 classes
  assert replicated.params['head']['kernel'].spec == PartitionSpec()
  a = jax.device_put(state, fsdp)
  b = jax.device_put(state, replicated)
  for batch in batches:
    a, _ = step(a, sharding.global_batch(batch, mesh))
    b, _ = step(b, sharding.global_batch(batch, mesh))
  jax.tree_util.tree_map(
      functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-7),
      a.params, b.params)


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


def test_non_finite_batch_is_skipped_and_reported():
  state, step, batches = tiny_setup()
  bad = dict(batches[0], image=batches[0]['image'].copy())
  bad['image'][3, 5, 5, 0] = np.nan
  after, metrics = step(state, bad)
  assert not bool(metrics['finite'])
  assert int(after.step) == 1 and int(after.bad_steps) == 1
  jax.tree_util.tree_map(np.testing.assert_array_equal,
                         (after.params, after.batch_stats, after.opt_state),
                         (state.params, state.batch_stats, state.opt_state))
  with pytest.raises(train_lib.NonFiniteError, match='at step 7'):
    train_lib._check_finite(7, metrics, after.bad_steps, max_bad=0)
  train_lib._check_finite(7, metrics, after.bad_steps, max_bad=1)  # tolerated
