"""Training and evaluation: the train state, jitted steps, and the loop.

``train_step`` and ``eval_step`` are pure functions of (state, batch); the
loop (``train_and_evaluate``) only wires the config, the data, the mesh,
checkpoints and metrics around them.

Parallelism: one ``jax.jit`` over a 1-D ``'data'`` mesh of all devices of all
processes; batches are sharded over it, the state is replicated. BatchNorm
statistics are therefore those of the global batch (SyncBN), unlike the
per-GPU BN of the official DDP runs (GLNet uses BN only in the stem, the
transitions and the final norm).

Exact resume: the data stream is a pure function of (seed, step) and every
random number of a step comes from ``fold_in(seed, step)``; the checkpoint
holds the full state including the step, so a run killed at any point and
restarted from its last checkpoint ends bitwise where an uninterrupted run
ends.
"""

from __future__ import annotations

import functools
import signal
import time
from typing import Any, Callable, NamedTuple

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec

from glmix_jax import checkpoint, metrics, models, optim, sharding
from glmix_jax.data import input as data_input
from glmix_jax.data import mix, pipeline
from glmix_jax.models import summary


@flax.struct.dataclass
class TrainState:
  """Everything a step changes. ``step`` counts batches consumed, which is
  also the data position; ``bad_steps`` counts skipped non-finite updates."""
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  ema_params: Any  # None when EMA is off
  bad_steps: jax.Array


def init_state(model, tx: optax.GradientTransformation, image_shape,
               seed: int, use_ema: bool) -> TrainState:
  variables = model.init(jax.random.PRNGKey(seed), jnp.zeros(image_shape),
                         train=False)
  params = variables['params']
  return TrainState(
      step=jnp.zeros((), jnp.int32), params=params,
      batch_stats=variables.get('batch_stats', {}), opt_state=tx.init(params),
      ema_params=params if use_ema else None,
      bad_steps=jnp.zeros((), jnp.int32))


def train_step(state: TrainState, batch: dict[str, jax.Array], *, model,
               tx: optax.GradientTransformation, schedule: optim.Schedule,
               mix_config: ml_collections.FrozenConfigDict, num_classes: int,
               seed: int, ema_decay: float,
               accum_steps: int = 1) -> tuple[TrainState, dict]:
  """One step on a global (micro-)batch; skips the update if non-finite.

  With ``accum_steps`` > 1, ``tx`` is an ``optax.MultiSteps``: parameters and
  EMA change on every ``accum_steps``-th call, with the mean gradient.
  """
  rng = jax.random.fold_in(jax.random.PRNGKey(seed), state.step)
  mix_rng, dropout_rng = jax.random.split(rng)
  if mix_config.mixup_alpha or mix_config.cutmix_alpha:
    images, targets = mix.mix_batch(
        mix_rng, batch['image'], batch['label'], num_classes=num_classes,
        **mix_config)
  else:
    images = batch['image']
    targets = mix.smooth_targets(batch['label'], num_classes,
                                 mix_config.label_smoothing)

  def loss_fn(params):
    logits, updates = model.apply(
        {'params': params, 'batch_stats': state.batch_stats}, images,
        train=True, mutable=['batch_stats'], rngs={'dropout': dropout_rng})
    loss = optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)
    return loss.mean(), (logits, updates['batch_stats'])

  (loss, (logits, batch_stats)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema = state.ema_params
  if ema is not None:
    updated = (tx.has_updated(opt_state) if accum_steps > 1
               else True)
    ema = jax.tree_util.tree_map(
        lambda e, p: jnp.where(updated, ema_decay * e + (1 - ema_decay) * p, e),
        ema, params)
  grad_norm = optax.global_norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  new = TrainState(step=state.step + 1, params=params, batch_stats=batch_stats,
                   opt_state=opt_state, ema_params=ema,
                   bad_steps=state.bad_steps)
  # A non-finite step changes nothing but the data position.
  kept = state.replace(step=state.step + 1, bad_steps=state.bad_steps + 1)
  new = jax.tree_util.tree_map(lambda a, b: jnp.where(finite, a, b), new, kept)
  return new, dict(
      loss=loss, grad_norm=grad_norm, lr=schedule(state.step // accum_steps),
      param_norm=optax.global_norm(params), finite=finite,
      accuracy=jnp.mean(jnp.argmax(logits, -1) == jnp.argmax(targets, -1)))


def eval_step(params, batch_stats, batch: dict[str, jax.Array], *,
              model) -> dict[str, jax.Array]:
  """Masked sums over a padded batch: top-1/top-5 hits, loss and count."""
  logits = model.apply({'params': params, 'batch_stats': batch_stats},
                       batch['image'], train=False).astype(jnp.float32)
  labels, mask = batch['label'], batch['mask'].astype(jnp.float32)
  top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  return dict(
      top1=jnp.sum(mask * (top5[:, 0] == labels)),
      top5=jnp.sum(mask * jnp.any(top5 == labels[:, None], axis=-1)),
      loss=jnp.sum(mask * loss), count=jnp.sum(mask))


def evaluate(eval_fn: Callable, params, batch_stats, batches, mesh
             ) -> dict[str, float]:
  """Top-1 / top-5 / loss over every example of the split, exactly once."""
  totals = None
  for batch in sharding.device_batches(batches, mesh):
    sums = eval_fn(params, batch_stats, batch)
    totals = sums if totals is None else jax.tree_util.tree_map(
        jnp.add, totals, sums)
  totals = jax.device_get(totals)
  count = float(totals['count'])
  return dict(top1=float(totals['top1']) / count,
              top5=float(totals['top5']) / count,
              loss=float(totals['loss']) / count, count=count)


def evaluate_weights(eval_fn: Callable, weights: dict[str, Any], batch_stats,
                     make_batches: Callable[[], Any], mesh) -> dict[str, float]:
  """``evaluate`` for each named set of parameters (e.g. ``{'': raw,
  'ema_': ema}``), as flat ``'<name>eval_<metric>'`` scores."""
  results = {}
  for prefix, params in weights.items():
    scores = evaluate(eval_fn, params, batch_stats, make_batches(), mesh)
    results.update({f'{prefix}eval_{k}': v for k, v in scores.items()})
  return results


# ---------------------------------------------------------------------------
# The loop.


class NonFiniteError(RuntimeError):
  """Training produced too many non-finite losses or gradients."""


class _Plan(NamedTuple):
  total_steps: int
  warmup_steps: int
  steps_per_epoch: int


def _plan(config, num_records: int, global_batch: int) -> _Plan:
  """Optimizer steps: total, warm-up, per epoch."""
  steps_per_epoch = max(num_records // global_batch, 1)
  if config.get('total_steps'):
    total = config.total_steps
  else:
    total = optim.steps_for(config.total_epochs, num_records, global_batch)
  return _Plan(total_steps=total, steps_per_epoch=steps_per_epoch,
               warmup_steps=round(config.warmup_epochs * steps_per_epoch))


def state_shardings(abstract_state: Any, mesh, fsdp: bool) -> Any:
  """Replicated state, or (``fsdp``) every array split over ``'data'`` along
  its largest axis divisible by the device count (ZeRO-3 style: parameters,
  optimizer state and EMA each live once across the devices; XLA gathers
  them where a layer needs them)."""
  devices = mesh.size
  replicated = NamedSharding(mesh, PartitionSpec())

  def spec(x):
    for axis in sorted(range(x.ndim), key=lambda a: -x.shape[a]):
      if x.shape[axis] % devices == 0 and x.shape[axis] >= devices:
        parts = [None] * x.ndim
        parts[axis] = sharding.DATA_AXIS
        return NamedSharding(mesh, PartitionSpec(*parts))
    return replicated

  if not fsdp:
    return jax.tree_util.tree_map(lambda x: replicated, abstract_state)

  return jax.tree_util.tree_map(spec, abstract_state)


def build_model(config: ml_collections.ConfigDict):
  return models.build(config.model_name, num_classes=config.data.num_classes,
                      **config.model.to_dict())


class _Preemption:
  """Remembers a SIGTERM so the loop can save and exit cleanly."""

  def __init__(self):
    self.requested = False
    signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, *,
    on_metrics: Callable[[int, dict[str, float]], None] | None = None,
) -> dict[str, float]:
  """Trains ``config`` in ``workdir`` (resuming from its latest checkpoint)
  and returns the final evaluation metrics.

  ``on_metrics(step, scalars)`` receives everything written to the metrics
  file as it is written: the training scalars every ``log_steps`` and each
  evaluation.
  """
  workdir = epath.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  mesh = sharding.make_mesh()
  accum = config.grad_accum_steps
  if config.global_batch_size % accum:
    raise ValueError(f'global_batch_size={config.global_batch_size} is not '
                     f'divisible by grad_accum_steps={accum}.')
  global_batch = config.global_batch_size // accum  # per forward pass
  pipeline.check_batch_size(global_batch, jax.process_count(),
                            jax.local_device_count())
  model = build_model(config)
  data_dir = data_input.data_dir(config, str(workdir))
  train_source = pipeline.open_split(config.data.dataset,
                                     config.data.train_split, data_dir)
  eval_source = pipeline.open_split(config.data.dataset,
                                    config.data.eval_split, data_dir)
  plan = _plan(config, len(train_source), config.global_batch_size)
  opt = config.optimizer
  # The recipe's linear scaling rule, on the batch of one optimizer step.
  peak = opt.lr * config.global_batch_size / opt.lr_batch_size
  schedule = optim.make_schedule(opt, peak, total_steps=plan.total_steps,
                                 warmup_steps=plan.warmup_steps,
                                 steps_per_epoch=plan.steps_per_epoch)
  size = config.data.image_size
  image_shape = (1, size, size, 3)
  abstract_params = jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(image_shape)))
  tx = optim.make_optimizer(opt, schedule, abstract_params['params'])
  if accum > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=accum)

  replicated = NamedSharding(mesh, PartitionSpec())
  use_ema = bool(config.ema_decay)
  make_state = functools.partial(init_state, model, tx, image_shape,
                                 config.seed, use_ema)
  shardings = state_shardings(jax.eval_shape(make_state), mesh, config.fsdp)
  init = jax.jit(make_state, out_shardings=shardings)
  manager = checkpoint.train_manager(
      workdir, save_every=config.checkpoint_steps, keep=config.keep_checkpoints,
      keep_every=config.get('keep_checkpoint_every') or None)
  state = checkpoint.restore_latest(manager, jax.eval_shape(init))
  state = init() if state is None else state
  start = int(state.step)

  writer = metrics.MetricWriter(workdir, on_write=on_metrics)
  if start == 0:
    writer.write_json('config.json', config.to_dict())
    info = summary.summarize(config.model_name, size,
                             num_classes=config.data.num_classes,
                             **config.model.to_dict())
    print(f'{config.model_name}: {info["params"]:,} parameters, '
          f'{info["macs"]["total"] / 1e9:.3f} GMACs at {size}x{size}; '
          f'{jax.process_count()} process(es), {jax.device_count()} devices; '
          f'{plan.total_steps} steps of {config.global_batch_size} images'
          + (f' ({accum} x {global_batch})' if accum > 1 else '') + '.')

  mix_config = ml_collections.FrozenConfigDict(_mix_fields(config))
  step_fn = jax.jit(functools.partial(
      train_step, model=model, tx=tx, schedule=schedule, mix_config=mix_config,
      num_classes=config.data.num_classes, seed=config.seed,
      ema_decay=config.ema_decay, accum_steps=accum),
      in_shardings=(shardings, sharding.batch_sharding(mesh)),
      out_shardings=(shardings, replicated), donate_argnums=(0,))
  eval_fn = jax.jit(functools.partial(eval_step, model=model))
  batches = sharding.device_batches(
      data_input.train_batches(config, train_source, start_step=start,
                               global_batch=global_batch), mesh)

  def run_eval() -> dict[str, float]:
    weights = {'': state.params}
    if use_ema:
      weights['ema_'] = state.ema_params
    return evaluate_weights(
        eval_fn, weights, state.batch_stats,
        lambda: data_input.eval_batches(config, eval_source,
                                        global_batch=global_batch), mesh)

  preemption = _Preemption()
  total = plan.total_steps * accum  # forward passes; the data position
  progress = metrics.Progress(total, global_batch, start)
  pending = None  # the previous step's metrics, checked one step late
  for step in range(start, total):
    state, step_metrics = step_fn(state, next(batches))
    if pending is not None:
      _check_finite(*pending, max_bad=config.max_bad_steps)
    pending = (step + 1, step_metrics, state.bad_steps)
    done = step + 1
    if done % config.log_steps == 0 or done == total:
      scalars = {k: float(v) for k, v in step_metrics.items()
                 if k != 'finite'}
      scalars.update(progress.report(done))
      writer.write(done, scalars)
      print(metrics.progress_line(done, total, scalars), flush=True)
    if config.eval_steps and done % config.eval_steps == 0 and done != total:
      writer.write(done, run_eval())
    preempted = preemption.requested  # read once: SIGTERM may land any time
    if preempted or done == total:
      checkpoint.save_now(manager, done, state)
    else:
      manager.save(done, args=checkpoint.ocp.args.StandardSave(state))
    if preempted:
      print(f'Preempted (SIGTERM): saved step {done}; exiting.', flush=True)
      return {}
  if pending is not None:
    _check_finite(*pending, max_bad=config.max_bad_steps)
  results = run_eval()
  writer.write(int(state.step), results)
  writer.close()
  print('Final evaluation: ' + '  '.join(
      f'{k} {v:.4f}' for k, v in results.items()), flush=True)
  return results


def evaluate_checkpoint(config: ml_collections.ConfigDict, *,
                        workdir: str | None = None,
                        model_checkpoint: str | None = None
                        ) -> dict[str, float]:
  """Top-1 / top-5 on ``config.data.eval_split`` of the latest training
  checkpoint in ``workdir`` (raw and EMA weights), or of a model checkpoint
  written by ``python -m glmix_jax.convert``."""
  if (workdir is None) == (model_checkpoint is None):
    raise ValueError('Give exactly one of --workdir and --checkpoint.')
  mesh = sharding.make_mesh()
  replicated = NamedSharding(mesh, PartitionSpec())
  if model_checkpoint is not None:
    model, variables = checkpoint.load_variables(model_checkpoint)
    weights = {'': variables['params']}
    batch_stats = variables.get('batch_stats', {})
    where = model_checkpoint
  else:
    model = build_model(config)
    step, state = checkpoint.latest_train_state(workdir)
    weights = {'': state['params']}
    if state.get('ema_params') is not None:
      weights['ema_'] = state['ema_params']
    batch_stats = state['batch_stats']
    where = f'{workdir} (step {step})'
  pipeline.check_batch_size(config.global_batch_size, jax.process_count(),
                            jax.local_device_count())
  source = pipeline.open_split(config.data.dataset, config.data.eval_split,
                               data_input.data_dir(config, workdir or '.'))
  eval_fn = jax.jit(functools.partial(eval_step, model=model))
  weights, batch_stats = jax.device_put((weights, batch_stats), replicated)
  results = evaluate_weights(
      eval_fn, weights, batch_stats,
      lambda: data_input.eval_batches(config, source,
                                      global_batch=config.global_batch_size),
      mesh)
  print(f'{config.data.dataset}:{config.data.eval_split} of {where}: ' +
        '  '.join(f'{k} {v:.4f}' for k, v in results.items()), flush=True)
  return results


def _check_finite(step: int, step_metrics: dict, bad_steps, *,
                  max_bad: int) -> None:
  if bool(step_metrics['finite']):
    return
  if int(bad_steps) > max_bad:
    raise NonFiniteError(
        f'Non-finite loss or gradient at step {step} (loss '
        f'{float(step_metrics["loss"])}, gradient norm '
        f'{float(step_metrics["grad_norm"])}); {int(bad_steps)} bad steps '
        f'exceed max_bad_steps={max_bad}. The update was not applied and the '
        'last checkpoint is intact.')
  print(f'warning: step {step} was non-finite and skipped.', flush=True)


def _mix_fields(config) -> dict:
  aug = config.augmentation
  return dict(mixup_alpha=aug.mixup_alpha, cutmix_alpha=aug.cutmix_alpha,
              mix_prob=aug.mix_prob, switch_prob=aug.mix_switch_prob,
              label_smoothing=aug.label_smoothing)
