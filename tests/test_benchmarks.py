"""The benchmark scripts run end to end on a small model (their figures are
measured by hand and recorded in BENCHMARKS.md; here only that they run and
report what they claim)."""

import collections
import contextlib
import json
import pathlib
import subprocess
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import kernel_forms, profile_stages, throughput
from glmix_jax import models
from glmix_jax.models import kernels, summary


def test_throughput_reports_a_train_step(tmp_path, capsys):
  """Its JSON agrees with its arguments, with itself (images/s = batch / the
  median step, the one timed call's min = median = max), with the model
  (FLOPs from the exact MACs, memory from the state's size) and with its
  printed row."""
  out = tmp_path / 'small.json'
  throughput.main([
      '--models', 'glnet_stl', '--modes', 'train', '--batch', '2',
      '--size', '64',
      '--repeats', '1', '--matmul_size', '256', '--json', str(out),
      '--override', 'depths=(1, 1, 1, 1)',
      '--override', 'dims=(32, 64, 96, 128)'])
  report = json.loads(out.read_text())
  assert (report['batch'], report['size'], report['dtype'],
          report['repeats']) == (2, 64, 'float32', 1)
  assert report['overrides'] == dict(depths=[1, 1, 1, 1],
                                     dims=[32, 64, 96, 128])
  assert report['table_peak_flops'] is None  # a float32 run: no data sheet
  assert list(report['results']) == ['glnet_stl/train']
  result = report['results']['glnet_stl/train']
  assert list(result) == ['jax']  # no official run: no torch, no speed-up
  ours = result['jax']
  (step_s,) = ours['times_s']  # --repeats 1
  assert ours['median_s'] == ours['min_s'] == ours['max_s'] == step_s > 0
  assert ours['images_per_s'] == pytest.approx(2 / step_s, rel=1e-12)
  assert 0 < ours['compile_s'] and 0 < ours['compile_cpu_s']
  assert ours['device_peak_bytes'] is None  # the CPU reports none
  # MFU's numerator: forward + backward, three times the model's MACs
  model = summary.summarize('glnet_stl', 64, depths=(1, 1, 1, 1),
                            dims=(32, 64, 96, 128))
  assert ours['flops'] == 2 * 3 * model['macs']['total'] * 2  # x batch 2
  # Peak = arguments + outputs + temporaries - the donated state: beside the
  # temporaries, one train state (float32 parameters and AdamW's two
  # moments; BN statistics and the batch are a few KiB).
  state_bytes = 3 * 4 * model['params']
  beside_temp = ours['compiled_peak_bytes'] - ours['temp_bytes']
  assert state_bytes < beside_temp < 1.02 * state_bytes, (beside_temp,
                                                          state_bytes)
  (row,) = [l for l in capsys.readouterr().out.splitlines()
            if l.startswith('| glnet_stl | train |')]
  cells = [c.strip() for c in row.strip('|').split('|')]
  assert cells[2] == f'{ours["images_per_s"]:.2f}'
  assert cells[3] == f'{step_s:.3f} ({step_s:.3f}-{step_s:.3f})'
  assert cells[5] == f'{ours["compiled_peak_bytes"] / 2**20:.0f}'
  mfu = 100 * ours['flops'] / step_s / report['matmul_peak_flops']
  assert cells[6:8] == [f'{mfu:.1f}%', '-']


def test_benchmark_reports_rates_of_the_median_call_and_a_paired_speedup(
    monkeypatch):
  """With the official model beside ours (both faked: known seconds per
  call), each side's images/s is batch / its median call and the speed-up
  the median of the rounds' official / ours, as the row prints them; the
  drift between rounds makes that differ from the ratio of the medians."""
  ours_s = iter([9.0, 1.0, 1.0, 3.0, 3.0])  # first: the warm-up
  official_s = iter([9.0, 2.0, 2.2, 6.0, 5.4])  # rounds: 2, 2.2, 2, 1.8 x

  @contextlib.contextmanager
  def fake_official(*args, **kwargs):
    del args, kwargs
    yield dict(torch='2.x'), lambda: next(official_s)

  monkeypatch.setattr(throughput, 'prepare_jax', lambda *a, **k: (
      dict(compile_s=1.0, compile_cpu_s=1.0, compiled_peak_bytes=2**20,
           temp_bytes=0, flops=1e9), lambda: next(ours_s)))
  monkeypatch.setattr(throughput, 'timed', lambda call: call)
  monkeypatch.setattr(throughput, 'official_calls', fake_official)
  r = throughput.benchmark('glnet_stl', 'train', batch=8, size=64,
                           dtype='float32', repeats=4, overrides={},
                           torch_python='python', official='/official')
  assert r['jax']['times_s'] == [1.0, 1.0, 3.0, 3.0]
  assert r['jax']['median_s'] == 2.0 and r['jax']['images_per_s'] == 4.0
  assert r['torch']['torch'] == '2.x'
  assert r['torch']['median_s'] == pytest.approx(3.8)
  assert r['torch']['images_per_s'] == pytest.approx(8 / 3.8)
  assert r['speedup'] == pytest.approx(2.0)  # not 3.8 / 2 = 1.9
  row = throughput.format_row('glnet_stl', 'train', r, peak_flops=1e10)
  assert row.startswith('| glnet_stl | train | 4.00 | 2.000 (1.000-3.000) |')
  assert row.endswith('| 5.0% | - | 2.11 | 2.00x |')  # 1e9 / 2 s / 1e10


def test_calls_alternate_and_the_speedup_pairs_their_rounds():
  order = []

  def fake(name, seconds):
    def call():
      order.append(name)
      return next(seconds)
    return call

  # the machine slows down 3x halfway: paired rounds still give 2x
  ours = iter([9.0, 1.0, 1.0, 3.0, 3.0])  # first: the warm-up
  official = iter([9.0, 2.0, 2.0, 6.0, 6.0])
  timing = throughput.time_calls(
      dict(jax=fake('jax', ours), torch=fake('torch', official)), repeats=4)
  assert order == ['jax', 'torch'] * 5
  assert timing['jax']['times_s'] == [1.0, 1.0, 3.0, 3.0]
  assert timing['torch']['min_s'] == 2.0 and timing['torch']['max_s'] == 6.0
  assert throughput.paired_ratio(timing['torch'], timing['jax']) == 2.0


def test_accelerator_preset_sets_defaults_that_flags_override():
  args = throughput.parse_args(['--preset', 'accelerator', '--batch', '32'])
  assert args.models == ['glnet_stl', 'glnet_4g', 'acmix_resnet50',
                         'acmix_swin_t']
  assert (args.dtype, args.batch) == ('bfloat16', 32)
  assert throughput.parse_args([]).dtype == 'float32'


def test_data_sheet_peak_is_found_by_device_kind():
  device = lambda kind: type('Device', (), dict(device_kind=kind))
  assert throughput.table_peak_flops(device('NVIDIA H100 80GB HBM3')) == 989e12
  assert throughput.table_peak_flops(device('TPU v5 lite')) == 197e12
  assert throughput.table_peak_flops(device('TPU v5p')) == 459e12
  assert throughput.table_peak_flops(device('cpu')) is None


def test_kernel_forms_counts_a_models_kernel_calls_and_times_each_form():
  """The A/B table's call counts are the model's: one depthwise_conv call per
  depthwise kernel in its parameters ((k, k, 1, C)), one GELU per MLP and two
  LayerNorms per block; the kernels are themselves again afterwards; every
  form of a recorded call is timed, forward and forward + backward."""
  model = models.build('glnet_stl')
  shape = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0), shape)['params']
  depthwise = sum(x.ndim == 4 and x.shape[2] == 1
                  for x in jax.tree.leaves(params))
  on_platform, gelu = kernels._on_platform, kernels.gelu  # pylint: disable=protected-access

  calls = kernel_forms.model_calls('glnet_stl', 1, 64, 'float32')
  per_kernel = collections.Counter()
  for (kernel, _, _), n in calls.items():
    per_kernel[kernel] += n
  assert per_kernel == {'depthwise_conv': depthwise,
                        'gelu': sum(model.depths),
                        'layer_norm': 2 * sum(model.depths)}
  assert kernels._on_platform is on_platform and kernels.gelu is gelu  # pylint: disable=protected-access

  kernel, args, static = next(k for k in calls if k[0] == 'depthwise_conv')
  times = kernel_forms.time_forms(kernel, args, static, repeats=1,
                                  budget_s=0.1)
  assert set(times) == {'cpu', 'default'}
  assert all(t['forward'] > 0 and t['forward_backward'] > 0
             for t in times.values())


def test_kernel_forms_times_the_dep_conv_with_other_block_sizes(monkeypatch):
  """``--dep_conv_blocks``: each block size is its own CPU form, traced
  (forward and backward) with that many groups per block, and the default
  is back afterwards."""
  seen = []
  blocks = kernels._grouped_shift_conv_blocks  # pylint: disable=protected-access

  def spy(f, kernel, stride):
    seen.append(kernels.DEP_CONV_BLOCK_GROUPS)
    return blocks(f, kernel, stride)

  monkeypatch.setattr(kernels, '_grouped_shift_conv_blocks', spy)
  default = kernels.DEP_CONV_BLOCK_GROUPS
  args = (jax.ShapeDtypeStruct((1, 6, 6, 8, 9), jnp.float32),
          jax.ShapeDtypeStruct((3, 3, 9, 16), jnp.float32))
  times = kernel_forms.time_forms('grouped_shift_conv', args,
                                  (('stride', 1),), repeats=1, budget_s=0.1,
                                  dep_conv_blocks=(2, 8))
  assert set(times) == {'cpu', 'default', 'cpu, blocks of 2',
                        'cpu, blocks of 8'}
  assert set(seen) == {default, 2, 8}
  assert kernels.DEP_CONV_BLOCK_GROUPS == default


def test_profile_stages_times_the_models_own_parts(capsys):
  """The parts, run one after the other, are the model's forward: chained,
  they give its stage-4 map; every part gets a row."""
  overrides = dict(depths=(1, 1, 1, 1))
  programs, variables, last = profile_stages.part_programs(
      'glnet_stl', 2, 64, overrides)
  model = models.build('glnet_stl', **overrides)
  images = programs['total'][1]
  _, features = model.apply(variables, images, return_features=True)
  np.testing.assert_allclose(last, features['stage4'], rtol=1e-5, atol=1e-5)
  assert set(programs) == {*profile_stages.PARTS, 'total'}

  profile_stages.main(['--size=64', '--batch=1', '--repeats=1',
                       '--override=depths=(1, 1, 1, 1)'])
  rows = [line.split(' | ')[0].strip('| ')
          for line in capsys.readouterr().out.splitlines()[3:]]
  assert rows == [*profile_stages.PARTS, 'rest', 'total']
  with pytest.raises(ValueError, match='not a plain GLNet'):
    profile_stages.part_programs('acmix_resnet50', 1, 64, {})


def test_profile_stages_blocks_are_each_stages_first_block(capsys):
  """Each block program runs its stage's first block only (stage 1 has two
  here): the later stages' single blocks give their stage's output, and a
  block's gradient reaches that block's parameters alone. The official
  block (faked) is asked for the same block and mode, and the table gets a
  row per block with the paired speed-ups."""
  overrides = dict(depths=(2, 1, 1, 1))
  programs, variables, _ = profile_stages.part_programs(
      'glnet_stl', 2, 64, overrides)
  blocks = profile_stages.block_programs('glnet_stl', programs, variables,
                                         overrides)
  assert list(blocks) == list(profile_stages.BLOCKS)
  for k, (forward, backward, x) in enumerate(blocks.values()):
    stage, stage_input = programs[f'stage{k + 1}']
    assert x is stage_input
    out, whole_stage = forward(variables, x), stage(variables, x)
    if k == 0:  # one of two blocks
      assert not np.allclose(out, whole_stage, atol=1e-3)
    else:
      np.testing.assert_allclose(out, whole_stage, rtol=1e-6, atol=1e-6)
    grads, dx = backward(variables['params'], x)
    assert dx.shape == x.shape and bool(jnp.all(jnp.isfinite(dx)))
    touched = {path[:2] for path, g in
               flax.traverse_util.flatten_dict(grads).items()
               if bool(jnp.any(g != 0))}
    assert touched == {(f'stages_{k}', 'blocks_0')}

  asked = []

  @contextlib.contextmanager
  def fake_official(mode, extra_args):
    asked.append((mode, extra_args))
    yield dict(torch='2.x'), lambda: 1.0

  results = profile_stages.time_blocks(blocks, variables, 1, fake_official)
  assert asked == [(mode, (f'--block={k}',)) for k in range(1, 5)
                   for mode in ('forward', 'train')]
  for result in results.values():
    assert result['speedup'] == pytest.approx(1.0 / result['jax']['min_s'])
  profile_stages.print_blocks(results)
  rows = [line.split(' | ')[0].strip('| ')
          for line in capsys.readouterr().out.splitlines()[4:]]
  assert rows == list(profile_stages.BLOCKS)


def test_the_benchmarks_and_train_step_import_without_tensorflow():
  """An accelerator image may have JAX but no TensorFlow: the models, the
  train step and the benchmark scripts load without it (only a run that
  writes TensorBoard metrics imports it, through clu)."""
  code = ('import sys; import benchmarks.throughput, benchmarks.kernel_forms, '
          'benchmarks.profile_stages, '
          'glmix_jax.train_lib; '
          'print(sorted(m for m in sys.modules if m.startswith("tensorflow")))')
  out = subprocess.run([sys.executable, '-c', code], check=True,
                       capture_output=True, text=True,
                       cwd=pathlib.Path(__file__).parents[1]).stdout
  assert out.split('\n')[-2] == '[]', out
