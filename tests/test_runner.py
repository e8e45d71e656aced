"""The runner as a user meets it: one line for every bad ending, outputs that can be trusted.

Command-line cases run main.py in a subprocess, as a user would.
"""

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from badnet import runner
from badnet.core import evaluate, interrupts, masks, train
from badnet.defences import fine_pruning, goodnet
from badnet.errors import DataError, TrainingError, WorkdirError
from badnet.io import keras_io, workdir
from configs import fine_prune as fine_prune_config
from configs import prune as prune_config
from tests import helpers
from tests.conftest import REPO


_LOG_LINE = re.compile(r'[IWEF]\d{4} \d\d:\d\d:\d\d')  # absl's log lines


def _main(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, 'main.py', *args], cwd=REPO, capture_output=True,
                        text=True, timeout=300, check=False)


def _one_error_line(result: subprocess.CompletedProcess) -> str:
  """The error line of a failed run, checked to be the only thing that is not a log line."""
  assert 'Traceback' not in result.stderr, result.stderr
  lines = [line for line in result.stderr.splitlines()
           if line.strip() and not _LOG_LINE.match(line)]
  assert len(lines) == 1, result.stderr
  return lines[0]


def _world_flags(root: pathlib.Path) -> list[str]:
  return [f'--config.model={root / "bd_weights.h5"}', f'--config.data.dir={root / "data"}',
          '--config.batch_size=64']


@pytest.mark.parametrize('flag, message', [
    ('--config.pruning.thresholdz=1',
     'error: --config.pruning.thresholdz: no such config field; did you mean '
     '--config.pruning.thresholds?'),
    ('--config.nonsense=1', 'error: --config.nonsense: no such config field'),
    # A defence's field moved into its block (config.<defence>): the hint says where.
    ('--config.thresholds=(2.0,)', 'error: --config.thresholds: no such config field; did you '
     'mean --config.pruning.thresholds?'),
])
def test_a_mistyped_config_field_is_one_line_with_the_hint(flag, message):
  result = _main('--config=configs/prune.py', flag)
  assert result.returncode == 1
  assert _one_error_line(result) == message


def test_a_mistyped_nested_field_and_a_missing_config_file_are_one_line():
  result = _main('--config=configs/fine_prune.py', '--config.fine_pruning.finetune.epochz=1')
  assert result.returncode == 1
  assert _one_error_line(result) == ('error: --config.fine_pruning.finetune.epochz: no such '
                                     'config field; did you mean '
                                     '--config.fine_pruning.finetune.epochs?')
  result = _main('--config=configs/no_such_job.py')
  assert result.returncode == 1
  assert _one_error_line(result).startswith(
      'error: --config=configs/no_such_job.py: cannot load this config file')


def test_ctrl_c_is_one_line_exit_130_and_leaves_no_half_written_file(world, tmp_path):
  root, _ = world
  out = tmp_path / 'run'
  # main.py as a user's terminal starts it: a shell's background job (CI's, say) starts its
  # children with SIGINT ignored, and Python would keep it ignored.
  as_in_a_terminal = ('import runpy, signal, sys; '
                      'signal.signal(signal.SIGINT, signal.default_int_handler); '
                      'sys.argv = sys.argv[1:]; runpy.run_path("main.py", run_name="__main__")')
  process = subprocess.Popen(
      [sys.executable, '-c', as_in_a_terminal, 'main.py', '--config=configs/fine_prune.py',
       *_world_flags(root), '--config.fine_pruning.thresholds=(2.0,)',
       '--config.fine_pruning.finetune.epochs=5000',
       '--config.fine_pruning.finetune.batch_size=16', f'--workdir={out}'],
      cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  for line in process.stdout:  # wait until fine-tuning is under way
    if line.startswith('Fine-tuning on'):
      break
  time.sleep(2)
  process.send_signal(signal.SIGINT)
  _, stderr = process.communicate(timeout=120)
  assert process.returncode == 130
  result = subprocess.CompletedProcess(process.args, 130, '', stderr)
  assert _one_error_line(result).startswith('interrupted (Ctrl-C)')
  assert not workdir.leftovers(out)
  # Finished before: complete. (The defence runs whole on clean data before its
  # report writes any net, so the config record is the one file finished by then.)
  assert json.loads((out / 'config.json').read_text())['badnet_job'] == 'fine_pruning'
  assert not (out / 'models' / 'repaired_X=2.h5').exists()
  assert not (out / 'models' / 'fine_pruned_X=2.h5').exists()


@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')  # the drop
def test_a_ctrl_c_that_a_finaliser_drops_is_raised_at_the_next_batch(world):
  """Python drops an exception raised inside ``__del__``: the job would run on after Ctrl-C."""
  _, params = world

  class Finaliser:
    def __del__(self):
      os.kill(os.getpid(), signal.SIGINT)  # the handler runs in here, and its raise is dropped
      sum(range(10_000))

  previous = signal.getsignal(signal.SIGINT)
  signal.signal(signal.SIGINT, signal.default_int_handler)
  try:
    interrupts.install()
    Finaliser()
    images = np.zeros((8, 55, 47, 3), np.float32)
    with pytest.raises(KeyboardInterrupt):
      evaluate.predict(params, images, batch_size=4)
  finally:
    signal.signal(signal.SIGINT, previous)
    interrupts._requested = False  # noqa: SLF001 (this process goes on to other tests)


def test_a_job_started_with_ctrl_c_ignored_keeps_ignoring_it():
  previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
  try:
    interrupts.install()
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
  finally:
    signal.signal(signal.SIGINT, previous)


def test_a_file_that_cannot_be_written_is_one_line_naming_it(world, tmp_path):
  """Writes past a file-size limit fail as on a full disk (EFBIG instead of ENOSPC)."""
  root, _ = world
  out = tmp_path / 'run'
  # Room for the CSVs, JSON and plots, not for a 1.6 MB Keras file (ulimit -f: 1024-byte blocks).
  command = ' '.join([sys.executable, 'main.py', '--config=configs/prune.py',
                      *_world_flags(root), f'--workdir={out}'])
  result = subprocess.run(['bash', '-c', f'ulimit -f 400 && exec {command}'], cwd=REPO,
                          capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 1
  line = _one_error_line(result)
  assert line.startswith(f'error: {out / "models" / "repaired_X="}') and 'could not write' in line
  assert not workdir.leftovers(out)


def test_a_full_disk_is_one_line_naming_the_file(world, tmp_path):
  """A real full disk: a 3 MB tmpfs holds one 1.6 MB Keras file, not two (Linux, as root)."""
  root, _ = world
  disk = tmp_path / 'disk'
  disk.mkdir()
  mounted = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=3m', 'tmpfs', str(disk)],
                           capture_output=True, check=False)
  if mounted.returncode:
    pytest.skip('cannot mount a small tmpfs here (needs root on Linux)')
  try:
    result = _main('--config=configs/prune.py', *_world_flags(root), f'--workdir={disk / "run"}')
    assert result.returncode == 1
    line = _one_error_line(result)
    assert re.fullmatch(rf'error: {disk / "run" / "models"}/repaired_X=\d+\.h5: could not '
                        r'write it \(No space left on device\)', line), line
    assert not workdir.leftovers(disk / 'run')
  finally:
    subprocess.run(['umount', str(disk)], check=False)


def test_temporary_files_of_a_killed_run_are_removed_by_the_next(world, tmp_path):
  root, _ = world
  out = tmp_path / 'run'
  config = prune_config.get_config()
  config.model, config.data.dir = str(root / 'bd_weights.h5'), str(root / 'data')
  config.pruning.thresholds = (2.0,)
  runner.run(config, out)
  stale = [out / 'models' / '.repaired_X=2.h5.k1ll3d.tmp', out / '.results.json.x2y.tmp']
  for path in stale:
    path.write_bytes(b'half a file')
  keep = out / 'models' / 'notes.tmp.txt'  # not one of ours: left alone
  keep.write_text('mine')
  assert workdir.leftovers(out) == sorted(stale)
  runner.run(config, out)
  assert not any(path.exists() for path in stale) and keep.exists()


def test_a_diverging_fine_tuning_stops_with_one_line(world, tmp_path):
  """SGD at BackdoorBench's rate on raw 0..255 pixels wrecks the net in its first epoch (on
  enough held-out images to judge: train.COLLAPSE_HOLDOUT_IMAGES)."""
  root, _ = world
  result = _main('--config=configs/fine_prune.py', *_world_flags(root),
                 '--config.fine_pruning.thresholds=(2.0,)',
                 '--config.fine_pruning.holdout_fraction=0.9',
                 '--config.fine_pruning.finetune.optimizer=sgd',
                 '--config.fine_pruning.finetune.learning_rate=0.01',
                 '--config.fine_pruning.finetune.epochs=30',
                 f'--workdir={tmp_path / "run"}')
  assert result.returncode == 1
  line = _one_error_line(result)
  assert re.match(r'error: fine-(tune only|prune X=2): training diverged in epoch \d+ of 30 '
                  r'\((held-out clean accuracy fell from [\d.]+ % to [\d.]+ %, chance level, '
                  r'for 2 epochs|'
                  r'the loss is nan)\) with sgd at learning rate 0.01; stopped. Try a lower '
                  r'learning rate', line), line


@pytest.mark.parametrize('held_out', [train.COLLAPSE_HOLDOUT_IMAGES, 24])
def test_the_guard_stops_a_collapse_only_on_enough_held_out_images(held_out):
  """A net wrecked to one class for two epochs: stopped where the held-out set can tell chance
  from a dip, trained on where it holds a couple of dozen images (a dip of a few images)."""
  params = helpers.random_params(11, seed=5)
  images = helpers.varied_images(held_out, seed=2)
  labels = evaluate.predict(params, images)  # B scores 100 %
  assert len(np.unique(labels)) > 3
  one_class = {**params, 'output': {'kernel': np.zeros_like(params['output']['kernel']),
                                    'bias': np.eye(11, dtype=np.float32)[0]}}
  assert train.collapsed(evaluate.accuracy(one_class, images, labels), 100.0, 11)
  recipe = train.Recipe(epochs=3)
  tracker = train._Tracker('tune', recipe, (images, labels), 'conv_3',  # pylint: disable=protected-access
                           np.ones(60, np.float32), params)
  tracker.end_epoch(1, np.ones(2), np.ones(2), one_class, 1.0)  # one epoch can be a dip
  if held_out < train.COLLAPSE_HOLDOUT_IMAGES:
    tracker.end_epoch(2, np.ones(2), np.ones(2), one_class, 1.0)
    return
  with pytest.raises(TrainingError, match=r'tune: training diverged in epoch 2 of 3 \(held-out '
                     r'clean accuracy fell from 100.00 % to [\d.]+ %, chance level, for 2 epochs'):
    tracker.end_epoch(2, np.ones(2), np.ones(2), one_class, 1.0)


def test_collapse_means_chance_level_far_below_the_start():
  assert train.collapsed(1.0, 98.0, 100)        # to chance, from 98 %
  assert not train.collapsed(4.0, 98.0, 100)    # above 2 x chance + 1 = 3 %
  assert not train.collapsed(1.0, 8.0, 100)     # a deeply pruned start has little to lose
  assert train.collapsed(19.0, 62.5, 11)        # 2 x 9.09 + 1 = 19.18 % for 11 classes
  assert not train.collapsed(29.2, 62.5, 11)    # a dip a small net recovers from


def test_a_workdir_belongs_to_one_job(world, tmp_path):
  root, _ = world
  out = tmp_path / 'run'
  assert _main('--config=configs/prune.py', *_world_flags(root),
               '--config.pruning.thresholds=(2.0,)', f'--workdir={out}').returncode == 0
  before = {p: p.stat().st_mtime_ns for p in out.rglob('*') if p.is_file()}
  result = _main('--config=configs/evaluate.py', f'--config.model={root / "bd_weights.h5"}',
                 f'--config.data.clean={root / "data" / "cl" / "test.h5"}', f'--workdir={out}')
  assert result.returncode == 1
  assert _one_error_line(result) == (f'error: {out}: the workdir holds the outputs of a pruning '
                                     f'job; choose another workdir for this evaluate job')
  assert before == {p: p.stat().st_mtime_ns for p in out.rglob('*') if p.is_file()}


def test_classify_takes_a_run_and_a_folder_and_says_what_classes_mean(world, tmp_path):
  root, params = world
  run = tmp_path / 'run'
  assert _main('--config=configs/prune.py', *_world_flags(root),
               '--config.pruning.thresholds=(2.0,)', f'--workdir={run}').returncode == 0
  faces = tmp_path / 'faces'
  faces.mkdir()
  images = helpers.varied_images(5, seed=9)
  for index, image in enumerate(images):
    Image.fromarray(image).save(faces / f'face_{index}.png')
  (faces / 'notes.txt').write_text('not an image')
  result = _main('--config=configs/classify.py', f'--config.run={run}', '--config.x=2',
                 f'--config.images={faces}', f'--workdir={tmp_path / "classified"}')
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert lines[0].startswith('GoodNet classes: 0..10 are the classes of B')
  assert '11 means "backdoored input detected"' in lines[0]
  repaired = keras_io.read_params(run / 'models' / 'repaired_X=2.h5')
  expected = goodnet.predict(params, repaired, images)
  printed = [line.split() for line in lines if line.startswith(str(faces))]
  assert printed == [[str(faces / f'face_{i}.png'), str(c)] for i, c in enumerate(expected)]
  assert f'{int((expected == 11).sum())} of 5 images flagged' in result.stdout
  assert lines[-1].startswith(f'Results in {tmp_path / "classified"}')
  # A glob gives the same images; an X the run does not have is one line.
  glob_run = _main('--config=configs/classify.py', f'--config.run={run}', '--config.x=2',
                   f'--config.images={faces}/face_*.png', f'--workdir={tmp_path / "globbed"}')
  assert [line.split() for line in glob_run.stdout.splitlines()
          if line.startswith(str(faces))] == printed
  missing = _main('--config=configs/classify.py', f'--config.run={run}', '--config.x=7',
                  f'--config.images={faces}', f'--workdir={tmp_path / "x7"}')
  assert missing.returncode == 1
  assert 'has no repaired net at X=7; it has X = 2' in _one_error_line(missing)


def test_results_json_figures_are_rounded_and_name_the_data_read(world, tmp_path):
  root, _ = world
  config = prune_config.get_config()
  config.model, config.data.dir = str(root / 'bd_weights.h5'), str(root / 'data')
  results = runner.run(config, tmp_path / 'run')
  assert results['data'] == {
      key: str((root / 'data' / relative).resolve())
      for key, relative in {'clean_valid': 'cl/valid.h5', 'clean_test': 'cl/test.h5',
                            'poisoned_valid': 'bd/bd_valid.h5',
                            'poisoned_test': 'bd/bd_test.h5'}.items()}
  text = (tmp_path / 'run' / 'results.json').read_text()
  assert json.loads(text) == results
  floats = []
  def walk(value):
    if isinstance(value, float):
      floats.append(value)
    elif isinstance(value, dict):
      for item in value.values():
        walk(item)
    elif isinstance(value, list):
      for item in value:
        walk(item)
  walk(results)
  assert floats and all(len(repr(f).replace('.', '').lstrip('0')) <= 7 for f in floats)
  assert '0000000' not in text and '9999999' not in text


def test_fine_prune_on_a_tiny_clean_set_is_one_clear_error():
  params = helpers.random_params(5, seed=1)
  images = helpers.varied_images(5, seed=2)
  labels = np.arange(5)  # one image per class: nothing to hold out
  mask = masks.prefix_masks(np.arange(60))[10]
  recipe = train.Recipe(epochs=1, batch_size=8)
  with pytest.raises(DataError, match='5 clean validation images leave 5 to fine-tune on and 0 '
                                      'to hold out'):
    fine_pruning.fine_prune(params, mask, images, labels, recipe, holdout_fraction=0.2)


def test_a_write_into_a_missing_permission_folder_names_the_file(tmp_path):
  if os.geteuid() == 0:
    target = pathlib.Path('/proc/badnet_cannot_write_here/results.json')
  else:
    locked = tmp_path / 'locked'
    locked.mkdir(mode=0o500)
    target = locked / 'results.json'
  with pytest.raises(WorkdirError, match=f'{target}: could not write it'):
    workdir.write_json(target, {'a': 1})


def test_default_config_of_fine_prune_passes_its_checks():
  runner.check(fine_prune_config.get_config())
