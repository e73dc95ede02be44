"""The recipe configs: each builds its model and carries the paper's recipe."""

import functools
import importlib

import pytest

from configs import common
from glmix_jax import models

# Drop path per size, from the official GLMix README.
GLNET_CONFIGS = {'glnet_stl': 0.1, 'glnet_4g': 0.15, 'glnet_9g': 0.3,
                 'glnet_16g': 0.4}
# (config file, argument): every recipe a user can name.
RECIPES = {
    **{name: ('glnet', f'variant={name[6:]}') for name in GLNET_CONFIGS},
    'acmix_swin_t': ('acmix_swin', 'variant=t'),
    'acmix_swin_s': ('acmix_swin', 'variant=s'),
    'acmix_resnet50': ('acmix_resnet50', None),
}


def recipe(name, *args):
  """The config of model ``name``'s recipe, with further config arguments."""
  file, arg = RECIPES[name]
  return importlib.import_module(f'configs.{file}').get_config(
      ','.join(a for a in (arg, *args) if a) or None)


@pytest.mark.parametrize('name', sorted(GLNET_CONFIGS))
def test_glnet_config_is_the_official_recipe(name):
  config = recipe(name)
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


def test_glnet_stl_file_is_the_stl_variant():
  from configs import glnet, glnet_stl  # pylint: disable=g-import-not-at-top
  assert glnet_stl.get_config() == glnet.get_config()
  assert glnet_stl.get_config() == glnet.get_config('variant=stl')
  assert glnet_stl.get_config('runlocal') == glnet.get_config('runlocal')
  with pytest.raises(ValueError, match="Unknown config argument 'variant'"):
    glnet_stl.get_config('variant=4g')


def test_memory_options_reach_the_model_from_the_command_line():
  config = recipe('glnet_16g')
  config.model.update(remat='full', scan_blocks=True)  # --config.model.remat=
  model = models.build(config.model_name, **config.model)
  assert (model.remat, model.scan_blocks) == ('full', True)


# ACmix recipes: drop path of the Swin configs (ACmix
# Swin-Transformer/configs/acmix_swin_*.yaml), and the schedule / decay rule
# that glmix_jax.optim implements for each family.
ACMIX_CONFIGS = {'acmix_swin_t': 0.2, 'acmix_swin_s': 0.3,
                 'acmix_resnet50': 0.0}


@pytest.mark.parametrize('name', sorted(ACMIX_CONFIGS))
def test_acmix_config_is_the_official_recipe(name):
  config = recipe(name)
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


@pytest.mark.parametrize('name', sorted(RECIPES))
def test_runlocal_shrinks_any_config_to_the_synthetic_set(name):
  full, local = recipe(name), recipe(name, 'runlocal')
  assert local.model_name == full.model_name
  assert local.data.synthetic.image_size == full.data.image_size
  assert local.data.num_classes == 10 and local.global_batch_size == 16
  assert local.total_steps == 20 and local.model.dtype == 'float32'
  assert local.evals.val.split == 'train[90%:]'
  models.build(local.model_name, **local.model)
  with pytest.raises(ValueError, match="Unknown config argument 'runfast'"):
    recipe(name, 'runfast')


def test_config_arguments_take_their_defaults_types():
  args = common.parse_arg('variant=4g,runlocal,steps=7', variant='stl',
                          runlocal=False, steps=0, fast=False)
  assert args.to_dict() == dict(variant='4g', runlocal=True, steps=7,
                                fast=False)
  assert common.parse_arg('runlocal=False', runlocal=True).runlocal is False
  assert common.parse_arg(None, variant='stl').variant == 'stl'
  for arg, message in [('steps=x', "steps='x' is not of type int"),
                       ('steps', "'steps' needs a value"),
                       ('fast=yes', "'fast' is True or False"),
                       ('steps=1,steps=2', "'steps' is given twice"),
                       ('slow', "Unknown config argument 'slow'; known: "
                        'fast, steps')]:
    with pytest.raises(ValueError, match=message):
      common.parse_arg(arg, steps=0, fast=False)


@pytest.mark.parametrize('file,known', [('glnet', '16g'),
                                        ('acmix_swin', 's')])
def test_an_unknown_variant_lists_the_known_ones(file, known):
  module = importlib.import_module(f'configs.{file}')
  with pytest.raises(ValueError, match=f'Unknown .* variant .*{known}'):
    module.get_config('variant=xl')


@pytest.mark.parametrize('name', sorted(RECIPES))
def test_every_recipe_has_the_imagenet_evaluations(name):
  evals = recipe(name).evals
  assert {n: (e.dataset, e.split, e.every_steps) for n, e in evals.items()
          } == {'val': ('', 'validation', 0),
                'v2': ('imagenet_v2', 'test', -1),
                'real': ('imagenet2012_real', 'validation', -1),
                'fewshot': ('', 'validation', -1)}
  assert (evals.fewshot.type, evals.fewshot.train_split, evals.fewshot.shots,
          evals.fewshot.l2_reg) == ('fewshot', 'train', (1, 5, 10, 25), 1024)


def test_finetune_config_reads_like_the_dataset_table():
  from configs import finetune  # pylint: disable=g-import-not-at-top
  config = finetune.get_config('model=acmix_swin_t,dataset=tf_flowers,'
                               'image_size=384,init_from=/runs/w,linear_probe')
  assert config.model_name == 'acmix_swin_t' and config.data.num_classes == 0
  # Swin's 384 px windows, a size every stage tiles.
  assert config.model.window_size == 12 and config.data.image_size == 384
  model = models.build(config.model_name, num_classes=5, **config.model)
  assert model.size_problem(384, 384) is None
  assert (config.data.train_split, config.evals.val.split) == (
      'train[:90%]', 'train[90%:]')
  assert set(config.evals) == {'val', 'fewshot'}
  assert config.evals.fewshot.train_split == 'train[:90%]'
  assert (config.init_from, config.init_head, config.freeze_backbone) == (
      '/runs/w', 'reinit', True)
  config = finetune.get_config('model=glnet_4g,dataset=my_folder')
  assert (config.data.train_split, config.evals.val.split) == (
      'train', 'validation')
  assert config.optimizer.lr == pytest.approx(2e-3 / 10 * 512 / 2048)
  assert (config.optimizer.lr_batch_size, config.optimizer.layer_decay,
          config.global_batch_size, config.freeze_backbone) == (
              512, 0.8, 512, False)
  assert 'window_size' not in config.model
  assert finetune.get_config('model=acmix_resnet50').data.dataset == 'cifar10'
  with pytest.raises(ValueError, match="No recipe for model 'resnet50'"):
    finetune.get_config('model=resnet50')


@pytest.mark.parametrize('name', ['glnet_stl', 'acmix_resnet50',
                                  'acmix_swin_t', 'demo', 'tiny'])
def test_resume_allows_only_execution_fields_to_change(name):
  from glmix_jax import resume  # pylint: disable=g-import-not-at-top
  config = (recipe(name) if name in RECIPES else
            importlib.import_module(f'configs.{name}').get_config())
  saved = resume.as_saved(config)
  flat = resume._flat(saved)  # pylint: disable=protected-access
  # Every field a resume may change is a field of the recipe (no stale name).
  assert resume.EXECUTION_FIELDS <= flat.keys() | {'model.remat',
                                                    'model.scan_blocks'}
  changed = config.copy_and_resolve_references()
  changed.update(log_steps=7, checkpoint_steps=9, max_bad_steps=3,
                 mesh_shape=(2, 4))
  changed.data.update(data_dir='/elsewhere', num_threads=3)
  changed.update(eval_batch_size=8)  # evaluation never changes the state
  changed.evals.val.update(split='validation[:10%]', every_steps=5)
  assert resume.changed_fields(saved, resume.as_saved(changed)) == []
  changed.optimizer.lr = 1.0
  changed.augmentation.mixup_alpha = 0.3
  assert resume.changed_fields(saved, resume.as_saved(changed)) == [
      ('augmentation.mixup_alpha', saved['augmentation']['mixup_alpha'], 0.3),
      ('optimizer.lr', saved['optimizer']['lr'], 1.0)]
  del saved['seed']  # a run saved by code without that field
  assert ('seed', '(absent)', config.seed) in resume.changed_fields(
      saved, resume.as_saved(config))


def test_runs_saved_before_fine_tuning_existed_still_resume():
  """A run saved by code without the init_* fields started from scratch: it
  resumes with their from-scratch values, and not as a fine-tuning run; its
  old evaluation fields (eval_steps, data.eval_split, no evals) do not stop
  it."""
  from glmix_jax import resume  # pylint: disable=g-import-not-at-top
  config = recipe('glnet_stl')
  saved = resume.as_saved(config)
  for field in resume.ADDED_FIELDS:
    *blocks, name = field.split('.')
    functools.reduce(dict.__getitem__, blocks, saved).pop(name)
  saved.update(eval_steps=5000)  # evaluation fields such runs also had
  saved['data']['eval_split'] = 'validation'
  for field in ('eval_batch_size',):
    saved.pop(field)
  del saved['evals']
  assert resume.changed_fields(saved, resume.as_saved(config)) == []
  config.init_from = '/runs/pretrained'
  assert resume.changed_fields(saved, resume.as_saved(config)) == [
      ('init_from', '', '/runs/pretrained')]
