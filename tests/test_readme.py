"""Every command in README.md is checked by a test or by CI, so none rots.

``README_COMMANDS`` maps each line of the README's ``bash`` blocks (its
trailing comment dropped) to how it is checked:

* ``('ci', '')``: ``.ci/run`` runs it, in a clean clone.
* ``('test', 'tests/FILE.py::NAME')``: that test (or fixture) runs the command
  with small settings.
* ``('flags', '')``: a ``train.py`` / ``eval.py`` command, also inside a
  ``gcloud ... --command="..."`` or ``srun`` wrapper: its flags are parsed as
  the entry point parses them (the config file loads, every override names a
  field of the right type); nothing is trained.
* ``('shell', why)``: a plain shell or cloud set-up line no test can run
  (mkdir, creating a TPU, copying files, pip); the reason is stated.

To add a command to the README, add its line here with one of these: the
test fails for a README command missing here, and for an entry here that
the README no longer has.
"""

import re
import subprocess
import sys

import pytest
from absl import flags
from ml_collections import config_flags

from conftest import DATA, ROOT, reference_file, subprocess_env

README = (ROOT / 'README.md').read_text()
JAX_VERSION = re.search(r'^jax==(\S+)$', (ROOT / 'requirements.txt')
                        .read_text(), re.M).group(1)

README_COMMANDS = {
    # Quickstart.
    'python3 -m venv .venv && . .venv/bin/activate && pip install -r '
    'requirements.txt && python train.py --config=configs/demo.py '
    '--workdir=/tmp/glmix_demo': ('flags', ''),
    'python3 -m venv .venv && . .venv/bin/activate && pip install -r '
    'requirements.txt && python -m pytest -q': ('ci', ''),
    'python -m glmix_jax.data.synthetic --sample=/tmp/glmix_sample.png '
    '--label=5 --image_size=80':
        ('test', 'tests/test_readme.py::test_sample_command'),
    'python train.py --config=configs/acmix_demo.py '
    '--workdir=/tmp/acmix_demo': ('flags', ''),
    'python -m glmix_jax.visualize --config=configs/demo.py '
    '--checkpoint=/tmp/glmix_demo --image=/tmp/glmix_sample.png '
    '--out=slots.png':
        ('test', 'tests/test_visualize.py::'
                 'test_command_draws_the_slot_maps_of_a_photo'),
    # Models, conversion, data.
    'python -m glmix_jax.models.summary --model=glnet_4g --image_size=224':
        ('test', 'tests/test_summary.py::'
                 'test_summary_command_prints_params_gmacs_and_shapes'),
    'python -m glmix_jax.convert --model=glnet_stl '
    '--checkpoint=glnet_stl.pth --workdir=/tmp/glnet_stl':
        ('test', 'tests/test_convert.py::test_convert_command_writes_a_'
                 'loadable_checkpoint_and_never_overwrites'),
    'python -m glmix_jax.convert --model=acmix_resnet50 '
    '--checkpoint=checkpoint.pth.tar --workdir=/tmp/acmix_resnet50':
        ('test', 'tests/test_official_checkpoints.py::test_convert_command_'
                 'reads_resnet_main_checkpoint_pth_tar'),
    'python -m glmix_jax.data.prepare --dataset=my_flowers '
    '--image_folder=~/flowers --data_dir=~/tensorflow_datasets':
        ('test', 'tests/test_image_folder.py::test_a_bad_file_is_named_in_one_'
                 'line_and_nothing_is_written'),
    'mkdir -p ~/imagenet_manual': ('shell', 'creates a folder'),
    'python -m glmix_jax.data.prepare --dataset=imagenet2012 '
    '--manual_dir=~/imagenet_manual --data_dir=~/tensorflow_datasets':
        ('test', 'tests/test_readme.py::test_prepare_command_names_the_tars'),
    # Training and evaluation.
    'python train.py --config=configs/glnet_stl.py --workdir=/path/to/run':
        ('flags', ''),
    'python train.py --config=configs/glnet_stl.py --workdir=... '
    '--config.global_batch_size=1024': ('flags', ''),
    'python eval.py --config=configs/glnet_stl.py --workdir=/path/to/run':
        ('flags', ''),
    'python eval.py --config=configs/glnet_stl.py --checkpoint=/tmp/glnet_stl':
        ('flags', ''),
    'python train.py --config=configs/tiny.py --workdir=/tmp/tiny':
        ('test', 'tests/conftest.py::tiny_run'),
    'python eval.py --config=configs/glnet_stl.py --checkpoint=/tmp/glnet_stl '
    '--evals=val,v2,real': ('flags', ''),
    'python eval.py --config=configs/glnet_stl.py --checkpoint=/tmp/glnet_stl '
    '--config.evals.val.split=validation[:10%]': ('flags', ''),
    'python train.py --config=configs/glnet.py:variant=16g,runlocal '
    '--workdir=/tmp/g16': ('flags', ''),
    # Fine-tuning.
    'python -m glmix_jax.data.synthetic --image_folder=/tmp/glmix_shapes':
        ('test', 'tests/test_image_folder.py::test_the_shapes_task_is_a_'
                 'folder_of_the_target_shapes'),
    'python -m glmix_jax.data.prepare --dataset=glmix_shapes '
    '--image_folder=/tmp/glmix_shapes --data_dir=/tmp/glmix_tfds':
        ('test', 'tests/test_image_folder.py::test_a_bad_file_is_named_in_one_'
                 'line_and_nothing_is_written'),
    'python train.py --config=configs/finetune_demo.py '
    '--workdir=/tmp/glmix_ft': ('flags', ''),
    'python train.py --config=configs/finetune_demo.py '
    '--workdir=/tmp/glmix_ft0 --config.init_from=': ('flags', ''),
    'python train.py --config=configs/glnet_stl.py --workdir=/path/to/ft '
    '--config.init_from=/tmp/glnet_stl --config.init_head=reinit':
        ('flags', ''),
    'python train.py --config=configs/finetune.py:model=glnet_stl,'
    'dataset=cifar10,init_from=/tmp/glnet_stl --workdir=/path/to/c10':
        ('flags', ''),
    'python train.py --config=configs/finetune.py:model=acmix_swin_t,'
    'dataset=oxford_iiit_pet,image_size=384,init_from=/tmp/acmix_swin_t,'
    'linear_probe --workdir=/path/to/pets': ('flags', ''),
    'python eval.py --config=configs/finetune.py:dataset=oxford_flowers102 '
    '--checkpoint=/tmp/glnet_stl --evals=fewshot': ('flags', ''),
    # TPU pod.
    'gcloud compute tpus tpu-vm create glmix-v4 --zone=us-central2-b '
    '--accelerator-type=v4-32 --version=tpu-ubuntu2204-base':
        ('shell', 'creates a Cloud TPU'),
    'gcloud compute tpus tpu-vm scp --recurse . glmix-v4:glmix_jax '
    '--zone=us-central2-b --worker=all': ('shell', 'copies the clone'),
    'gcloud compute tpus tpu-vm ssh glmix-v4 --zone=us-central2-b '
    '--worker=all --command="cd glmix_jax && pip install -r requirements.txt '
    f"'jax[tpu]=={JAX_VERSION}'\"":
        ('shell', 'pip on the workers; the jax pin is checked below'),
    'gcloud compute tpus tpu-vm ssh glmix-v4 --zone=us-central2-b '
    '--worker=all --command="cd glmix_jax && GLMIX_JAX_DISTRIBUTED=1 python '
    'train.py --config=configs/glnet_stl.py --workdir=gs://my-bucket/'
    'glnet_stl --config.data.data_dir=gs://my-bucket/tensorflow_datasets"':
        ('flags', ''),
    # GPU cluster.
    f"pip install -r requirements.txt 'jax[cuda12]=={JAX_VERSION}'":
        ('shell', 'pip with the CUDA plugin; the jax pin is checked below'),
    'srun --nodes=4 --ntasks-per-node=1 --gpus-per-node=8 env '
    'GLMIX_JAX_DISTRIBUTED=1 python train.py --config=configs/glnet_stl.py '
    '--workdir=/shared/runs/glnet_stl': ('flags', ''),
    'JAX_COORDINATOR_ADDRESS=10.0.0.1:1234 JAX_NUM_PROCESSES=2 '
    'JAX_PROCESS_ID=0 python train.py --config=configs/glnet_stl.py '
    '--workdir=/shared/runs/glnet_stl':
        ('test', 'tests/test_faults.py::'
                 'test_two_processes_train_as_one_and_save_one_step_on_sigterm'),
    # Visualisation.
    'python -m glmix_jax.visualize --config=configs/glnet_stl.py '
    '--checkpoint=/tmp/glnet_stl --image=photo.jpg --out=slots.png '
    '--blocks=1.1,2.5 --slots=16':
        ('test', 'tests/test_visualize.py::'
                 'test_command_draws_the_slot_maps_of_a_photo'),
}


def readme_commands() -> list[str]:
  """The command lines of the README's bash blocks, comments dropped."""
  commands = []
  for block in re.findall(r'```bash\n(.*?)```', README, re.S):
    for line in block.replace('\\\n', ' ').splitlines():
      line = re.sub(r'\s+#.*$', '', line).strip()
      if line:
        commands.append(line)
  return commands


def test_every_readme_command_is_checked():
  commands = readme_commands()
  assert len(commands) == len(set(commands)), 'a command is listed twice'
  unchecked = [c for c in commands if c not in README_COMMANDS]
  assert not unchecked, ('README commands that no test checks; add each to '
                         f'README_COMMANDS in {__file__}: {unchecked}')
  stale = [c for c in README_COMMANDS if c not in commands]
  assert not stale, f'README_COMMANDS lists commands the README lost: {stale}'


def test_named_tests_and_ci_exist():
  ci = (ROOT / '.ci' / 'run').read_text()
  for command, (kind, detail) in README_COMMANDS.items():
    if kind == 'ci':
      assert command in ci, command
    elif kind == 'test':
      file, name = detail.split('::')
      assert re.search(rf'^def _?{name}\(', (ROOT / file).read_text(),
                       re.M), detail
    else:
      assert kind in ('flags', 'shell'), (command, kind)


def parse_entry_point_flags(script: str, args: list[str]) -> None:
  """Parses ``args`` as ``train.py`` / ``eval.py`` define their flags (their
  flags are declared at import, so this mirrors them on a fresh registry)."""
  registry = flags.FlagValues()
  argv = [script, *args]
  config_flags.DEFINE_config_file('config', None, 'Config file.',
                                  flag_values=registry, lock_config=True,
                                  sys_argv=argv)  # where overrides are read
  flags.DEFINE_string('workdir', None, '', flag_values=registry)
  if script == 'eval.py':
    flags.DEFINE_string('checkpoint', None, '', flag_values=registry)
    flags.DEFINE_list('evals', None, '', flag_values=registry)
  registry(argv)
  # A config file that fails to load is only reported on first use.
  config = registry['config'].value
  assert config.model_name
  if script == 'eval.py':
    assert set(registry['evals'].value or ()) <= set(config.evals)
  assert registry['workdir'].value or registry['checkpoint'].value


@pytest.mark.parametrize('command', [c for c, (kind, _) in
                                     README_COMMANDS.items()
                                     if kind == 'flags'])
def test_training_command_flags_parse(command):
  script, args = re.search(r'python (train\.py|eval\.py)((?: --\S+)+)',
                           command).groups()
  parse_entry_point_flags(script, args.replace('"', '').split())
  entry_point = (ROOT / script).read_text()
  for flag in re.findall(r'--(\w+)=', args):
    if flag != 'config':  # config_flags' own; its fields checked above
      assert f"'{flag}'" in entry_point, f'{script} has no --{flag}'


def test_jax_accelerator_pins_match_requirements():
  pins = re.findall(r'jax\[\w+\]==([\w.]+)', README)
  assert pins and set(pins) == {JAX_VERSION}


def run_module(module, *args):
  return subprocess.run([sys.executable, '-m', module, *args],
                        capture_output=True, text=True, cwd=ROOT,
                        env=subprocess_env(), timeout=600, check=False)


def test_sample_command(tmp_path):
  done = run_module('glmix_jax.data.synthetic',
                    f'--sample={tmp_path / "sample.png"}', '--label=5',
                    '--image_size=80')
  assert done.returncode == 0, done.stderr[-3000:]
  assert 'class 5 (cross below the disc)' in done.stdout
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with Image.open(tmp_path / 'sample.png') as image:
    assert image.size == (80, 80)


def test_prepare_command_names_the_tars(tmp_path):
  # Run as the README writes it, on an empty manual folder: the flags are
  # accepted and the user is told which files to put there.
  done = run_module('glmix_jax.data.prepare', '--dataset=imagenet2012',
                    f'--manual_dir={tmp_path / "manual"}',
                    f'--data_dir={tmp_path / "tfds"}')
  assert done.returncode == 1
  assert 'needs ILSVRC2012_img_train.tar and/or ILSVRC2012_img_val.tar' in (
      done.stderr)


def test_readme_figure_is_committed_and_small():
  figure = ROOT / 'docs' / 'slots_demo.png'
  assert '(docs/slots_demo.png)' in README
  assert figure.read_bytes().startswith(b'\x89PNG')
  assert figure.stat().st_size < 300_000



def _lookup_outcome(name):
  """How ``reference_file(name)`` ends: (outcome, message); a skip or a
  failure is caught here, so neither ends this test."""
  try:
    return 'found', str(reference_file(name))
  except pytest.fail.Exception as failure:
    return 'fail', str(failure)
  except pytest.skip.Exception as skip:
    return 'skip', str(skip)


def test_a_missing_reference_fixture_fails_in_ci_and_skips_locally(
    monkeypatch):
  """``.ci/run`` exports CI=1 before it runs pytest; with CI set (non-empty)
  a fixture in neither tests/data nor ../shared fails its test, without it
  the test is skipped with the same reason; a fixture present is found."""
  ci = (ROOT / '.ci' / 'run').read_text()
  assert re.search(r'^export CI=1$', ci, re.M)
  assert ci.index('export CI=1') < ci.index('python -m pytest')
  missing = 'no_such_fixture.npz'
  reason = f'{missing} is neither in tests/data nor in '
  monkeypatch.setenv('CI', '1')
  outcome, message = _lookup_outcome(missing)
  assert outcome == 'fail' and message.startswith(reason)
  assert 'CI is set' in message
  assert _lookup_outcome('glnet_stl_tiny.json') == (
      'found', str(DATA / 'glnet_stl_tiny.json'))
  monkeypatch.setenv('CI', '')  # empty: as unset
  outcome, message = _lookup_outcome(missing)
  assert outcome == 'skip' and message.startswith(reason)
  monkeypatch.delenv('CI')
  assert _lookup_outcome(missing)[0] == 'skip'
