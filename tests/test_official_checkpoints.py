"""Checkpoints as the official training scripts save them convert as they are.

Each file is written (tests/torch_files.py, no torch) in the layout of one
official script, around the weights of an official-code fixture, with the
entries a reader must get past: optimizer, scaler and scheduler state, EMA
weights, pickled argparse / OmegaConf / yacs objects of classes not installed
here, tensors saved from a GPU, DataParallel's ``module.`` prefix. Converted
without ``--entry``, each reproduces the fixture's logits and feature maps.
"""

import argparse
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import test_acmix
import test_convert
import torch_files
from conftest import ROOT
from glmix_jax import checkpoint, convert, models, weight_files

CfgNode = torch_files.stand_in('yacs.config', 'CfgNode', dict)
DictConfig = torch_files.stand_in('omegaconf.dictconfig', 'DictConfig')
ContainerMetadata = torch_files.stand_in('omegaconf.base', 'ContainerMetadata')
AnyNode = torch_files.stand_in('omegaconf.nodes', 'AnyNode')


def _yacs_config() -> CfgNode:
  """The Swin pipeline's config: nested CfgNodes with their own attribute."""
  model = CfgNode(TYPE='swin_acmix', NAME='acmix_swin_tiny_patch4_window7_224',
                  DROP_PATH_RATE=0.2)
  config = CfgNode(MODEL=model, AMP_OPT_LEVEL='O1', OUTPUT='output/acmix')
  for node in (model, config):
    node.__dict__['_CfgNode__immutable'] = True
  return config


def _hydra_args() -> DictConfig:
  """main_tklb.py's args: an OmegaConf DictConfig (hydra), with its nodes."""
  args = DictConfig()
  args.__dict__.update(
      _metadata=ContainerMetadata(), _parent=None,
      _content={'lr': AnyNode(), 'model': AnyNode()})
  args._content['lr'].__dict__['_val'] = 1e-3
  return args


def main_cx2(arrays, ema_arrays, args):
  """GLMix main_cx2.py / main_tklb.py: ConvNeXt-V2 utils.save_model."""
  return {'model': torch_files.state_dict(arrays),
          'optimizer': torch_files.adamw_state(arrays, 4e-3),
          'epoch': 299,
          'scaler': {'scale': 65536.0, 'growth_factor': 2.0,
                     'backoff_factor': 0.5, 'growth_interval': 2000,
                     '_growth_tracker': 17},
          'args': args,
          'model_ema': torch_files.state_dict(ema_arrays)}


def swin_save_checkpoint(arrays):
  """ACmix Swin-Transformer/utils.py save_checkpoint (AMP on)."""
  return {'model': torch_files.state_dict(arrays),
          'optimizer': torch_files.adamw_state(arrays, 1e-3),
          'lr_scheduler': {'t_initial': 300, 'lr_min': 1e-5,
                           'base_values': [1e-3]},
          'max_accuracy': 81.2, 'epoch': 299, 'config': _yacs_config(),
          'amp': {'loss_scaler0': {'loss_scale': 65536.0, 'unskipped': 12}}}


def resnet_main(arrays):
  """ACmix ResNet/main.py save_checkpoint: a DataParallel model on GPU."""
  return {'epoch': 300, 'arch': 'ACmix_ResNet',
          'state_dict': torch_files.state_dict(arrays, prefix='module.',
                                               device='cuda:0'),
          'best_acc1': torch_files.Tensor(np.float32([77.6]), 'cuda:0'),
          'optimizer': {'state': {i: {'momentum_buffer': torch_files.Tensor(
              np.zeros_like(v), 'cuda:0')} for i, v in enumerate(
                  arrays.values())},
                        'param_groups': [{'lr': 0.1, 'momentum': 0.9}]}}


def _perturbed(arrays):
  """EMA weights that differ from the model's (so a wrong pick shows)."""
  return {k: v + np.float32(0.5) if v.dtype == np.float32 else v
          for k, v in arrays.items()}


def _glnet(fixture):
  arrays, overrides, state_dict = test_convert.load_fixture(fixture)
  return arrays, overrides, state_dict


def _acmix(fixture, overrides):
  arrays, _, state_dict = test_acmix.load_fixture(fixture)
  return arrays, overrides, state_dict


LAYOUTS = {
    # name: (fixture loader, model, file name, layout)
    'main_cx2': (lambda: _glnet('glnet_stl_tiny'), 'glnet_stl',
                 'checkpoint-best.pth',
                 lambda sd: main_cx2(sd, _perturbed(sd), argparse.Namespace(
                     model='glnet_stl', lr=4e-3, finetune=''))),
    'main_tklb': (lambda: _glnet('glnet_4g_tklb_tiny'), 'glnet_4g_tklb',
                  'checkpoint-299.pth',
                  lambda sd: main_cx2(sd, _perturbed(sd), _hydra_args())),
    'main_cx2_16g_ema': (lambda: _glnet('glnet_16g_tiny'), 'glnet_16g',
                         'checkpoint-best-ema.pth',
                         lambda sd: main_cx2(_perturbed(sd), sd,
                                             argparse.Namespace(lr=4e-3))),
    'swin_save_checkpoint': (lambda: _acmix('acmix_swin_tiny',
                                            test_acmix.TINY_SWIN),
                             'acmix_swin_t', 'ckpt_epoch_299.pth',
                             swin_save_checkpoint),
    'resnet_main': (lambda: _acmix('acmix_resnet_tiny',
                                   test_acmix.TINY_RESNET),
                    'acmix_resnet50', 'checkpoint.pth.tar', resnet_main),
}


@pytest.mark.parametrize('layout', sorted(LAYOUTS))
def test_official_checkpoint_converts_without_entry(tmp_path, layout):
  """The weights are found (``model``; the EMA for glnet_16g, whose release
  is the EMA; ``state_dict`` without its ``module.`` prefix) and reproduce
  the official outputs."""
  load, name, filename, write = LAYOUTS[layout]
  arrays, overrides, state_dict = load()
  path = tmp_path / filename
  torch_files.save(write(state_dict), path)
  read = weight_files.read_state_dict(
      path, default_entry=convert.default_entry(name))
  assert sorted(read) == sorted(state_dict)
  variables = convert.convert_state_dict(name, read, **overrides)
  test_convert.assert_network_matches(models.build(name, **overrides),
                                      variables, arrays, layout)


def test_entry_chooses_the_ema_weights(tmp_path):
  _, _, state_dict = _glnet('glnet_stl_tiny')
  ema = _perturbed(state_dict)
  path = tmp_path / 'checkpoint-best.pth'
  torch_files.save(main_cx2(state_dict, ema, argparse.Namespace()), path)
  for entry, want in ((None, state_dict), ('model', state_dict),
                      ('model_ema', ema)):
    read = weight_files.read_state_dict(path, entry)
    for k, v in want.items():
      np.testing.assert_array_equal(read[k], v)


def test_a_checkpoint_without_weights_names_the_entries_tried(tmp_path):
  path = tmp_path / 'optimizer_only.pth'
  arrays = {'w': np.ones(3, np.float32)}
  torch_files.save({'optimizer': torch_files.adamw_state(arrays, 1e-3),
                    'epoch': 3, 'config': _yacs_config()}, path)
  with pytest.raises(weight_files.WeightFileError,
                     match=r'no state dict under any of the entries model, '
                     r'state_dict, model_ema, state_dict_ema; name the entry '
                     r'.* --entry \(top-level keys: optimizer, epoch, config\)'):
    weight_files.read_state_dict(path)


def test_convert_command_reads_resnet_main_checkpoint_pth_tar(tmp_path):
  """The README's command on what ResNet/main.py saves: no --entry, the
  module. prefix dropped, a loadable model checkpoint out."""
  arrays, overrides, state_dict = _acmix('acmix_resnet_tiny',
                                         test_acmix.TINY_RESNET)
  path = tmp_path / 'checkpoint.pth.tar'
  torch_files.save(resnet_main(state_dict), path)
  workdir = tmp_path / 'acmix_resnet50'
  done = subprocess.run(
      [sys.executable, '-m', 'glmix_jax.convert', '--model=acmix_resnet50',
       f'--checkpoint={path}', f'--workdir={workdir}',
       f'--overrides={json.dumps(overrides)}'],
      capture_output=True, text=True, cwd=ROOT, check=False,
      env=dict(os.environ, PYTHONPATH=str(ROOT)))
  assert done.returncode == 0, done.stderr[-2000:]
  assert f'({len(state_dict)} tensors)' in done.stdout
  model, variables = checkpoint.load_variables(workdir)
  test_convert.assert_network_matches(model, variables, arrays,
                                      'resnet_main via the command')
