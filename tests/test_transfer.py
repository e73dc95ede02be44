"""Fine-tuning (``config.init_from``): which weights a run starts from."""

import functools
import shutil
import subprocess

import jax
import numpy as np
import pytest
from flax import traverse_util

from configs import tiny
import hlo
from conftest import ROOT, reference_file, subprocess_env, train_cmd
from glmix_jax import (checkpoint, models, optim, sharding, train_lib,
                       transfer)
from glmix_jax.data import mix


def _start(config):
  """The new model and the variables its first step starts from."""
  model = models.from_config(config)
  size = config.data.image_size
  abstract = jax.eval_shape(functools.partial(
      train_lib.init_variables, model, (1, size, size, 3), config.seed))
  return model, transfer.initial_variables(config, model, abstract)


def _flat(tree):
  return traverse_util.flatten_dict(jax.device_get(tree))


def _finetune_config(source, **fields):
  config = tiny.get_config()
  config.update(init_from=str(source), **fields)
  return config


@pytest.mark.parametrize('weights', ['raw', 'ema'])
def test_workdir_weights_load_bitwise_and_a_new_head_is_created(tiny_run,
                                                                weights):
  """From the tiny run (4 classes) to 7 classes: every backbone parameter
  and BN statistic is the chosen weights', bitwise; the head is new:
  (32, 7) with weights of std 2e-5 (main_cx2.py's finetune init) and zero
  bias."""
  _, state = checkpoint.latest_train_state(tiny_run)
  config = _finetune_config(tiny_run, init_weights=weights)
  config.data.num_classes = 7
  _, variables = _start(config)
  source = _flat({'params': state['params' if weights == 'raw'
                                  else 'ema_params'],
                  'batch_stats': state['batch_stats']})
  loaded = _flat(variables)
  heads = {p for p in loaded if p[:2] in (('params', 'head'),)}
  assert heads == {('params', 'head', 'kernel'), ('params', 'head', 'bias')}
  assert loaded.keys() - heads == source.keys() - heads
  for path in loaded.keys() - heads:
    np.testing.assert_array_equal(loaded[path], source[path],
                                  err_msg='/'.join(path))
    assert loaded[path].dtype == source[path].dtype
  kernel, bias = loaded['params', 'head', 'kernel'], loaded['params', 'head',
                                                          'bias']
  assert kernel.shape == (32, 7) and bias.shape == (7,)
  assert 1.5e-5 < kernel.std() < 2.5e-5 and abs(kernel.mean()) < 1e-5
  np.testing.assert_array_equal(bias, 0)


def test_the_same_classes_keep_the_head_unless_reinit(tiny_run):
  _, state = checkpoint.latest_train_state(tiny_run)
  head = jax.device_get(state['params']['head'])
  _, kept = _start(_finetune_config(tiny_run))
  np.testing.assert_array_equal(kept['params']['head']['kernel'],
                                head['kernel'])
  _, fresh = _start(_finetune_config(tiny_run, init_head='reinit'))
  assert np.abs(fresh['params']['head']['kernel']).max() < 2e-4
  np.testing.assert_array_equal(fresh['params']['head']['bias'], 0)


def test_model_checkpoint_loads_and_has_no_ema(tiny_run, tmp_path):
  """A model checkpoint (what convert writes) as the source."""
  _, state = checkpoint.latest_train_state(tiny_run)
  config = tiny.get_config()
  variables = {'params': state['params'], 'batch_stats': state['batch_stats']}
  checkpoint.save_variables(tmp_path / 'model', jax.device_get(variables),
                            model=config.model_name,
                            overrides=dict(config.model.to_dict(),
                                           num_classes=4))
  _, loaded = _start(_finetune_config(tmp_path / 'model'))
  for path, value in _flat(variables).items():
    np.testing.assert_array_equal(_flat(loaded)[path], value)
  with pytest.raises(transfer.TransferError, match='init_weights=raw'):
    _start(_finetune_config(tmp_path / 'model', init_weights='ema'))


def test_unknown_choices_are_refused():
  for field, value, choices in (('init_weights', 'best', 'raw, ema'),
                                ('init_head', 'keep', 'auto, reinit')):
    config = tiny.get_config()
    config[field] = value
    with pytest.raises(ValueError, match=f"config.{field}='{value}'; choose "
                       f'one of {choices}'):
      transfer.check_config(config)


def test_weights_of_another_architecture_name_the_keys(tiny_run, tmp_path):
  config = _finetune_config(tiny_run)
  config.model.dims = (32, 32, 32, 64)
  with pytest.raises(transfer.TransferError,
                     match=r'do not fit glnet_stl with these model fields \(only the '
                     r'classifier, head, may differ\): 18 of another shape: .*'
                     r'params/downsample_layers_3_1/bias \(32,\) -> \(64,\)'):
    _start(config)
  with pytest.raises(transfer.TransferError, match='neither a train.py '
                     'workdir with a checkpoint nor a model checkpoint'):
    _start(_finetune_config(tmp_path / 'nothing_here'))


def test_a_resumed_finetuning_run_is_the_uninterrupted_run_bitwise(
    tiny_run, tmp_path):
  """A fine-tuning run of 12 steps, and the same run resumed from its step-4
  checkpoint after its init_from source is deleted: the final states are
  equal to the bit, so the resume read only its own checkpoint."""
  source = tmp_path / 'source'
  shutil.copytree(tiny_run, source)
  flags = [f'--config.init_from={source}', '--config.init_head=reinit']
  whole = tmp_path / 'whole'
  done = subprocess.run(train_cmd(whole, *flags), capture_output=True,
                        text=True, cwd=ROOT, env=subprocess_env(),
                        timeout=600, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  assert checkpoint.saved_steps(whole) == [4, 8, 12]
  resumed = tmp_path / 'resumed'
  shutil.copytree(whole, resumed)
  for step in (8, 12):
    shutil.rmtree(resumed / 'checkpoints' / str(step))
  shutil.rmtree(source)
  done = subprocess.run(train_cmd(resumed, *flags), capture_output=True,
                        text=True, cwd=ROOT, env=subprocess_env(),
                        timeout=600, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  (_, want), (_, got) = (checkpoint.latest_train_state(w)
                         for w in (whole, resumed))
  assert int(got['step']) == int(want['step']) == 12
  leaves = jax.tree_util.tree_leaves_with_path
  assert len(leaves(got)) == len(leaves(want)) > 0
  for (path, a), (_, b) in zip(leaves(got), leaves(want)):
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))


def _abstract_params(name, size, **overrides):
  model = models.build(name, **overrides)
  return model, jax.eval_shape(functools.partial(
      train_lib.init_variables, model, (1, size, size, 3), 0))['params']


# (model, image side, {parameter path: layer}); layer L + 1 = sum(depths) + 1
# is the head's (scale 1). ConvNeXt-V2's single rule: the stem 1, stage i's
# downsampling sum(depths[:i]) + 1, block j of stage i sum(depths[:i]) + j + 1.
LAYERS = {
    'glnet_stl': (64, {  # depths (2, 2, 6, 2): L = 12
        'downsample_layers_0_0/kernel': 1, 'downsample_layers_0_1/scale': 1,
        'stages_0/blocks_0/norm1/scale': 1, 'stages_0/blocks_1/mlp_0/bias': 2,
        'downsample_layers_1_1/kernel': 3, 'stages_1/blocks_0/slot_scale': 3,
        'downsample_layers_2_0/scale': 5, 'stages_2/blocks_5/mlp_3/kernel': 10,
        'downsample_layers_3_1/bias': 11, 'stages_3/blocks_1/mha_op/in_proj/'
        'kernel': 12, 'norm/scale': 13, 'head/kernel': 13}),
    'glnet_4g': (64, {  # depths (4, 4, 18, 4): L = 30
        'downsample_layers_0_1/kernel': 1, 'downsample_layers_0_5/bias': 1,
        'stages_0/blocks_3/pos_conv/kernel': 4, 'downsample_layers_2_0/kernel':
        9, 'stages_2/blocks_17/mlp_1/kernel': 26, 'stages_3/blocks_0/norm1/'
        'scale': 27, 'head/bias': 31}),
    'acmix_resnet50': (128, {  # depths (3, 4, 6, 3): L = 16
        'conv1/kernel': 1, 'bn1/scale': 1, 'layer1_0/conv2/rate1': 1,
        'layer1_2/bn3/bias': 3, 'layer2_0/downsample_0/kernel': 4,
        'layer3_5/conv2/dep_conv/kernel': 13, 'layer4_2/conv3/kernel': 16,
        'fc/kernel': 17}),
    'acmix_swin_t': (224, {  # depths (2, 2, 6, 2): L = 12
        'patch_embed/proj/kernel': 1, 'layers_0/blocks_1/attn/rate2': 2,
        'layers_0/downsample/reduction/kernel': 3, 'layers_2/blocks_0/attn/'
        'relative_position_bias_table': 5, 'layers_2/downsample/norm/scale': 11,
        'layers_3/blocks_1/mlp/fc2/bias': 12, 'norm/bias': 13,
        'head/kernel': 13}),
}


@pytest.mark.parametrize('name', sorted(LAYERS))
def test_layer_decay_gives_each_parameter_its_layers_scale(name):
  size, layers = LAYERS[name]
  model, params = _abstract_params(name, size)
  top = sum(model.depths) + 1
  scales = traverse_util.flatten_dict(optim.layer_decay(params, model, 0.5),
                                      sep='/')
  for path, layer in layers.items():
    assert scales[path] == 0.5**(top - layer), path
  assert set(scales.values()) == {0.5**(top - k) for k in range(1, top + 1)}


def test_layer_decay_scales_each_update_decay_included():
  """SGD (lr 0.1, L2 0.01, no momentum) with layer_decay 0.8 on the tiny
  GLNet: every parameter moves by its scale x the plain update."""
  config = tiny.get_config()
  config.optimizer.update(name='sgd', momentum=0.0, weight_decay=0.01,
                          weight_decay_rule='all', grad_clip_norm=0.0)
  model = models.from_config(config)
  params = jax.tree_util.tree_map(
      lambda x: np.full(x.shape, 2.0, np.float32),
      _abstract_params(config.model_name, 32, **config.model.to_dict(),
                       num_classes=4)[1])
  grads = jax.tree_util.tree_map(np.ones_like, params)
  plain = optim.make_optimizer(config.optimizer, lambda s: 0.1, params)
  config.optimizer.layer_decay = 0.8
  decayed = optim.make_optimizer(config.optimizer, lambda s: 0.1, params,
                                 model)
  want, _ = plain.update(grads, plain.init(params), params)
  got, _ = decayed.update(grads, decayed.init(params), params)
  scales = optim.layer_decay(params, model, 0.8)
  jax.tree_util.tree_map(
      lambda g, w, s: np.testing.assert_allclose(g, w * s, rtol=1e-6),
      got, want, scales)
  np.testing.assert_allclose(got['head']['kernel'], -0.1 * (1 + 0.01 * 2.0))


def test_a_frozen_backbone_trains_the_head_alone(tiny_run):
  """freeze_backbone (a linear probe) from the tiny run to 7 classes, two
  steps: the backbone's parameters, EMA and BN statistics stay the loaded
  ones, bitwise, the head moves; the optimizer keeps Adam moments for the
  head only, and the step has no backward pass through the backbone (its
  FLOPs are under half those of the same step that trains everything)."""
  config = _finetune_config(tiny_run, freeze_backbone=True)
  config.data.num_classes = 7
  model, variables = _start(config)
  plan = train_lib._Plan(  # pylint: disable=protected-access
      total_steps=4, warmup_steps=0, steps_per_epoch=4, accum_steps=1,
      pass_batch=8)

  def step_of(config):
    schedule, tx = train_lib.recipe_optimizer(config, plan,
                                              variables['params'], model)
    state = train_lib.new_state(variables, tx, use_ema=True)
    return state, train_lib.make_train_step(config, model, tx, schedule,
                                            donate=False)

  state, step = step_of(config)
  rng = np.random.default_rng(0)
  settings = mix.MixSettings.from_config(config.augmentation)
  batches = [dict(image=rng.integers(0, 256, (8, 32, 32, 3), np.uint8),
                  label=rng.integers(0, 7, 8),
                  **mix.draw(settings, seed=0, step=i, batch=8, height=32,
                             width=32)) for i in range(2)]
  for batch in batches:
    state, _ = step(state, batch)
  start = _flat(variables)
  for name, tree in (('params', state.params), ('ema', state.ema_params)):
    for path, value in _flat(tree).items():
      before = start['params', *path]
      if path[0] == 'head':
        assert np.abs(value - before).max() > 0, (name, path)
      else:
        np.testing.assert_array_equal(value, before, err_msg=str(path))
  for path, value in _flat(state.batch_stats).items():
    np.testing.assert_array_equal(value, start['batch_stats', *path])
  head = sum(v.size for p, v in _flat(variables['params']).items()
             if p[0] == 'head')
  moments = [x for x in jax.tree_util.tree_leaves(state.opt_state)
             if x.ndim > 0]
  assert sum(x.size for x in moments) == 2 * head

  def flops(freeze):
    config.freeze_backbone = freeze
    state, step = step_of(config)
    return step.lower(state, batches[0]).cost_analysis()['flops']

  assert flops(False) > 2 * flops(True)
  # On the 8 devices the step moves the head's gradient and a few metrics:
  # no backbone gradient, no BatchNorm statistics (the backbone runs in
  # evaluation mode).
  config.freeze_backbone = True
  mesh = sharding.make_mesh()
  schedule, tx = train_lib.recipe_optimizer(config, plan, variables['params'],
                                            model)
  step = train_lib.make_train_step(config, model, tx, schedule, mesh=mesh,
                                   donate=False)
  split = sharding.batch_sharding(mesh)
  batch = dict(image=np.zeros((16, 32, 32, 3), np.uint8),
               label=np.zeros(16, np.int32),
               **mix.draw(settings, seed=0, step=0, batch=16, height=32,
                          width=32))
  moved = hlo.collectives(step.lower(
      jax.eval_shape(lambda: train_lib.new_state(variables, tx, True)),
      {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=split)
       for k, v in batch.items()}).compile().as_text())
  assert {kind for kind, _ in moved} == {'all-reduce'}, moved
  assert head <= sum(size for _, size in moved) <= head + 64, (moved, head)


def test_bicubic_resize_is_torchs():
  """``F.interpolate(mode='bicubic')`` of a 13 x 13 x 3 table (window 7) to
  23 x 23 (window 12), saved from torch 2.13 (tests/data): equal to within
  torch's float32 rounding (ours is computed in float64; 2.2e-6 at most on
  N(0, 1) values), while ``jax.image.resize``'s bicubic (Keys' a = -0.5)
  is 0.27 away."""
  golden = np.load(reference_file('bicubic_resize_13_to_23.npz'))
  error = lambda got: np.abs(got - golden['output']).max()
  assert error(transfer.bicubic_resize(golden['input'], 23)) < 3e-6
  keys = jax.image.resize(golden['input'], (23, 23, 3), 'bicubic')
  assert error(np.asarray(keys)) > 0.1


def test_swin_at_another_window_gets_each_bias_table_resized(tmp_path):
  """ACmix-Swin weights of window 2 (64 px) fine-tuned at window 4 (128 px):
  every tensor loads bitwise but the relative-position tables, each
  resized from 3 x 3 to 7 x 7 per head (the Swin pipeline's rule); another
  number of heads is still a mismatch named by its keys."""
  fields = dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2))

  def abstract(window, side):
    model = models.build('acmix_swin_t', num_classes=5, window_size=window,
                         **fields)
    return model, jax.eval_shape(functools.partial(
        train_lib.init_variables, model, (1, side, side, 3), 0))

  _, source = abstract(2, 64)
  rng = np.random.default_rng(0)
  source = jax.tree_util.tree_map(
      lambda x: rng.normal(size=x.shape).astype(x.dtype), source)
  checkpoint.save_variables(tmp_path / 'w2', source, model='acmix_swin_t',
                            overrides=dict(fields, num_classes=5,
                                           window_size=2))
  config = tiny.get_config()
  config.update(init_from=str(tmp_path / 'w2'), model_name='acmix_swin_t')
  model, target = abstract(4, 128)
  loaded = _flat(transfer.initial_variables(config, model, target))
  tables = [p for p in loaded if p[-1] == 'relative_position_bias_table']
  assert len(tables) == 4
  for path, value in _flat(source).items():
    if path in tables:
      assert value.shape == (9, fields['num_heads'][int(path[1][7])])
      want = transfer.bicubic_resize(value.reshape(3, 3, -1), 7)
      np.testing.assert_allclose(loaded[path], want.reshape(49, -1),
                                 rtol=1e-6)
    else:
      np.testing.assert_array_equal(loaded[path], value)
  fields['num_heads'] = (1, 1, 2, 4)
  model, target = abstract(4, 128)
  with pytest.raises(transfer.TransferError,
                     match=r'relative_position_bias_table \(9, 2\) -> '
                     r'\(49, 4\)'):
    transfer.initial_variables(config, model, target)
