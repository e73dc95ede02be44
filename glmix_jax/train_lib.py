"""Training and evaluation: the train state, jitted steps, and the loop.

``train_step`` and ``eval_step`` are pure functions of (state, batch); the
loop (``train_and_evaluate``) only wires the config, the data, the mesh,
checkpoints and metrics around them.

Parallelism: one ``jax.jit`` over the ``'data'`` x ``'fsdp'`` mesh of all
devices of all processes (``sharding``); batches are split over all devices,
the state is replicated, or with FSDP split over the ``'fsdp'`` axis.
BatchNorm statistics are therefore those of the global batch (SyncBN), unlike
the per-GPU BN of the official DDP runs (GLNet uses BN only in the stem, the
transitions and the final norm).

Exact resume: the data stream is a pure function of (seed, step) and every
random number of a step comes from ``fold_in(seed, step)``; the checkpoint
holds the full state including the step, so a run killed at any point and
restarted from its last checkpoint ends bitwise where an uninterrupted run
ends; a restart must use the run's config (``resume``).

Faults: a non-finite step changes nothing but the data position and is
counted; the host reads each step's ``finite`` one step late, but always
before that step's state is saved, so no checkpoint follows an unchecked step.
Leaving the loop by any path waits for the save in flight
(``checkpoint.TrainCheckpoints``); SIGTERM saves a step all processes agree on
(``preemption``).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
from typing import Any, Callable, NamedTuple, Sequence

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec

from glmix_jax import (checkpoint, fewshot, metrics, models, optim,
                       preemption, resume, sharding, transfer)
from glmix_jax.data import input as data_input
from glmix_jax.data import mix, on_device, pipeline
from glmix_jax.errors import NonFiniteError
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


class PixelStats(NamedTuple):
  """The dataset's per-channel mean and std, in [0, 1] (``config.data``)."""
  mean: tuple[float, ...]
  std: tuple[float, ...]

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> PixelStats:
    return cls(tuple(config.data.mean), tuple(config.data.std))


def init_variables(model, image_shape, seed: int) -> dict[str, Any]:
  """The model's initial variables for images of ``image_shape``."""
  return model.init(jax.random.PRNGKey(seed), jnp.zeros(image_shape),
                    train=False)


def new_state(variables: dict[str, Any], tx: optax.GradientTransformation,
              use_ema: bool) -> TrainState:
  """The state before the first step, from the model's initial variables."""
  params = variables['params']
  return TrainState(
      step=jnp.zeros((), jnp.int32), params=params,
      batch_stats=variables.get('batch_stats', {}), opt_state=tx.init(params),
      ema_params=params if use_ema else None,
      bad_steps=jnp.zeros((), jnp.int32))


def init_state(model, tx: optax.GradientTransformation, image_shape,
               seed: int, use_ema: bool) -> TrainState:
  return new_state(init_variables(model, image_shape, seed), tx, use_ema)


def train_step(state: TrainState, batch: dict[str, jax.Array], *, model,
               tx: optax.GradientTransformation, schedule: optim.Schedule,
               mix_settings: mix.MixSettings, num_classes: int,
               pixels: PixelStats, seed: int, ema_decay: float,
               accum_steps: int = 1, param_shardings: Any = None,
               trainable: Callable[[tuple[str, ...]], bool] | None = None
               ) -> tuple[TrainState, dict]:
  """One step on a global (micro-)batch; skips the update if non-finite.

  ``batch['image']`` is uint8, normalised here with ``pixels`` (and erased
  where the batch has ``'erase_box'``, ``on_device``); with mixing on,
  ``batch`` holds the step's ``mix.draw`` fields. With
  ``accum_steps`` > 1, ``tx`` is an ``optax.MultiSteps``: parameters and EMA
  change on every ``accum_steps``-th call, with the mean gradient. With
  ``param_shardings`` (FSDP), split weights are gathered in the compute
  dtype (``sharding.gathered_in``). With ``trainable`` (a frozen backbone,
  ``transfer.trainable``), only the parameters it accepts get gradients
  (the others are constants of the step: no backward pass through the
  backbone) and change, and the model runs in evaluation mode.
  """
  dropout_rng = jax.random.fold_in(jax.random.PRNGKey(seed), state.step)
  images = on_device.normalize(batch['image'], pixels.mean, pixels.std)
  if 'erase_box' in batch:
    images = on_device.erase(images, batch['erase_box'],
                             on_device.erase_key(seed, state.step))
  if mix_settings.enabled:
    images, targets = mix.mix_batch(
        images, batch['label'],
        {k: batch[k] for k in mix.PARAM_FIELDS}, mix_settings, num_classes)
  else:
    targets = mix.smooth_targets(batch['label'], num_classes,
                                 mix_settings.label_smoothing,
                                 mix_settings.spread)

  def loss_fn(params):
    if trainable is not None:
      params = _frozen_except(params, trainable)
    if param_shardings is not None:
      params = sharding.gathered_in(params, param_shardings, model.dtype)
    variables = {'params': params, 'batch_stats': state.batch_stats}
    if trainable is None:
      logits, updates = model.apply(variables, images, train=True,
                                    mutable=['batch_stats'],
                                    rngs={'dropout': dropout_rng})
      batch_stats = updates['batch_stats']
    else:
      logits, batch_stats = model.apply(variables, images, train=False), (
          state.batch_stats)
    loss = optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)
    return loss.mean(), (logits, batch_stats)

  (loss, (logits, batch_stats)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(state.params)
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

  def apply_update(state):
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = state.ema_params
    if ema is not None:
      updated = (tx.has_updated(opt_state) if accum_steps > 1
                 else True)
      ema = jax.tree_util.tree_map_with_path(
          lambda path, e, p: e
          if trainable and not trainable(optim.path_keys(path))
          else jnp.where(updated, ema_decay * e + (1 - ema_decay) * p, e),
          ema, params)
    return state.replace(step=state.step + 1, params=params,
                         batch_stats=batch_stats, opt_state=opt_state,
                         ema_params=ema)

  def skip(state):  # a non-finite step changes nothing but the data position
    return state.replace(step=state.step + 1, bad_steps=state.bad_steps + 1)

  new = _choose(finite, apply_update, skip, state)
  return new, dict(
      loss=loss, grad_norm=grad_norm, lr=schedule(state.step // accum_steps),
      param_norm=optax.tree.norm(new.params), finite=finite,
      bad_steps=new.bad_steps,
      accuracy=jnp.mean(jnp.argmax(logits, -1) == jnp.argmax(targets, -1)))


def _frozen_except(params, trainable: Callable[[tuple[str, ...]], bool]):
  """``params`` with a stopped gradient wherever ``trainable`` says no."""
  return jax.tree_util.tree_map_with_path(
      lambda path, p: p if trainable(optim.path_keys(path))
      else jax.lax.stop_gradient(p), params)


def _choose(pred: jax.Array, if_true: Callable, if_false: Callable,
            state: TrainState) -> TrainState:
  """``if_true(state)`` where ``pred``, else ``if_false(state)``.

  On CPU a branch: the update writes the new state once, instead of once
  more through a select over every array. On GPU a conditional reads its
  predicate back to the host each step, a sync that stalls the queue of
  launches, so there (and on TPU) both sides are computed and selected.
  """
  def select(state):
    return jax.tree_util.tree_map(functools.partial(jnp.where, pred),
                                  if_true(state), if_false(state))
  return jax.lax.platform_dependent(
      state, cpu=lambda s: jax.lax.cond(pred, if_true, if_false, s),
      default=select)


def make_train_step(config: ml_collections.ConfigDict, model,
                    tx: optax.GradientTransformation,
                    schedule: optim.Schedule, *, accum_steps: int = 1,
                    mesh: jax.sharding.Mesh | None = None,
                    shardings: Any = None, donate: bool = True) -> Callable:
  """``config``'s jitted ``train_step(state, batch) -> (state, metrics)``.

  With a ``mesh``, the step is traced on it (the kernels split the batch
  over its devices, ``models.kernels.per_example``), takes batches split
  over its batch axes and keeps the state in ``shardings`` (replicated if
  None). ``donate``: the input state's buffers are reused for the output.
  """
  split = shardings is not None and sharding.fsdp_split(shardings)
  step = functools.partial(
      train_step, model=model, tx=tx, schedule=schedule,
      mix_settings=mix.MixSettings.from_config(config.augmentation),
      num_classes=config.data.num_classes,
      pixels=PixelStats.from_config(config), seed=config.seed,
      ema_decay=config.ema_decay, accum_steps=accum_steps,
      param_shardings=shardings.params if split else None,
      trainable=transfer.trainable(config, model))
  donate_argnums = (0,) if donate else ()
  if mesh is None:
    return jax.jit(step, donate_argnums=donate_argnums)
  replicated = NamedSharding(mesh, PartitionSpec())
  return jax.jit(
      sharding.traced_on(mesh, step),
      in_shardings=(replicated if shardings is None else shardings,
                    sharding.batch_sharding(mesh)),
      out_shardings=(replicated if shardings is None else shardings,
                     replicated),
      donate_argnums=donate_argnums)


def make_eval_step(config: ml_collections.ConfigDict, model,
                   mesh: jax.sharding.Mesh) -> Callable:
  """The jitted ``eval_step(params, batch_stats, batch)``, traced on
  ``mesh``."""
  return jax.jit(sharding.traced_on(
      mesh, functools.partial(eval_step, model=model,
                              pixels=PixelStats.from_config(config))))


def eval_step(params, batch_stats, batch: dict[str, jax.Array], *,
              model, pixels: PixelStats) -> dict[str, jax.Array]:
  """Masked sums over a padded batch: top-1/top-5 hits, loss and count.

  ``batch['image']`` is uint8, normalised here with ``pixels``.

  With ImageNet-ReaL labels in the batch, also ``real_top1`` (the top class
  is one of the image's plausible classes) and ``real_count``: the images
  that have any ReaL label, the only ones ReaL accuracy counts.
  """
  images = on_device.normalize(batch['image'], pixels.mean, pixels.std)
  logits = model.apply({'params': params, 'batch_stats': batch_stats},
                       images, train=False).astype(jnp.float32)
  labels, mask = batch['label'], batch['mask'].astype(jnp.float32)
  top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  sums = dict(
      top1=jnp.sum(mask * (top5[:, 0] == labels)),
      top5=jnp.sum(mask * jnp.any(top5 == labels[:, None], axis=-1)),
      loss=jnp.sum(mask * loss), count=jnp.sum(mask))
  if 'real_labels' in batch:
    real = batch['real_labels']
    rated = mask * jnp.any(real >= 0, axis=-1)
    sums.update(
        real_top1=jnp.sum(rated * jnp.any(real == top5[:, :1], axis=-1)),
        real_count=jnp.sum(rated))
  return sums


def _sums(eval_fn: Callable, weights: dict[str, Any], batch_stats, batches,
          mesh) -> dict[str, dict[str, np.ndarray]]:
  """``eval_step``'s sums over all batches, for each named set of weights,
  in one pass over the data (each batch is decoded once for all of them)."""
  totals = dict.fromkeys(weights)
  for batch in sharding.device_batches(batches, mesh):
    for name, params in weights.items():
      sums = eval_fn(params, batch_stats, batch)
      totals[name] = sums if totals[name] is None else jax.tree_util.tree_map(
          jnp.add, totals[name], sums)
  return jax.device_get(totals)


def _scores(totals: dict[str, np.ndarray]) -> dict[str, float]:
  count = float(totals['count'])
  scores = dict(top1=float(totals['top1']) / count,
                top5=float(totals['top5']) / count,
                loss=float(totals['loss']) / count, count=count)
  if 'real_count' in totals:
    real_count = float(totals['real_count'])
    scores.update(real_top1=float(totals['real_top1']) / max(real_count, 1),
                  real_count=real_count)
  return scores


def evaluate(eval_fn: Callable, params, batch_stats, batches, mesh
             ) -> dict[str, float]:
  """Top-1 / top-5 / loss over every example of the split, exactly once."""
  return _scores(_sums(eval_fn, {'': params}, batch_stats, batches, mesh)[''])


def evaluate_weights(eval_fn: Callable, weights: dict[str, Any], batch_stats,
                     batches, mesh, *, name: str) -> dict[str, float]:
  """``evaluate`` for each named set of parameters (e.g. ``{'': raw,
  'ema_': ema}``) in one pass over ``batches`` of evaluation ``name``, as
  flat ``'<weights><name>_<metric>'`` scores (``ema_val_top1``)."""
  totals = _sums(eval_fn, weights, batch_stats, batches, mesh)
  return {f'{prefix}{name}_{k}': v for prefix, sums in totals.items()
          for k, v in _scores(sums).items()}


# ---------------------------------------------------------------------------
# The named evaluations of a config (``config.evals``, as in big_vision).


EVAL_TYPES = ('classification', 'fewshot')


class Evaluation(NamedTuple):
  """One entry of ``config.evals``, its split(s) opened."""
  name: str
  source: Any  # a pipeline.open_split data source
  every_steps: int  # in training: 0 at the end, N also every N, -1 never
  entry: ml_collections.ConfigDict
  train_source: Any = None  # fewshot: the split the shots come from

  @property
  def type(self) -> str:
    """'classification' (the default: top-1/top-5 of the classifier) or
    'fewshot' (``fewshot``: linear probes on the pre-logit features)."""
    return self.entry.get('type', 'classification')


def eval_batch_size(config: ml_collections.ConfigDict) -> int:
  """The global evaluation batch, in training and in eval.py alike:
  ``config.eval_batch_size``, or if 0 the batch of one training forward pass
  (``global_batch_size / grad_accum_steps``)."""
  return (config.eval_batch_size or
          config.global_batch_size // config.grad_accum_steps)


def open_evaluations(config: ml_collections.ConfigDict, data_dir: str | None,
                     names: Sequence[str] | None = None
                     ) -> list[Evaluation]:
  """The evaluations ``names`` of ``config.evals`` (all that training runs,
  ``every_steps >= 0``, if None), each split opened: a dataset or split that
  is not prepared fails here, before any step."""
  evals = config.evals
  if names is None:
    names = [n for n in evals if evals[n].every_steps >= 0]
  unknown = [n for n in names if n not in evals]
  if unknown:
    raise ValueError(f'Unknown evaluation(s) {unknown}; this config has: '
                     f'{", ".join(evals)} (config.evals).')
  opened = []
  for n in names:
    entry = evals[n]
    dataset = entry.dataset or config.data.dataset
    evaluation = Evaluation(n, pipeline.open_split(dataset, entry.split,
                                                   data_dir),
                            entry.every_steps, entry)
    if evaluation.type not in EVAL_TYPES:
      raise ValueError(f'config.evals.{n}.type={evaluation.type!r}; choose '
                       f'one of {", ".join(EVAL_TYPES)}.')
    if evaluation.type == 'fewshot':
      evaluation = evaluation._replace(train_source=pipeline.open_split(
          dataset, entry.train_split, data_dir))
    opened.append(evaluation)
  return opened


def run_evaluation(config: ml_collections.ConfigDict, evaluation: Evaluation,
                   eval_fn: Callable, weights: dict[str, Any], batch_stats,
                   mesh, model) -> dict[str, float]:
  """``evaluate_weights`` over every example of ``evaluation``'s split, or
  its few-shot probes (``fewshot.run``)."""
  if evaluation.type == 'fewshot':
    return fewshot.run(config, evaluation.entry, name=evaluation.name,
                       train_source=evaluation.train_source,
                       eval_source=evaluation.source, model=model,
                       weights=weights, batch_stats=batch_stats, mesh=mesh,
                       global_batch=eval_batch_size(config))
  batches = data_input.eval_batches(config, evaluation.source,
                                    global_batch=eval_batch_size(config))
  return evaluate_weights(eval_fn, weights, batch_stats, batches, mesh,
                          name=evaluation.name)


# ---------------------------------------------------------------------------
# The loop.


class _Plan(NamedTuple):
  """A run's arithmetic: optimizer steps and the batch of one forward pass."""
  total_steps: int
  warmup_steps: int
  steps_per_epoch: int
  accum_steps: int  # forward passes per optimizer step
  pass_batch: int  # global images per forward pass

  @property
  def total_passes(self) -> int:
    """Forward passes of the run, which is also the final data position."""
    return self.total_steps * self.accum_steps


def _plan(config, num_records: int) -> _Plan:
  """Checks the batch arithmetic against the devices and plans the run."""
  accum, batch = config.grad_accum_steps, config.global_batch_size
  if batch % accum:
    raise ValueError(f'global_batch_size={batch} is not divisible by '
                     f'grad_accum_steps={accum}.')
  pipeline.check_batch_size(batch // accum, jax.process_count(),
                            jax.local_device_count())
  pipeline.check_batch_size(eval_batch_size(config), jax.process_count(),
                            jax.local_device_count())
  settings = mix.MixSettings.from_config(config.augmentation)
  if settings.enabled:
    settings.check(batch // accum // jax.device_count())
  steps_per_epoch = max(num_records // batch, 1)
  if config.get('total_steps'):
    total = config.total_steps
  else:
    total = optim.steps_for(config.total_epochs, num_records, batch)
  return _Plan(total_steps=total, steps_per_epoch=steps_per_epoch,
               warmup_steps=round(config.warmup_epochs * steps_per_epoch),
               accum_steps=accum, pass_batch=batch // accum)


def recipe_optimizer(config, plan: _Plan, abstract_params, model=None
                     ) -> tuple[optim.Schedule, optax.GradientTransformation]:
  """The config's learning-rate schedule and optimizer (with gradient
  accumulation when ``plan.accum_steps`` > 1; ``model`` gives the layers of
  ``optimizer.layer_decay``)."""
  opt = config.optimizer
  # The recipe's linear scaling rule, on the batch of one optimizer step.
  peak = opt.lr * config.global_batch_size / opt.lr_batch_size
  schedule = optim.make_schedule(opt, peak, total_steps=plan.total_steps,
                                 warmup_steps=plan.warmup_steps,
                                 steps_per_epoch=plan.steps_per_epoch)
  trainable = transfer.trainable(config, model)
  if trainable is None:
    tx = optim.make_optimizer(opt, schedule, abstract_params, model)
  else:  # a frozen backbone: the optimizer sees the classifier alone
    tx = optim.only_trainable(optim.make_optimizer(
        opt, schedule, optim.trainable_subset(abstract_params, trainable),
        model), trainable)
  if plan.accum_steps > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=plan.accum_steps)
  return schedule, tx


def _init_or_restore(config, model, tx, abstract_variables, image_shape,
                     mesh, checkpoints):
  """The latest checkpoint's state, or a fresh one (from
  ``config.init_from``'s weights when set); with the state's shardings. The
  state's shapes come from the model's abstract variables (only the
  optimizer's init is traced for them); the model is traced again only to
  initialise a new run from scratch."""
  use_ema = bool(config.ema_decay)
  abstract_state = jax.eval_shape(
      functools.partial(new_state, tx=tx, use_ema=use_ema),
      abstract_variables)
  shardings = sharding.state_shardings(abstract_state, mesh)
  state = checkpoints.restore_latest(jax.tree_util.tree_map(
      lambda x, where: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=where),
      abstract_state, shardings))
  if state is not None:  # a resumed run never re-reads config.init_from
    return state, shardings
  if config.init_from:  # the weights are the jitted init's argument, not
    # constants of its program
    state = jax.jit(functools.partial(new_state, tx=tx, use_ema=use_ema),
                    out_shardings=shardings)(transfer.initial_variables(
                        config, model, abstract_variables))
  else:
    state = jax.jit(functools.partial(init_state, model, tx, image_shape,
                                      config.seed, use_ema),
                    out_shardings=shardings)()
  return state, shardings


def _announce(config, plan: _Plan, model, abstract_variables,
              image_shape) -> None:
  """The start line: model size and cost, devices, and the run's length."""
  size = config.data.image_size
  macs, _ = summary.count_macs(model, abstract_variables, image_shape)
  accum = (f' ({plan.accum_steps} x {plan.pass_batch})'
           if plan.accum_steps > 1 else '')
  print(f'{config.model_name}: '
        f'{summary.param_count(abstract_variables["params"]):,} parameters, '
        f'{macs["total"] / 1e9:.3f} GMACs at {size}x{size}; '
        f'{jax.process_count()} process(es), {jax.device_count()} devices; '
        f'{plan.total_steps} steps of {config.global_batch_size} images'
        f'{accum}.', flush=True)


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
  transfer.check_config(config)
  config = data_input.with_class_count(config, str(workdir))
  if checkpoint.saved_steps(workdir):  # first: a resume must be the same run
    resume.check_resumable(workdir, config)
  workdir.mkdir(parents=True, exist_ok=True)
  mesh = sharding.make_mesh(config.mesh_shape)
  model = models.from_config(config)
  if getattr(model, 'token_label_head', False):
    raise ValueError(
        f'{config.model_name} is a token-labeling model: its training needs '
        'the dense NFNet label maps of the official main_tklb.py, which '
        'glmix_jax does not read. Train the plain variant (e.g. glnet_4g), or '
        'evaluate converted _tklb weights with eval.py --checkpoint.')
  data_dir = data_input.data_dir(config, str(workdir))
  train_source = pipeline.open_split(config.data.dataset,
                                     config.data.train_split, data_dir)
  evaluations = open_evaluations(config, data_dir)
  plan = _plan(config, len(train_source))
  size = config.data.image_size
  image_shape = (1, size, size, 3)
  # The one abstract trace of the model's init: the optimizer's masks, the
  # state's shapes and shardings, and the start line all come from it.
  abstract_variables = jax.eval_shape(functools.partial(
      init_variables, model, image_shape, config.seed))
  schedule, tx = recipe_optimizer(config, plan, abstract_variables['params'],
                                  model)
  # Leaving this block by any path (the end, an error, SIGTERM, Ctrl-C) waits
  # for the checkpoint save in flight and puts SIGTERM's handler back.
  with contextlib.ExitStack() as stack:
    checkpoints = stack.enter_context(checkpoint.TrainCheckpoints(
        workdir, save_every=config.checkpoint_steps,
        keep=config.keep_checkpoints,
        keep_every=config.get('keep_checkpoint_every') or None))
    state, shardings = _init_or_restore(config, model, tx, abstract_variables,
                                        image_shape, mesh, checkpoints)
    writer = stack.enter_context(metrics.MetricWriter(workdir,
                                                      on_write=on_metrics))
    preempt = stack.enter_context(preemption.Preemption())
    start = int(state.step)
    if start == 0:
      writer.write_json(resume.CONFIG_FILE, resume.as_saved(config))
      _announce(config, plan, model, abstract_variables, image_shape)

    step_fn = make_train_step(config, model, tx, schedule,
                              accum_steps=plan.accum_steps, mesh=mesh,
                              shardings=shardings)
    eval_fn = make_eval_step(config, model, mesh)
    train_input = data_input.train_batches(
        config, train_source, start_step=start, global_batch=plan.pass_batch)
    # Closed on any way out (and before the final evaluation): stops the
    # input workers and frees their shared-memory buffers.
    stack.callback(train_input.close)
    batches = sharding.device_batches(train_input, mesh)
    if start < plan.total_passes:  # compiled before the loop, on every host
      first = next(batches)
      step_fn = step_fn.lower(state, first).compile()
      sharding.wait_for_processes('train step compiled')
      batches = itertools.chain([first], batches)
    batches = metrics.TimedInput(batches)

    def run_eval(evaluation: Evaluation) -> dict[str, float]:
      weights = {'': state.params}
      if state.ema_params is not None:
        weights['ema_'] = state.ema_params
      return run_evaluation(config, evaluation, eval_fn, weights,
                            state.batch_stats, mesh, model)

    def check_finite(step: int, step_metrics: dict) -> None:
      _check_finite(step, step_metrics, max_bad=config.max_bad_steps,
                    last_checkpoint=checkpoints.last_saved)

    total = plan.total_passes
    workers = data_input.num_workers(config)
    progress = metrics.Progress(
        total, plan.pass_batch, start, inputs=batches,
        raise_input=f'--config.data.num_workers (now {workers}, on '
        f'{len(os.sched_getaffinity(0))} cores of this process)')
    # A step's metrics are read on the host one step late, so that the host
    # dispatches step k + 1 before it waits for step k; a step about to be
    # saved is checked first, so no checkpoint holds a step past an
    # unchecked one.
    pending = None
    for step in range(start, total):
      state, step_metrics = step_fn(state, next(batches))
      if pending is not None:
        check_finite(*pending)
      done = step + 1
      pending = (done, step_metrics)
      if done % config.log_steps == 0 or done == total:
        scalars = {k: float(v) for k, v in step_metrics.items()
                   if k != 'finite'}
        scalars.update(progress.report(done))
        writer.write(done, scalars)
        print(metrics.progress_line(done, total, scalars), flush=True)
        if warning := progress.input_warning():
          print(warning, flush=True)
      for evaluation in evaluations:
        every = evaluation.every_steps
        if every > 0 and done % every == 0 and done != total:
          writer.write(done, run_eval(evaluation))
      preempted = preempt.reached(done)
      final = preempted or done == total
      if final or checkpoints.should_save(done):
        check_finite(*pending)
        pending = None
        checkpoints.save(done, state, wait=final)
      if preempted:
        print(f'Preempted (SIGTERM): saved step {done}; exiting.', flush=True)
        return {}
    if pending is not None:
      check_finite(*pending)
    train_input.close()
    results = {}
    for evaluation in evaluations:
      results.update(run_eval(evaluation))
    writer.write(int(state.step), results)
  print('Final evaluation: ' + '  '.join(
      f'{k} {v:.4f}' for k, v in results.items()), flush=True)
  return results


def evaluate_checkpoint(config: ml_collections.ConfigDict, *,
                        workdir: str | None = None,
                        model_checkpoint: str | None = None,
                        evals: Sequence[str] | None = None
                        ) -> dict[str, float]:
  """Top-1 / top-5 of the latest training checkpoint in ``workdir`` (raw and
  EMA weights), or of a model checkpoint written by ``python -m
  glmix_jax.convert``, on each evaluation ``evals`` of ``config.evals`` (by
  default those that training runs)."""
  if (workdir is None) == (model_checkpoint is None):
    raise ValueError('Give exactly one of --workdir and --checkpoint.')
  config = data_input.with_class_count(config, workdir or '.')
  pipeline.check_batch_size(eval_batch_size(config), jax.process_count(),
                            jax.local_device_count())
  evaluations = open_evaluations(
      config, data_input.data_dir(config, workdir or '.'), evals)
  mesh = sharding.make_mesh()
  replicated = NamedSharding(mesh, PartitionSpec())
  if model_checkpoint is not None:
    model, variables = checkpoint.load_variables(model_checkpoint)
    weights = {'': variables['params']}
    batch_stats = variables.get('batch_stats', {})
    where = model_checkpoint
  else:
    model = models.from_config(config)
    step, state = checkpoint.latest_train_state(workdir)
    weights = {'': state['params']}
    if state.get('ema_params') is not None:
      weights['ema_'] = state['ema_params']
    batch_stats = state['batch_stats']
    where = f'{workdir} (step {step})'
  eval_fn = make_eval_step(config, model, mesh)
  weights, batch_stats = jax.device_put((weights, batch_stats), replicated)
  results = {}
  for evaluation in evaluations:
    scores = run_evaluation(config, evaluation, eval_fn, weights, batch_stats,
                            mesh, model)
    entry = config.evals[evaluation.name]
    print(f'{evaluation.name} ({entry.dataset or config.data.dataset}:'
          f'{entry.split}) of {where}: ' +
          '  '.join(f'{k} {v:.4f}' for k, v in scores.items()), flush=True)
    results.update(scores)
  return results


def _check_finite(step: int, step_metrics: dict, *, max_bad: int,
                  last_checkpoint: int | None) -> None:
  """Warns of a skipped non-finite step; raises once there are more than
  ``max_bad`` of them."""
  if bool(step_metrics['finite']):
    return
  bad = int(step_metrics['bad_steps'])
  if bad > max_bad:
    kept = (f'the latest checkpoint, step {last_checkpoint}, is intact' if
            last_checkpoint is not None else 'no checkpoint was written yet')
    raise NonFiniteError(
        f'Non-finite loss or gradient at step {step} (loss '
        f'{float(step_metrics["loss"])}, gradient norm '
        f'{float(step_metrics["grad_norm"])}); {bad} such steps exceed '
        f'max_bad_steps={max_bad}. The update was not applied and {kept}. '
        'Rerun with a larger --config.max_bad_steps to skip such steps and '
        'resume, or start a new run (a new --workdir) with, e.g., a lower '
        'learning rate.')
  print(f'warning: step {step} was non-finite and skipped ({bad} of at most '
        f'{max_bad}).', flush=True)

