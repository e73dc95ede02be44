"""The summary command: exact parameter and MAC counts of the official models."""

import os
import subprocess
import sys

import pytest

from conftest import ROOT
from glmix_jax.models import summary

# torch FlopCounterMode totals of the official code at 224x224 (conv + matmul
# + SDPA), and the "everything counted" figure (fvcore + attention) in GMACs,
# both measured on rayleizhu/GLMix 3c93dbf models/glnet.py.
OFFICIAL_MACS = {
    'glnet_stl': (4_347_432_960, 4.365),
    'glnet_stl_paramslot': (4_347_432_960, 4.363),
    'glnet_4g': (4_482_122_752, 4.507),
    'glnet_9g': (9_588_155_904, 9.626),
    'glnet_16g': (16_604_170_240, 16.655),
    'glnet_4g_tklb': (4_507_210_752, 4.533),
    'glnet_9g_tklb': (9_625_787_904, 9.664),
}


# ACmix: FlopCounterMode (conv/matmul) plus the 7x7 window attention's
# element-wise MACs, in GMACs, measured on LeapLabTHU/ACmix 81dddb6.
# ResNet-26/38 and Swin-S differ from these two only in depth.
ACMIX_MACS = {'acmix_resnet50': 3.502, 'acmix_swin_t': 4.645}


@pytest.mark.parametrize('name', sorted(ACMIX_MACS))
def test_acmix_macs_within_one_percent_of_official(name):
  # The standard forms are counted: dep_conv as the grouped conv it is (not
  # the CPU's shifted multiply-adds), the window attention's products.
  macs = summary.summarize(name)['macs']
  assert abs(macs['total'] / 1e9 - ACMIX_MACS[name]) < 0.01 * ACMIX_MACS[name]


# paramslot has STL's MACs; 9G / 9G-tklb are 4G / 4G-tklb at other widths.
@pytest.mark.parametrize('name', ['glnet_stl', 'glnet_4g', 'glnet_16g',
                                  'glnet_4g_tklb'])
def test_macs_equal_official_count(name):
  exact, everything = OFFICIAL_MACS[name]
  macs = summary.summarize(name)['macs']['total']
  assert macs == exact
  assert abs(macs / 1e9 - everything) / everything < 0.01


def test_macs_follow_the_input_size():
  # GLMix is linear in the pixels; the stage-4 MHSA on 3x2 tokens is tiny.
  small = summary.summarize('glnet_stl', (96, 80))
  assert small['features']['stage4'] == (1, 3, 2, 768)
  assert 0.15 < small['macs']['total'] / OFFICIAL_MACS['glnet_stl'][0] < 0.25


def test_summary_command_prints_params_gmacs_and_shapes():
  done = subprocess.run(
      [sys.executable, '-m', 'glmix_jax.models.summary', '--model=glnet_4g',
       '--image_size=64x96'], capture_output=True, text=True, cwd=ROOT,
      env=dict(os.environ, PYTHONPATH=str(ROOT)), check=False)
  assert done.returncode == 0, done.stderr
  assert '27,001,593' in done.stdout
  assert 'at 64x96' in done.stdout
  assert 'stage3   (1, 4, 6, 256)' in done.stdout
