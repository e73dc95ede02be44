"""PyTorch weight import: parity with the official code, strict key checks,
the torch-free weight-file reader and the conversion command."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

from conftest import DATA, ROOT, reference_file
from glmix_jax import checkpoint, convert, models, weight_files

# fixture -> registered name; overrides come from the fixture's sidecar.
GLNET_FIXTURES = {
    'glnet_stl_tiny': 'glnet_stl',
    'glnet_stl_tiny_96x80': 'glnet_stl',
    'glnet_stl_paramslot_tiny': 'glnet_stl_paramslot',
    'glnet_4g_tiny': 'glnet_4g',
    'glnet_16g_tiny': 'glnet_16g',
    'glnet_4g_tklb_tiny': 'glnet_4g_tklb',
}


def load_fixture(name):
  arrays = np.load(reference_file(f'{name}.npz'))
  meta = json.loads(reference_file(f'{name}.json').read_text())
  kwargs = meta['constructor']['kwargs']
  overrides = dict(dims=tuple(kwargs['embed_dim']),
                   depths=tuple(kwargs['depth']),
                   num_classes=kwargs['num_classes'])
  state_dict = {k[3:]: arrays[k] for k in arrays.files if k.startswith('sd/')}
  return arrays, overrides, state_dict


def assert_matches(ours, ref, what):
  """The reference README's rule: max |ours - ref| <= 1e-5 * max(1, max|ref|)."""
  err = float(np.abs(np.asarray(ours, np.float64) - ref).max())
  tol = 1e-5 * max(1.0, float(np.abs(ref).max()))
  assert err <= tol, f'{what}: max abs error {err:.2e} > {tol:.2e}'


def assert_network_matches(model, variables, arrays, fixture):
  """Logits and the stem / stage maps of a converted network vs a fixture."""
  with jax.default_matmul_precision('highest'):
    logits, features = jax.jit(
        lambda v, x: model.apply(v, x, return_features=True))(
            variables, arrays['input_nhwc'])
  assert_matches(logits, arrays['logits'], f'{fixture} logits')
  assert_matches(features['stem'], arrays['feat/stem'], f'{fixture} stem')
  for i in range(4):
    assert_matches(features[f'stage{i + 1}'], arrays[f'feat/{i}'],
                   f'{fixture} stage {i + 1}')


@pytest.mark.parametrize('fixture', sorted(GLNET_FIXTURES))
def test_converted_weights_reproduce_official_outputs(fixture):
  arrays, overrides, state_dict = load_fixture(fixture)
  name = GLNET_FIXTURES[fixture]
  variables = convert.convert_state_dict(name, state_dict, **overrides)
  model = models.build(name, **overrides)
  assert_network_matches(model, variables, arrays, fixture)


@pytest.fixture(name='stl')
def _stl():
  return load_fixture('glnet_stl_tiny')


def test_extra_key_is_named(stl):
  _, overrides, state_dict = stl
  state_dict['stages.0.blocks.0.extra_gain'] = np.ones(3, np.float32)
  with pytest.raises(convert.ConversionError,
                     match=r'1 unexpected keys: stages\.0\.blocks\.0\.extra_gain'):
    convert.convert_state_dict('glnet_stl', state_dict, **overrides)


def test_missing_key_is_named(stl):
  _, overrides, state_dict = stl
  del state_dict['stages.2.blocks.1.relation_mha.in_proj_bias']
  with pytest.raises(convert.ConversionError,
                     match='1 Flax variables without a key: '
                     'params/stages_2/blocks_1/relation_mha/in_proj/bias'):
    convert.convert_state_dict('glnet_stl', state_dict, **overrides)


def test_wrong_shape_is_named(stl):
  _, overrides, state_dict = stl
  state_dict['head.weight'] = state_dict['head.weight'][:5]
  with pytest.raises(convert.ConversionError,
                     match=r'1 mis-shaped keys: head\.weight \(5, 128\)'):
    convert.convert_state_dict('glnet_stl', state_dict, **overrides)


def test_weights_of_another_variant_are_rejected(stl):
  _, overrides, state_dict = stl
  with pytest.raises(convert.ConversionError,
                     match='unexpected keys: .*Flax variables without a key'):
    convert.convert_state_dict('glnet_4g', state_dict, **overrides)


def test_released_16g_weights_are_the_ema_entry():
  assert convert.default_entry('glnet_16g') == 'model_ema'
  assert convert.default_entry('glnet_stl') == 'model'


def test_pth_reader_rebuilds_every_storage_layout_without_torch():
  content = weight_files.read_file(DATA / 'glnet_stl_tiny_checkpoint.pth')
  base = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
  extras = content['extras']
  np.testing.assert_array_equal(extras['permuted'], base.transpose(2, 0, 1))
  np.testing.assert_array_equal(extras['offset_view'],
                                base.ravel()[5:17].reshape(3, 4))
  assert extras['scalar'].shape == () and extras['scalar'] == 3.5
  np.testing.assert_array_equal(np.float32(extras['bfloat16']), [1.5, -2.25])
  assert extras['int64'].dtype == np.int64
  assert content['epoch'] == 7
  fixture = np.load(DATA / 'glnet_stl_tiny.npz')
  np.testing.assert_array_equal(content['model']['head.weight'],
                                fixture['sd/head.weight'])


def test_safetensors_and_npz_give_the_same_state_dict(tmp_path, stl):
  _, _, state_dict = stl
  save_file(state_dict, tmp_path / 'w.safetensors')
  from_st = weight_files.read_state_dict(tmp_path / 'w.safetensors')
  from_npz = weight_files.read_state_dict(DATA / 'glnet_stl_tiny.npz', 'sd')
  assert from_st.keys() == from_npz.keys() == state_dict.keys()
  for k in state_dict:
    np.testing.assert_array_equal(from_st[k], from_npz[k])


def test_unreadable_files_are_clear_errors(tmp_path):
  with pytest.raises(weight_files.WeightFileError, match='does not exist'):
    weight_files.read_file(tmp_path / 'nope.pth')
  (tmp_path / 'bad.pth').write_bytes(b'not a checkpoint')
  with pytest.raises(weight_files.WeightFileError, match='bad.pth'):
    weight_files.read_file(tmp_path / 'bad.pth')
  (tmp_path / 'w.ckpt').write_bytes(b'')
  with pytest.raises(weight_files.WeightFileError, match='unknown weight file'):
    weight_files.read_file(tmp_path / 'w.ckpt')
  with pytest.raises(weight_files.WeightFileError, match="entry 'model_ema'"):
    weight_files.read_state_dict(DATA / 'glnet_stl_tiny_checkpoint.pth',
                                 'model_ema')


def run_convert(*args):
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  return subprocess.run([sys.executable, '-m', 'glmix_jax.convert', *args],
                        capture_output=True, text=True, env=env, cwd=ROOT,
                        check=False)


def test_convert_command_writes_a_loadable_checkpoint_and_never_overwrites(
    tmp_path, stl):
  arrays, overrides, _ = stl
  workdir = tmp_path / 'ckpt'
  args = ['--model=glnet_stl', f'--checkpoint={DATA}/glnet_stl_tiny_checkpoint.pth',
          f'--workdir={workdir}', f'--overrides={json.dumps(overrides)}']
  done = run_convert(*args)
  assert done.returncode == 0, done.stderr
  assert 'Converted' in done.stdout
  model, variables = checkpoint.load_variables(workdir)
  with jax.default_matmul_precision('highest'):
    logits = jax.jit(model.apply)(variables, arrays['input_nhwc'])
  assert_matches(logits, arrays['logits'], 'logits after convert command')

  before = sorted(str(p.relative_to(workdir)) for p in workdir.rglob('*'))
  again = run_convert(*args)
  assert again.returncode == 1
  assert again.stderr.strip().splitlines()[-1].startswith('error: ')
  assert 'not empty' in again.stderr
  assert sorted(str(p.relative_to(workdir))
                for p in workdir.rglob('*')) == before


@pytest.mark.parametrize('args,message', [
    (['--model=glnet_stl', '--checkpoint=/nonexistent/w.pth'], 'does not exist'),
    (['--model=glnet_xl', '--checkpoint=tests/data/glnet_stl_tiny.npz',
      '--entry=sd'], 'Unknown model'),
    (['--model=glnet_stl', '--checkpoint=tests/data/glnet_stl_tiny.npz',
      '--entry=sd'], 'mis-shaped keys: downsample_layers.0.0.weight'),
])
def test_convert_command_bad_input_is_one_clear_line(tmp_path, args, message):
  done = run_convert(*args, f'--workdir={tmp_path / "out"}')
  assert done.returncode == 1
  assert 'Traceback' not in done.stderr
  assert message in done.stderr
  assert not (tmp_path / 'out').exists()
