"""The benchmark scripts run end to end on a small model (their figures are
measured by hand and recorded in BENCHMARKS.md; here only that they run and
report what they claim)."""

import json

from benchmarks import throughput
from glmix_jax.models import summary


def test_throughput_reports_a_train_step(tmp_path):
  out = tmp_path / 'small.json'
  throughput.main([
      '--models', 'glnet_stl', '--modes', 'train', '--batch', '2',
      '--size', '64',
      '--repeats', '1', '--matmul_size', '256', '--json', str(out),
      '--override', 'depths=(1, 1, 1, 1)',
      '--override', 'dims=(32, 64, 96, 128)'])
  results = json.loads(out.read_text())['results']
  ours = results['glnet_stl/train']['jax']
  assert ours['images_per_s'] > 0 and ours['compile_s'] > 0
  assert ours['compiled_peak_bytes'] > 0
  # MFU's numerator: forward + backward, three times the model's MACs
  macs = summary.summarize('glnet_stl', 64, depths=(1, 1, 1, 1),
                           dims=(32, 64, 96, 128))['macs']['total']
  assert ours['flops'] == 2 * 3 * macs * 2  # 2 FLOPs x 3 x batch 2


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
