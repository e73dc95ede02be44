"""The recipe configs: each builds its model and carries the paper's recipe."""

import importlib

import pytest

from glmix_jax import models

# Official README drop-path rates (spec glnet.md §2).
GLNET_CONFIGS = {'glnet_stl': 0.1, 'glnet_4g': 0.15, 'glnet_9g': 0.3,
                 'glnet_16g': 0.4}


@pytest.mark.parametrize('name', sorted(GLNET_CONFIGS))
def test_glnet_config_is_the_official_recipe(name):
  config = importlib.import_module(f'configs.{name}').get_config()
  assert config.model_name == name
  model = models.build(config.model_name, **config.model)
  assert model.drop_path_rate == GLNET_CONFIGS[name]
  assert config.total_epochs == 300 and config.warmup_epochs == 5
  assert config.global_batch_size == 2048
  opt = config.optimizer
  assert (opt.name, opt.lr, opt.min_lr, opt.weight_decay) == (
      'adamw', 2e-3, 1e-5, 0.05)
  assert (opt.b1, opt.b2, opt.eps, opt.grad_clip_norm) == (0.9, 0.999, 1e-8, 5.0)
  assert opt.weight_decay_rule == 'convnextv2'
  assert config.ema_decay == 0.9999
  aug = config.augmentation
  assert aug.randaugment == 'rand-m9-mstd0.5-inc1'
  assert (aug.mixup_alpha, aug.cutmix_alpha, aug.mix_switch_prob) == (0.8, 1.0,
                                                                      0.5)
  assert (aug.label_smoothing, aug.random_erasing) == (0.1, 0.25)
  assert aug.label_smoothing_spread == 'eps_over_k'
  assert config.data.image_size == 224 and config.data.eval_crop_pct == 0.875
  assert (model.remat, model.scan_blocks) == ('none', False)


def test_memory_options_reach_the_model_from_the_command_line():
  config = importlib.import_module('configs.glnet_16g').get_config()
  config.model.update(remat='full', scan_blocks=True)  # --config.model.remat=
  model = models.build(config.model_name, **config.model)
  assert (model.remat, model.scan_blocks) == ('full', True)


# ACmix recipes (spec acmix.md §7): drop path per README, and the schedule /
# decay rule that glmix_jax.optim implements for each family.
ACMIX_CONFIGS = {'acmix_swin_t': 0.2, 'acmix_swin_s': 0.3,
                 'acmix_resnet50': 0.0}


@pytest.mark.parametrize('name', sorted(ACMIX_CONFIGS))
def test_acmix_config_is_the_official_recipe(name):
  config = importlib.import_module(f'configs.{name}').get_config()
  assert config.model_name == name
  model = models.build(config.model_name, **config.model)
  assert model.drop_path_rate == ACMIX_CONFIGS[name]
  opt = config.optimizer
  assert opt.schedule in ('timm_cosine', 'warmup_cosine')
  if name.startswith('acmix_swin'):
    assert (config.total_epochs, config.warmup_epochs) == (300, 20)
    assert config.global_batch_size == 1024
    assert (opt.name, opt.lr, opt.warmup_lr, opt.min_lr) == (
        'adamw', 1e-3, 1e-6, 1e-5)
    assert (opt.weight_decay, opt.weight_decay_rule, opt.grad_clip_norm) == (
        0.05, 'swin', 5.0)
    assert config.augmentation.repeated_augmentation == 1
  else:
    assert (config.total_epochs, config.warmup_epochs) == (90, 5)
    assert config.global_batch_size == 128
    assert (opt.name, opt.lr, opt.warmup_lr, opt.momentum) == (
        'sgd', 0.1, 0.025, 0.9)
    assert (opt.weight_decay, opt.weight_decay_rule) == (1e-4, 'all')
    assert config.augmentation.label_smoothing == 0.1
    assert config.augmentation.label_smoothing_spread == 'eps_over_k_minus_1'


@pytest.mark.parametrize('name', sorted(GLNET_CONFIGS) + [
    'acmix_resnet50', 'acmix_swin_t', 'acmix_swin_s'])
def test_runlocal_shrinks_any_config_to_the_synthetic_set(name):
  module = importlib.import_module(f'configs.{name}')
  full, local = module.get_config(), module.get_config('runlocal')
  assert local.model_name == full.model_name
  assert local.data.synthetic.image_size == full.data.image_size
  assert local.data.num_classes == 10 and local.global_batch_size == 16
  assert local.total_steps == 20 and local.model.dtype == 'float32'
  models.build(local.model_name, **local.model)
  with pytest.raises(ValueError, match='Unknown config argument'):
    module.get_config('runfast')


@pytest.mark.parametrize('name', ['glnet_stl', 'acmix_resnet50',
                                  'acmix_swin_t', 'demo', 'tiny'])
def test_resume_allows_only_execution_fields_to_change(name):
  from glmix_jax import resume  # pylint: disable=g-import-not-at-top
  config = importlib.import_module(f'configs.{name}').get_config()
  saved = resume.as_saved(config)
  flat = resume._flat(saved)  # pylint: disable=protected-access
  # Every field a resume may change is a field of the recipe (no stale name).
  assert resume.EXECUTION_FIELDS <= flat.keys() | {'model.remat',
                                                    'model.scan_blocks'}
  changed = config.copy_and_resolve_references()
  changed.update(log_steps=7, checkpoint_steps=9, max_bad_steps=3,
                 mesh_shape=(2, 4))
  changed.data.update(data_dir='/elsewhere', num_threads=3)
  assert resume.changed_fields(saved, resume.as_saved(changed)) == []
  changed.optimizer.lr = 1.0
  changed.augmentation.mixup_alpha = 0.3
  assert resume.changed_fields(saved, resume.as_saved(changed)) == [
      ('augmentation.mixup_alpha', saved['augmentation']['mixup_alpha'], 0.3),
      ('optimizer.lr', saved['optimizer']['lr'], 1.0)]
  del saved['seed']  # a run saved by code without that field
  assert ('seed', '(absent)', config.seed) in resume.changed_fields(
      saved, resume.as_saved(config))
