"""Faults in the middle of a run, as a user meets them through ``train.py``.

Each case ends in exactly one ``error:`` line and no traceback (or, for
SIGTERM, a clean save), leaves no partial checkpoint directory, keeps the
checkpoints that were complete, and leaves a workdir that the same command
resumes. README.md's "Reliability" table is this file's summary.
"""

import io
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tarfile
import time

import jax
import numpy as np
import psutil
import pytest

from conftest import ROOT, start_two_processes, subprocess_env, train_cmd
from glmix_jax import checkpoint
from glmix_jax.data import pipeline, prepare, synthetic

TMP_SUFFIX = '.orbax-checkpoint-tmp'


def run_train(workdir, *flags, env=None, timeout=600):
  return subprocess.run(train_cmd(workdir, *flags), capture_output=True,
                        text=True, cwd=ROOT, env=subprocess_env(**(env or {})),
                        timeout=timeout, check=False)


def assert_one_error_line(stderr: str, *fragments: str) -> str:
  """The single ``error:`` line of a failed command, holding ``fragments``."""
  assert 'Traceback' not in stderr, stderr[-3000:]
  lines = [l for l in stderr.splitlines() if l.startswith('error:')]
  assert len(lines) == 1, stderr[-3000:]
  for fragment in fragments:
    assert fragment in lines[0], lines[0]
  return lines[0]


def steps_on_disk(workdir) -> list[str]:
  """The names in WORKDIR/checkpoints; a partial save shows as *-tmp*."""
  return sorted(p.name for p in (pathlib.Path(workdir) / 'checkpoints')
                .iterdir())


def snapshot(directory) -> dict[str, bytes]:
  return {str(p.relative_to(directory)): p.read_bytes()
          for p in sorted(pathlib.Path(directory).rglob('*')) if p.is_file()}


def assert_bitwise_equal_runs(workdir, reference) -> None:
  step, state = checkpoint.latest_train_state(workdir)
  ref_step, ref_state = checkpoint.latest_train_state(reference)
  assert step == ref_step == 12
  for key in ('params', 'ema_params', 'opt_state', 'batch_stats'):
    jax.tree_util.tree_map(np.testing.assert_array_equal, state[key],
                           ref_state[key])


def data_flag(reference_run):
  return f'--config.data.data_dir={reference_run / "data"}'


def wait_for_save_in_flight(process, checkpoints: pathlib.Path,
                            after_step: int) -> str:
  """Polls until a save later than ``after_step`` is being written; its
  temporary directory's name."""
  deadline = time.time() + 300
  while time.time() < deadline and process.poll() is None:
    if checkpoints.is_dir():
      for name in os.listdir(checkpoints):
        if TMP_SUFFIX in name and int(name.split('.')[0]) > after_step:
          return name
    time.sleep(0.002)
  raise AssertionError('no checkpoint save was seen in flight')


# ---------------------------------------------------------------------------
# A non-finite step in the middle of a run.


def test_non_finite_step_stops_with_the_guards_line_and_resumes(
    tiny_run, tmp_path):
  # lr 1e38: step 2's update overflows, so the loss of step 3 is NaN. A save
  # every step: step 3's state, past the bad step, must not be saved.
  flags = (data_flag(tiny_run), '--config.optimizer.lr=1e38',
           '--config.checkpoint_steps=1')
  done = run_train(tmp_path, *flags)
  assert done.returncode == 1
  assert_one_error_line(done.stderr, 'Non-finite loss or gradient at step 3',
                        'max_bad_steps=0', 'latest checkpoint, step 2')
  assert steps_on_disk(tmp_path) == ['1', '2']  # nothing partial either
  step, state = checkpoint.latest_train_state(tmp_path)
  assert step == 2 and int(state['bad_steps']) == 0
  # What the message advises: tolerate such steps and resume.
  resumed = run_train(tmp_path, *flags[:2], '--config.max_bad_steps=20')
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert 'warning: step 3 was non-finite and skipped' in resumed.stdout
  step, state = checkpoint.latest_train_state(tmp_path)
  assert step == 12 and int(state['bad_steps']) == 10  # steps 3 to 12
  assert all(np.isfinite(x).all()
             for x in jax.tree_util.tree_leaves(state['params']))


def test_non_finite_guard_in_two_processes(tiny_run, tmp_path):
  processes = start_two_processes(
      tmp_path, data_flag(tiny_run), '--config.optimizer.lr=1e38',
      stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  outputs = [p.communicate(timeout=600) for p in processes]
  for p, (_, err) in zip(processes, outputs):
    assert p.returncode == 1, err[-3000:]
    assert_one_error_line(err, 'Non-finite loss or gradient at step 3')
  assert steps_on_disk(tmp_path) == ['1']
  assert checkpoint.latest_train_state(tmp_path)[0] == 1


# ---------------------------------------------------------------------------
# Signals while a checkpoint is being written.


def test_sigterm_then_sigkill_during_saves_resume_bitwise(tiny_run, tmp_path):
  # A save every step, and input from two worker processes (execution
  # fields: the run is the reference run, which made its input in-process).
  # The workers outlive neither the SIGTERM nor the SIGKILL of the trainer.
  flags = (data_flag(tiny_run), '--config.checkpoint_steps=1',
           '--config.data.num_workers=2', '--config.data.num_threads=1')
  checkpoints = tmp_path / 'checkpoints'
  # SIGTERM while a save is in flight: the forced save still commits.
  process = subprocess.Popen(train_cmd(tmp_path, *flags), cwd=ROOT,
                             env=subprocess_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
  try:
    wait_for_save_in_flight(process, checkpoints, 2)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=300)
  finally:  # a run that hangs must not outlive the test
    process.kill()
  assert process.returncode == 0, err[-3000:]
  saved = int(out.split('Preempted (SIGTERM): saved step ')[1].split(';')[0])
  listing = steps_on_disk(tmp_path)
  assert str(saved) in listing and not [n for n in listing if TMP_SUFFIX in n]
  step, state = checkpoint.latest_train_state(tmp_path)
  assert step == saved == int(state['step']) < 12
  # The same command resumes; SIGKILL while a later save is in flight.
  process = subprocess.Popen(train_cmd(tmp_path, *flags), cwd=ROOT,
                             env=subprocess_env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
  in_flight = wait_for_save_in_flight(process, checkpoints, saved + 1)
  workers = psutil.Process(process.pid).children(recursive=True)
  assert workers  # the input workers (and multiprocessing's tracker)
  process.kill()  # no handler runs, the save stays half-written
  process.wait()
  _, alive = psutil.wait_procs(workers, timeout=30)
  assert not alive, alive  # orphaned workers would block on a full buffer
  assert in_flight in steps_on_disk(tmp_path)
  committed = checkpoint.latest_train_state(tmp_path)[0]
  assert saved < committed < int(in_flight.split('.')[0])
  # Once more: the partial save is removed and the run ends bitwise where
  # the uninterrupted one ended.
  done = run_train(tmp_path, *flags)
  assert done.returncode == 0, done.stderr[-3000:]
  assert not [n for n in steps_on_disk(tmp_path) if TMP_SUFFIX in n]
  assert_bitwise_equal_runs(tmp_path, tiny_run)


def losses(workdir) -> list[tuple[int, float]]:
  lines = (pathlib.Path(workdir) / 'metrics.jsonl').read_text().splitlines()
  return [(r['step'], r['loss']) for r in map(json.loads, lines) if 'loss' in r]


def test_two_processes_train_as_one_and_save_one_step_on_sigterm(
    tiny_run, tmp_path):
  processes = start_two_processes(
      tmp_path, data_flag(tiny_run), stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT)
  try:
    for line in processes[0].stdout:  # wait until both really train
      if line.startswith('step 3/'):
        break
    processes[1].send_signal(signal.SIGTERM)  # a scheduler notice to one host
    outs = [p.communicate(timeout=300)[0] for p in processes]
  finally:  # a run that hangs must not outlive the test
    for p in processes:
      p.kill()
  saved = []
  for p, out in zip(processes, outs):
    assert p.returncode == 0, out[-3000:]
    saved.append(int(out.split('Preempted (SIGTERM): saved step ')[1]
                     .split(';')[0]))
  assert 'process 1 of 2: 4 local of 8 devices' in outs[1]
  assert saved[0] == saved[1] >= 3
  assert checkpoint.latest_train_state(tmp_path)[0] == saved[0]
  # Up to the preemption, the losses of one process with 8 devices.
  two = losses(tmp_path)
  assert [s for s, _ in two] == list(range(1, saved[0] + 1))
  np.testing.assert_allclose([l for _, l in two],
                             [l for _, l in losses(tiny_run)[:saved[0]]],
                             rtol=2e-5)


# ---------------------------------------------------------------------------
# A damaged checkpoint, a full disk.


def _corrupt(files):
  for path in files:
    path.write_bytes(b'corrupt')


def _truncate(files):
  for path in files:
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def _remove_metadata(files):
  for path in files:
    if path.name.startswith('_') or path.name.endswith('.ocdbt'):
      path.unlink()


@pytest.mark.parametrize('damage', [_corrupt, _truncate, _remove_metadata],
                         ids=['corrupt', 'truncated', 'no_metadata'])
def test_damaged_checkpoint_is_named_and_left_untouched(tiny_run, tmp_path,
                                                        damage):
  workdir = tmp_path / 'run'
  shutil.copytree(tiny_run / 'checkpoints', workdir / 'checkpoints')
  shutil.copy(tiny_run / 'config.json', workdir)
  latest = workdir / 'checkpoints' / '12'
  damage([p for p in latest.rglob('*') if p.is_file()])
  before = snapshot(workdir)
  done = run_train(workdir, data_flag(tiny_run))
  assert done.returncode == 1
  assert_one_error_line(done.stderr,
                        f'Cannot restore the checkpoint {latest}',
                        'left untouched')
  assert snapshot(workdir) == before


def test_eval_of_a_damaged_checkpoint_is_one_line(tiny_run, tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(tiny_run / 'checkpoints', workdir / 'checkpoints')
  _corrupt(p for p in (workdir / 'checkpoints' / '12').rglob('*')
           if p.is_file())
  done = subprocess.run(
      [sys.executable, str(ROOT / 'eval.py'), '--config=configs/tiny.py',
       f'--workdir={workdir}', data_flag(tiny_run)],
      capture_output=True, text=True, cwd=ROOT, env=subprocess_env(),
      timeout=600, check=False)
  assert done.returncode == 1
  assert_one_error_line(done.stderr, 'Cannot restore the checkpoint')


def _mount_namespace() -> list[str]:
  """A command prefix giving a shell its own mount namespace (to mount a
  small tmpfs), as root or in a user namespace; [] where neither works."""
  for prefix in (['unshare', '--mount'],
                 ['unshare', '--user', '--map-root-user', '--mount']):
    probe = subprocess.run(
        [*prefix, 'sh', '-c', 'mount -t tmpfs -o size=1m tmpfs /mnt'],
        capture_output=True, check=False)
    if probe.returncode == 0:
      return prefix
  return []


def test_full_disk_during_a_save_keeps_the_previous_checkpoint(tiny_run,
                                                              tmp_path):
  prefix = _mount_namespace()
  if not prefix:
    pytest.skip('cannot mount a tmpfs here (no unshare --mount)')
  # The run resumed from step 4, on a file system with 1 MiB to spare: the
  # save of step 8 (about 3 MiB) fills it.
  start = tmp_path / 'start'
  shutil.copytree(tiny_run / 'checkpoints' / '4', start / 'checkpoints' / '4')
  shutil.copy(tiny_run / 'config.json', start)
  size_kib = sum(p.stat().st_size for p in start.rglob('*')
                 if p.is_file()) // 1024 + 1024
  mount = tmp_path / 'disk'
  mount.mkdir()
  after = tmp_path / 'after'
  command = ' '.join(train_cmd(mount / 'run', data_flag(tiny_run)))
  script = (f'mount -t tmpfs -o size={size_kib}k tmpfs {mount} && '
            f'cp -a {start} {mount}/run && {{ {command}; echo $? > '
            f'{tmp_path}/rc; }}; cp -a {mount}/run {after}')
  done = subprocess.run([*prefix, 'sh', '-c', script], capture_output=True,
                        text=True, cwd=ROOT, env=subprocess_env(),
                        timeout=600, check=False)
  assert (tmp_path / 'rc').read_text().strip() == '1', done.stderr[-3000:]
  assert_one_error_line(done.stderr, 'No space left on device')
  assert steps_on_disk(after) == ['4']  # the partial save of 8 is gone
  assert snapshot(after / 'checkpoints') == snapshot(start / 'checkpoints')
  # Space again: the same command resumes and ends where the uninterrupted
  # run ended.
  resumed = run_train(after, data_flag(tiny_run))
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert_bitwise_equal_runs(after, tiny_run)


@pytest.mark.parametrize('free_bytes, says_full', [(4096, True),
                                                    (1 << 30, False)])
def test_a_failed_metrics_write_says_when_the_disk_is_full(
    tmp_path, monkeypatch, free_bytes, says_full):
  # TensorFlow's event writer reports a full disk only as a failed flush
  # (ResourceExhaustedError), without the errno: the message must still say
  # that the disk is full, and must not say so when it is not.
  from glmix_jax import metrics  # pylint: disable=g-import-not-at-top
  writer = metrics.MetricWriter(tmp_path)
  real_statvfs = os.statvfs

  def statvfs(path):
    stat = real_statvfs(path)
    return os.statvfs_result((*stat[:4], free_bytes // stat.f_frsize,
                              *stat[5:]))

  def flush_fails(step, scalars):
    raise RuntimeError('Could not flush events file.')

  monkeypatch.setattr(os, 'statvfs', statvfs)
  monkeypatch.setattr(writer._tb, 'write_scalars', flush_fails)  # pylint: disable=protected-access
  with pytest.raises(OSError) as raised:
    writer.write(11, {'loss': 1.0})
  message = str(raised.value)
  assert 'metrics of step 11' in message and str(tmp_path) in message
  assert ('No space left on device' in message) == says_full, message


# ---------------------------------------------------------------------------
# A config changed between runs of one workdir.


def test_resume_with_a_changed_config_names_the_fields(tiny_run, tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(tiny_run / 'checkpoints', workdir / 'checkpoints')
  shutil.copy(tiny_run / 'config.json', workdir)
  before = snapshot(workdir)
  done = run_train(workdir, data_flag(tiny_run),
                   '--config.optimizer.grad_clip_norm=0',
                   '--config.global_batch_size=32')
  assert done.returncode == 1
  assert_one_error_line(
      done.stderr, 'global_batch_size (16 in the run, 32 now)',
      'optimizer.grad_clip_norm (5.0 in the run, 0.0 now)',
      f'{workdir}/config.json', 'a new --workdir')
  assert snapshot(workdir) == before


# ---------------------------------------------------------------------------
# Records that cannot be read or decoded.


def _with_truncated_image(manual: pathlib.Path, out: pathlib.Path,
                          victim: str) -> None:
  """A copy of an ImageNet-layout manual_dir with image ``victim`` cut to
  half its bytes (a broken download)."""
  out.mkdir(parents=True)
  shutil.copy(manual / synthetic.VAL_TAR, out / synthetic.VAL_TAR)
  with tarfile.open(manual / synthetic.TRAIN_TAR) as train, tarfile.open(
      out / synthetic.TRAIN_TAR, 'w') as new_train:
    for member in train.getmembers():
      classes = io.BytesIO()
      with tarfile.open(fileobj=train.extractfile(member)) as images, \
          tarfile.open(fileobj=classes, mode='w') as new_images:
        for image in images.getmembers():
          data = images.extractfile(image).read()
          if image.name == victim:
            data = data[:len(data) // 2]
          info = tarfile.TarInfo(image.name)
          info.size = len(data)
          new_images.addfile(info, io.BytesIO(data))
      info = tarfile.TarInfo(member.name)
      info.size = classes.tell()
      new_train.addfile(info, io.BytesIO(classes.getvalue()))


def test_image_that_fails_to_decode_mid_run_is_named(tiny_run, tmp_path):
  split = pipeline.open_split('imagenet2012', 'train[:90%]',
                              str(tiny_run / 'data'))
  # A record the run first reads in its 6th step (batch 16, seed 0).
  first_read = {}
  for position in range(12 * 16):
    index = pipeline.train_record_index(position, seed=0,
                                        num_records=len(split))
    first_read.setdefault(index, position // 16)
  index = min(i for i, step in first_read.items() if step == 5)
  victim = split[index]['file_name'].decode()
  _with_truncated_image(tiny_run / 'data' / 'manual', tmp_path / 'manual',
                        victim)
  prepare.prepare('imagenet2012', data_dir=str(tmp_path / 'tfds'),
                  manual_dir=str(tmp_path / 'manual'))
  done = run_train(tmp_path / 'run', f'--config.data.data_dir={tmp_path}/tfds')
  assert done.returncode == 1
  assert_one_error_line(
      done.stderr, f'record {index} of imagenet2012 train[:90%] ({victim})',
      'OSError')
  assert 'step 2/12' in done.stdout  # it failed mid-run, not at the start
  assert not [n for n in steps_on_disk(tmp_path / 'run') if TMP_SUFFIX in n]


def test_damaged_dataset_files_are_named(tiny_run, tmp_path):
  shutil.copytree(tiny_run / 'data' / 'imagenet2012', tmp_path / 'imagenet2012')
  (records,) = (tmp_path / 'imagenet2012').rglob('*-train.array_record-*')
  records.write_bytes(records.read_bytes()[:records.stat().st_size // 2])
  workdir = tmp_path / 'run'
  shutil.copytree(tiny_run / 'checkpoints' / '4', workdir / 'checkpoints' / '4')
  shutil.copy(tiny_run / 'config.json', workdir)
  before = snapshot(workdir / 'checkpoints')
  done = run_train(workdir, f'--config.data.data_dir={tmp_path}')
  assert done.returncode == 1
  assert_one_error_line(done.stderr, 'Cannot read record',
                        'of imagenet2012 train[:90%]', 'Prepare the dataset')
  assert snapshot(workdir / 'checkpoints') == before
