"""The notebooks run top to bottom (quick settings: the tiny config) and are
committed without outputs."""

import json

import nbclient
import nbformat
import pytest

from conftest import ROOT, subprocess_env
from glmix_jax import checkpoint

NOTEBOOKS = ROOT / 'notebooks'


def execute(name: str, monkeypatch, **env) -> nbformat.NotebookNode:
  """Runs every cell in a fresh kernel (which inherits the environment) from
  the notebooks folder, as Jupyter would; any error fails the test."""
  for key, value in subprocess_env(GLMIX_JAX_NOTEBOOK_QUICK='1',
                                   **env).items():
    monkeypatch.setenv(key, value)
  notebook = nbformat.read(NOTEBOOKS / f'{name}.ipynb', as_version=4)
  nbclient.NotebookClient(
      notebook, timeout=600, kernel_name='python3',
      resources={'metadata': {'path': str(NOTEBOOKS)}}).execute()
  return notebook


def outputs(notebook: nbformat.NotebookNode, kind: str) -> list:
  """The outputs of one MIME type (``'image/png'``, ``'text/plain'``) or the
  printed text (``'stream'``) of all cells, in order."""
  found = []
  for cell in notebook.cells:
    for output in cell.get('outputs', []):
      if kind == 'stream' and output.output_type == 'stream':
        found.append(output.text)
      elif kind in output.get('data', {}):
        found.append(output.data[kind])
  return found


def test_quickstart_loads_a_run_classifies_and_draws(tiny_run, monkeypatch):
  notebook = execute('quickstart', monkeypatch,
                     GLMIX_JAX_CHECKPOINT=str(tiny_run))
  printed = ''.join(outputs(notebook, 'stream'))
  assert 'glnet_stl' in printed and '30,296,786' in printed  # the model table
  assert 'acmix_swin_t' in printed
  assert f'loaded {tiny_run} step 12, EMA weights' in printed
  assert 'drew class 5: cross below the disc' in printed
  # The input crop, the slot maps, the ACmix rates.
  assert len(outputs(notebook, 'image/png')) == 3


def test_train_demo_trains_with_live_curves_and_draws(tmp_path, monkeypatch):
  notebook = execute('train_demo', monkeypatch,
                     GLMIX_JAX_WORKDIR=str(tmp_path))
  printed = ''.join(outputs(notebook, 'stream'))
  assert 'step 12/12' in printed and 'held-out top-1' in printed
  metrics = [json.loads(line) for line in
             (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert metrics[-1]['step'] == 12
  assert (tmp_path / 'sample.png').exists()
  assert len(outputs(notebook, 'image/png')) == 2  # curves, slot maps
  # The fine-tuning cell: both starts trained and scored.
  assert f'fine-tuned from {tmp_path}: held-out top-1' in printed
  assert 'fine-tuned from scratch: held-out top-1' in printed
  for start in ('demo', 'scratch'):
    assert checkpoint.saved_steps(tmp_path / f'finetune_from_{start}')[-1] == 4


@pytest.mark.parametrize('name', ['quickstart', 'train_demo'])
def test_notebook_is_committed_without_outputs(name):
  notebook = nbformat.read(NOTEBOOKS / f'{name}.ipynb', as_version=4)
  nbformat.validate(notebook)
  for cell in notebook.cells:
    if cell.cell_type == 'code':
      assert cell.outputs == [] and cell.execution_count is None, cell.source


def test_notebooks_share_one_setup_cell():
  # Each notebook must run alone on Colab, so the setup cell is repeated;
  # this keeps the copies equal.
  first_code = [
      next(c.source for c in nbformat.read(NOTEBOOKS / f'{name}.ipynb',
                                           as_version=4).cells
           if c.cell_type == 'code') for name in ('quickstart', 'train_demo')]
  assert first_code[0] == first_code[1]
