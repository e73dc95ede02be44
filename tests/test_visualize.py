"""The visualisation: checkpoints of both kinds, any image file, clear errors,
slot weights that are the softmaxes they claim to be, and the command."""

import logging
import subprocess
import sys

import jax
import jax.numpy as jnp
import matplotlib.cbook
import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, subprocess_env
from configs import demo, tiny
from glmix_jax import checkpoint, inference, models, visualize
from glmix_jax.models import acmix

# A real photograph that ships inside the matplotlib wheel: Grace Hopper,
# a U.S. Navy photograph, in the public domain.
PHOTO = matplotlib.cbook.get_sample_data('grace_hopper.jpg', asfileobj=False)
PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'


@pytest.fixture(scope='module', name='images')
def _images(tmp_path_factory):
  """The photo and synthetic files: grayscale and RGBA PNGs of odd sizes, a
  palette GIF, and a file that is no image."""
  folder = tmp_path_factory.mktemp('images')
  rng = np.random.default_rng(0)
  files = {'photo': PHOTO}
  for name, mode, size in (('gray.png', 'L', (37, 53)),
                           ('rgba.png', 'RGBA', (61, 29)),
                           ('palette.gif', 'P', (33, 33))):
    channels = {'L': 1, 'RGBA': 4, 'P': 1}[mode]
    pixels = rng.integers(0, 256, (size[1], size[0], channels), np.uint8)
    Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels).convert(
        mode).save(folder / name)
    files[name] = str(folder / name)
  (folder / 'notes.png').write_text('not an image, whatever its name says')
  files['not_an_image'] = str(folder / 'notes.png')
  return files


@pytest.fixture(scope='module', name='model_checkpoint')
def _model_checkpoint(tiny_run, tmp_path_factory):
  """The tiny run's raw weights as a model checkpoint (the kind convert
  writes)."""
  config = tiny.get_config()
  _, state = checkpoint.latest_train_state(tiny_run)
  return checkpoint.save_variables(
      tmp_path_factory.mktemp('model_checkpoint') / 'ckpt',
      {'params': state['params'], 'batch_stats': state['batch_stats']},
      model=config.model_name,
      overrides=dict(num_classes=config.data.num_classes,
                     **config.model.to_dict()))


def test_any_image_file_becomes_the_model_input(images):
  config = tiny.get_config()
  for name in ('photo', 'gray.png', 'rgba.png', 'palette.gif'):
    inputs, pixels = inference.load_image(images[name], config)
    assert inputs.shape == pixels.shape == (32, 32, 3), name
    assert inputs.dtype == np.float32 and pixels.dtype == np.uint8
  _, gray = inference.load_image(images['gray.png'], config)
  np.testing.assert_array_equal(gray[..., 0], gray[..., 2])  # replicated


def test_non_image_and_missing_files_are_clear_errors(images):
  config = tiny.get_config()
  with pytest.raises(ValueError, match='notes.png is not an image file'):
    inference.load_image(images['not_an_image'], config)
  with pytest.raises(FileNotFoundError, match='No image file'):
    inference.load_image(images['not_an_image'] + '.missing', config)


def test_both_checkpoint_kinds_load_the_same_weights(tiny_run,
                                                     model_checkpoint, images):
  config = tiny.get_config()
  inputs, _ = inference.load_image(images['photo'], config)
  from_run = inference.load_model(config, tiny_run, weights='raw')
  from_model = inference.load_model(config, model_checkpoint)
  assert 'step 12, raw weights' in from_run.source
  assert 'EMA' in inference.load_model(config, tiny_run).source
  np.testing.assert_allclose(
      inference.predict(from_run, inputs[None]).probabilities,
      inference.predict(from_model, inputs[None]).probabilities, rtol=1e-6)


def test_repeated_predictions_compile_once(model_checkpoint, images):
  config = tiny.get_config()
  inputs, _ = inference.load_image(images['photo'], config)
  inference._apply_with_intermediates.clear_cache()  # earlier tests' compile
  compiled = []  # jax.log_compiles's "Compiling jit(f) with ... shapes ..."
  handler = logging.Handler()
  handler.emit = lambda record: compiled.append(record.getMessage())
  logger = logging.getLogger('jax._src.interpreters.pxla')
  logger.addHandler(handler)
  try:
    with jax.log_compiles():
      for _ in range(3):  # a notebook re-running a cell: a fresh load each time
        inference.predict(inference.load_model(config, model_checkpoint),
                          inputs[None])
  finally:
    logger.removeHandler(handler)
  # the network is the one program that takes the image batch
  network = [m for m in compiled
             if m.startswith('Compiling') and 'float32[1,32,32,3]' in m]
  assert len(network) == 1, network


def test_slot_weights_are_softmaxes_on_each_block_grid(model_checkpoint,
                                                       images):
  config = tiny.get_config()
  inputs, _ = inference.load_image(images['photo'], config)
  prediction = inference.predict(
      inference.load_model(config, model_checkpoint), inputs[None])
  assert prediction.probabilities.shape == (1, 4)
  # tiny: GLMix in stages 0-2 (one block each) at strides 4, 8, 16; MHSA last.
  grids = {'stages.0.blocks.0': (8, 8), 'stages.1.blocks.0': (4, 4),
           'stages.2.blocks.0': (2, 2)}
  assert list(prediction.slots) == list(grids)
  for name, grid in grids.items():
    weights = prediction.slots[name]
    assert weights.clustering.shape == weights.dispatch.shape == (1, 64, *grid)
    np.testing.assert_allclose(weights.clustering.sum(axis=(2, 3)), 1,
                               rtol=1e-5)
    np.testing.assert_allclose(weights.dispatch.sum(axis=1), 1, rtol=1e-5)


def test_block_choice():
  names = ['stages.0.blocks.0', 'stages.0.blocks.1', 'stages.2.blocks.0',
           'stages.2.blocks.2']
  assert visualize.choose_blocks(names, '') == ['stages.0.blocks.1',
                                                'stages.2.blocks.2']
  assert visualize.choose_blocks(names, 'all') == names
  assert visualize.choose_blocks(names, '2.0, stages.0.blocks.0') == [
      'stages.2.blocks.0', 'stages.0.blocks.0']
  with pytest.raises(ValueError, match="No GLMix block '1.0'"):
    visualize.choose_blocks(names, '1.0')


def test_checkpoint_errors_name_the_problem(tiny_run, tmp_path):
  with pytest.raises(ValueError, match='does not fit the model of the config '
                     r'\(glnet_stl, 10 classes\).*of another shape'):
    inference.load_model(demo.get_config(), tiny_run)
  with pytest.raises(FileNotFoundError, match='is not a checkpoint'):
    inference.load_model(tiny.get_config(), tmp_path / 'nothing')


def test_acmix_path_rates_are_read_and_drawn(tmp_path):
  model = models.build('acmix_resnet26', num_classes=4)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))['params']
  params['layer3_1']['conv2']['rate1'] = jnp.array([0.8])
  rates = acmix.path_rates(params)
  assert list(rates)[:3] == ['layer1_0/conv2', 'layer2_0/conv2',
                             'layer2_1/conv2']
  assert len(rates) == 8 and rates['layer3_1/conv2'] == (
      pytest.approx(0.8), 0.5)
  png = visualize.png_bytes(visualize.rates_figure(rates))
  assert png.startswith(PNG_SIGNATURE)


def run_visualize(*flags):
  return subprocess.run(
      [sys.executable, '-m', 'glmix_jax.visualize', *flags],
      capture_output=True, text=True, cwd=ROOT, env=subprocess_env(),
      timeout=600, check=False)


def test_command_draws_the_slot_maps_of_a_photo(tiny_run, tmp_path):
  out = tmp_path / 'figures' / 'slots.png'
  done = run_visualize('--config=configs/tiny.py', f'--checkpoint={tiny_run}',
                       f'--image={PHOTO}', f'--out={out}', '--blocks=all',
                       '--slots=8')
  assert done.returncode == 0, done.stderr[-3000:]
  assert 'top classes: ' in done.stdout and f'wrote {out}' in done.stdout
  with Image.open(out) as figure:
    assert figure.format == 'PNG' and figure.width > 800


def test_command_error_is_one_line(tiny_run, images, tmp_path):
  # The in-process tests above cover the other errors; all reach the command
  # as these exception types, which cli.run turns into one line.
  out = tmp_path / 'x.png'
  done = run_visualize('--config=configs/tiny.py', f'--checkpoint={tiny_run}',
                       f'--image={images["not_an_image"]}', f'--out={out}')
  assert done.returncode == 1
  assert done.stderr.strip().splitlines()[-1].startswith(
      f'error: {images["not_an_image"]} is not an image file')
  assert 'Traceback' not in done.stderr and not out.exists()
