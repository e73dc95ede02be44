"""Host memory of a training run over time: does it stay flat?

Runs ``train.py`` (by default the demo, every step logged) in a fresh workdir
and samples the resident memory (RSS) of the trainer process and of its input
worker processes every ``--every`` seconds until it exits. Prints RSS at
steps along the run and the drift over its second half (after start-up, the
compilation and the first checkpoint), and writes all samples to ``--json``.

  PYTHONPATH=. python benchmarks/host_memory.py --json /tmp/host_memory.json

A batch costs B x S x S x 3 bytes of uint8 (the demo: 64 x 48 x 48 x 3 =
0.44 MB), so the prefetched batches are a small, fixed share; a leak (batches
or worker buffers that pile up) shows as drift that grows with the steps.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time

import psutil

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _rss_mb(process: psutil.Process) -> tuple[float, float, int]:
  """(trainer RSS, sum of its children's RSS, number of children), in MB."""
  try:
    main = process.memory_info().rss / 2**20
    children = process.children(recursive=True)
  except psutil.NoSuchProcess:
    return 0.0, 0.0, 0
  total = 0.0
  for child in children:
    try:
      total += child.memory_info().rss / 2**20
    except psutil.NoSuchProcess:
      pass
  return main, total, len(children)


def _steps(workdir: pathlib.Path) -> int:
  """The last training step written to metrics.jsonl so far."""
  path = workdir / 'metrics.jsonl'
  if not path.exists():
    return 0
  lines = path.read_text().splitlines()
  steps = [json.loads(l)['step'] for l in lines if '"loss"' in l]
  return steps[-1] if steps else 0


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--json', required=True, help='where to write results')
  parser.add_argument('--config', default='configs/demo.py')
  parser.add_argument('--every', type=float, default=1.0,
                      help='seconds between samples')
  parser.add_argument('overrides', nargs='*',
                      help='extra train.py flags, e.g. --config.total_steps=300')
  args = parser.parse_args()

  workdir = pathlib.Path(tempfile.mkdtemp(prefix='host_memory_')) / 'run'
  command = [sys.executable, str(ROOT / 'train.py'), f'--config={args.config}',
             f'--workdir={workdir}', '--config.log_steps=1', *args.overrides]
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  start = time.perf_counter()
  # To a file, not a pipe: an unread pipe fills and blocks the trainer.
  log = open(workdir.parent / 'train.log', 'w+')  # pylint: disable=consider-using-with
  train = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log,
                           stderr=subprocess.STDOUT, text=True)
  process = psutil.Process(train.pid)
  samples = []
  while train.poll() is None:
    main_mb, workers_mb, workers = _rss_mb(process)
    samples.append(dict(seconds=time.perf_counter() - start,
                        step=_steps(workdir), trainer_mb=main_mb,
                        workers_mb=workers_mb, workers=workers))
    time.sleep(args.every)
  log.seek(0)
  output = log.read()
  log.close()
  if train.returncode:
    sys.exit(f'train.py failed:\n{output[-3000:]}')
  total = samples[-1]['step'] if samples else 0
  # The second half of the training steps (after start-up, compilation and
  # the first checkpoint; before the final evaluation, whose input workers
  # replace the training ones): drift there is what a long run accumulates.
  half = [s for s in samples if total / 2 <= s['step'] < total]
  first, last = half[0], half[-1]
  drift = {key: last[key] - first[key] for key in ('trainer_mb', 'workers_mb')}
  steps = last['step'] - first['step']

  print(' '.join(command))
  print(f'{"step":>6} {"trainer MB":>11} {"workers MB":>11} {"workers":>8}')
  shown = {min(samples, key=lambda s, f=f: abs(s['step'] - f * total))['step']
           for f in (0.05, 0.25, 0.5, 0.75, 1.0)}
  for sample in samples:
    if sample['step'] in shown:
      shown.discard(sample['step'])
      print(f'{sample["step"]:>6} {sample["trainer_mb"]:>11.0f} '
            f'{sample["workers_mb"]:>11.0f} {sample["workers"]:>8}')
  print(f'second half (steps {first["step"]}-{last["step"]}): trainer '
        f'{drift["trainer_mb"]:+.0f} MB, workers {drift["workers_mb"]:+.0f} MB')
  with open(args.json, 'w') as f:
    json.dump(dict(
        command=command, samples=samples, second_half_steps=steps,
        second_half_drift_mb=drift,
        peak_trainer_mb=max(s['trainer_mb'] for s in samples),
        peak_workers_mb=max(s['workers_mb'] for s in samples),
        wall_seconds=time.perf_counter() - start,
        machine=dict(platform=platform.platform(),
                     cores=len(os.sched_getaffinity(0)),
                     processor=platform.processor()),
        date=datetime.date.today().isoformat(),
    ), f, indent=2)


if __name__ == '__main__':
  main()
