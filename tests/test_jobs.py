"""The prune (defend) and classify jobs end to end, on a small random world (no downloads)."""

import csv
import json
import os
import re
import subprocess
import sys
import threading
import time
import tracemalloc

import h5py
import ml_collections
import numpy as np
import pytest
from PIL import Image

from badnet import defences, defend, runner
from badnet.core import evaluate, masks, model
from badnet.defences import base, goodnet, sweep
from badnet.errors import ConfigError, DataError, ModelFileError, WorkdirError
from badnet import inputs
from badnet.io import data, keras_io
from badnet.io import workdir as workdir_lib
from configs import prune as prune_config
from tests import conftest, helpers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_CLASSES = conftest.WORLD_CLASSES


def _config(world_root, **settings) -> ml_collections.ConfigDict:
  """The prune config on the world; ``settings`` go to the pruning defence's block."""
  config = prune_config.get_config()
  config.model = str(world_root / 'bd_weights.h5')
  config.data.dir = str(world_root / 'data')
  config.batch_size = 64
  helpers.set_fields(config, {f'pruning.{key}': value for key, value in settings.items()})
  return config


def test_the_pruning_plugin_chooses_what_the_prune_job_chooses(world, tmp_path):
  """defences.get('pruning').defend on the clean split alone = the job's channels and nets."""
  root, params = world
  config = _config(root, thresholds=(2.0, 10.0, 95.0))
  results = runner.run(config, tmp_path / 'run')
  valid = data.load_csaw_h5(root / 'data' / 'cl' / 'valid.h5')
  clean = base.Clean(valid.labels, valid.images, config.batch_size, config.precision)
  outcome = defences.get('pruning').defend(params, clean, defend.settings_of(config))
  assert list(outcome.candidates) == ['X=2', 'X=10']  # X=95 is never reached
  for x in ('2', '10'):
    candidate, entry = outcome.candidates[f'X={x}'], results['thresholds'][x]
    assert candidate.pruned['conv_3'].tolist() == entry['pruned_channels']
    assert candidate.figures['channels_pruned'] == entry['channels_pruned']
    saved = keras_io.read_params(tmp_path / 'run' / entry['model_file'])
    for layer, weights in saved.items():
      for name, value in weights.items():
        np.testing.assert_array_equal(np.asarray(candidate.params[layer][name]), value)
  with open(tmp_path / 'run' / 'sweep.csv') as handle:
    swept = [float(row['clean_acc']) for row in csv.DictReader(handle)]
  np.testing.assert_allclose(outcome.figures['clean_acc'], swept, atol=1e-4)


def test_prune_job_writes_consistent_results(world, tmp_path):
  root, params = world
  workdir = tmp_path / 'run'
  results = runner.run(_config(root, thresholds=(2.0, 10.0, 95.0)), str(workdir))
  for name in ('sweep.csv', 'results.json', 'results.md', 'config.json', 'plots/sweep.png',
               'plots/thresholds.png', 'models/repaired_X=2.h5', 'models/repaired_X=10.h5'):
    assert (workdir / name).is_file(), name
  assert not (workdir / 'models' / 'repaired_X=95.h5').exists()
  for png in workdir.glob('plots/*.png'):
    assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'

  with open(workdir / 'sweep.csv') as handle:
    rows = list(csv.DictReader(handle))
  assert list(rows[0]) == ['step', 'channel', 'fraction_pruned', 'clean_acc', 'asr']
  assert len(rows) == 61 and rows[0]['channel'] == '' and float(rows[0]['clean_acc']) == 90
  order = [int(row['channel']) for row in rows[1:]]
  assert sorted(order) == list(range(60))

  assert json.loads((workdir / 'results.json').read_text()) == json.loads(json.dumps(results))
  test_clean = data.load_csaw_h5(root / 'data' / 'cl' / 'test.h5')
  test_poisoned = data.load_csaw_h5(root / 'data' / 'bd' / 'bd_test.h5')
  assert results['base']['test']['clean_acc'] == 90.0
  assert results['thresholds']['95']['reached'] is False
  for key in ('2', '10'):
    entry = results['thresholds'][key]
    level = entry['channels_pruned']
    assert entry['pruned_channels'] == order[:level]
    assert float(rows[level]['clean_acc']) <= 90 - float(key)
    assert float(rows[level - 1]['clean_acc']) > 90 - float(key)
    # The written B'_X is B with exactly those channels zeroed ...
    repaired = keras_io.read_params(workdir / 'models' / f'repaired_X={key}.h5')
    mask = np.ones(60)
    mask[entry['pruned_channels']] = 0
    expected = masks.prune(params, mask)
    for layer in params:
      for name in params[layer]:
        np.testing.assert_array_equal(repaired[layer][name], expected[layer][name])
    # ... and its figures, and GoodNet's, are those of a direct evaluation.
    # (results.json holds figures at 6 significant digits: workdir.tidy.)
    assert entry['repaired']['clean_acc'] == workdir_lib.tidy(evaluate.accuracy(
        repaired, test_clean.images, test_clean.labels))
    assert entry['repaired']['asr'] == workdir_lib.tidy(evaluate.attack_success_rate(
        repaired, test_poisoned.images, test_poisoned.labels))
    assert entry['goodnet'] == workdir_lib.tidy(goodnet.metrics(
        goodnet.predict(params, repaired, test_clean.images), test_clean.labels,
        goodnet.predict(params, repaired, test_poisoned.images), test_poisoned.labels,
        NUM_CLASSES))

  # A rerun into the same workdir replaces the results and leaves no temporary files.
  runner.run(_config(root, thresholds=(4.0,)), str(workdir))
  assert list(json.loads((workdir / 'results.json').read_text())['thresholds']) == ['4']
  assert not [p for p in workdir.rglob('*') if p.name.endswith('.tmp')]


@pytest.mark.parametrize('thresholds', [(0.0,), (-2.0,), (100.5,), (float('nan'),), ()])
def test_bad_thresholds_are_refused_before_any_work(world, tmp_path, thresholds):
  root, _ = world
  with pytest.raises(ConfigError, match='thresholds'):
    runner.run(_config(root, thresholds=thresholds), str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()


def test_bad_order_is_refused(world, tmp_path):
  root, _ = world
  with pytest.raises(ConfigError, match='order'):
    runner.run(_config(root, order='sideways'), str(tmp_path / 'run'))


def test_foreign_or_unwritable_workdir_is_refused(world, tmp_path):
  root, _ = world
  foreign = tmp_path / 'mine'
  foreign.mkdir()
  (foreign / 'thesis.tex').write_text('precious')
  with pytest.raises(WorkdirError, match='no badnet job wrote'):
    runner.run(_config(root), str(foreign))
  assert (foreign / 'thesis.tex').read_text() == 'precious'
  with pytest.raises(WorkdirError, match='not a directory'):
    runner.run(_config(root), str(foreign / 'thesis.tex'))


def test_model_that_does_not_fit_the_data_is_refused(world, tmp_path):
  root, _ = world
  small = model.init_params(5, seed=0)  # labels of the data go up to 10
  keras_io.write_keras_weights(tmp_path / 'small.h5', small)
  config = _config(root)
  config.model = str(tmp_path / 'small.h5')
  with pytest.raises(DataError, match='out of range'):
    runner.run(config, str(tmp_path / 'run'))
  # A file whose conv_3 kernel has 50 filters, not 60.
  keras_io.write_keras_weights(tmp_path / 'wrong.h5', model.init_params(NUM_CLASSES, seed=0))
  with h5py.File(tmp_path / 'wrong.h5', 'r+') as handle:
    del handle['conv_3/conv_3/kernel:0']
    handle['conv_3/conv_3/kernel:0'] = np.zeros((3, 3, 40, 50), np.float32)
  config.model = str(tmp_path / 'wrong.h5')
  with pytest.raises(ModelFileError, match=r'conv_3/kernel: expected shape \(3, 3, 40, 60\)'):
    runner.run(config, str(tmp_path / 'run2'))


def _main(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, 'main.py', *args], cwd=REPO, capture_output=True,
                        text=True, timeout=300, check=False)


def test_cli_bad_threshold_is_one_clear_line(world, tmp_path):
  root, _ = world
  result = _main('--config=configs/prune.py', f'--config.model={root / "bd_weights.h5"}',
                 f'--config.data.dir={root / "data"}',
                 '--config.pruning.thresholds=(2.0,150.0)', f'--workdir={tmp_path / "run"}')
  assert result.returncode == 1
  assert 'Traceback' not in result.stderr
  assert 'error: config.pruning.thresholds: 150.0 is not in (0, 100]' in result.stderr


def test_cli_classify_prints_goodnet_classes(world, tmp_path):
  root, params = world
  pruned = masks.prune(params, masks.prefix_masks(np.arange(60))[45])
  keras_io.write_keras(tmp_path / 'repaired.h5', pruned, full_model=True)
  images = helpers.varied_images(6, seed=5)
  paths = []
  for index, image in enumerate(images):
    paths.append(str(tmp_path / f'face_{index}.png'))
    Image.fromarray(image).save(paths[-1])
  result = _main('--config=configs/classify.py', f'--config.model={root / "bd_weights.h5"}',
                 f'--config.repaired={tmp_path / "repaired.h5"}',
                 f'--config.images={",".join(paths)}', f'--workdir={tmp_path / "run"}')
  assert result.returncode == 0, result.stderr
  expected = goodnet.predict(params, pruned, images)
  printed = [line.split() for line in result.stdout.splitlines() if line.startswith(str(tmp_path))]
  assert printed == [[p, str(c)] for p, c in zip(paths, expected)]


def test_default_prune_job_runs_on_the_shipped_benchmark(tmp_path):
  """The README's main job, as a newcomer runs it: no model, no data."""
  result = _main('--config=configs/prune.py', f'--workdir={tmp_path / "run"}')
  assert result.returncode == 0, result.stderr
  assert result.stdout.splitlines()[0].startswith('Running on the shipped synthetic benchmark')
  # Logs for people: where the results are last; no TPU probe, no sweep internals.
  assert result.stdout.splitlines()[-1].startswith(f'Results in {tmp_path / "run"}: ')
  assert "backend 'tpu'" not in result.stderr and 'Head rows' not in result.stderr
  results = json.loads((tmp_path / 'run' / 'results.json').read_text())
  assert results['synthetic_benchmark'] is True
  # The shipped BadNet is a working backdoor on its own held-out test split.
  assert results['base']['test']['clean_acc'] >= 95 and results['base']['test']['asr'] >= 99
  for x in ('2', '4', '10', '30'):
    entry = results['thresholds'][x]
    assert entry['reached'] and (tmp_path / 'run' / entry['model_file']).is_file()
  assert (tmp_path / 'run' / 'plots' / 'sweep.png').is_file()


# --- the prune job reads each file in chunks straight into its feature pass ---


def _paths(folder) -> dict:
  return {key: folder / relative for key, relative in inputs.CSAW_FILES.items()}


def _observe(paths, params, batch_size, keep_images=False):
  """The defence path's one pass over the four files: (data sets kept, labels, features)."""
  config = prune_config.get_config()
  files = defend._Files(paths, params, batch_size, config.precision, config.pruning.layer,
                        keep_images)
  return files.splits, files.labels, files.features


def test_streamed_features_equal_those_of_the_whole_files(world):
  """Chunks of 48 (partial last chunks, 120 and 60 images): bit for bit the whole-file pass."""
  root, params = world
  paths = _paths(root / 'data')
  splits, labels, features = _observe(paths, params, batch_size=48)
  assert splits == {}  # nothing kept: the images are dropped chunk by chunk
  for key, path in paths.items():
    whole = data.load_csaw_h5(path, NUM_CLASSES)
    np.testing.assert_array_equal(labels[key], whole.labels)
    expected = sweep.features(params, whole.images, batch_size=48)
    assert features[key].pool_3.tobytes() == expected.pool_3.tobytes(), key
    assert features[key].channel_means.tobytes() == expected.channel_means.tobytes(), key


def _blended_copy(world_root, folder):
  """The world's data with fractional pixels (float32 images on loading), 300 clean valid images."""
  for key, relative in inputs.CSAW_FILES.items():
    whole = data.load_csaw_h5(world_root / 'data' / relative)
    images = np.concatenate([whole.images] * (5 if key == 'clean_valid' else 1))
    labels = np.concatenate([whole.labels] * (5 if key == 'clean_valid' else 1))
    target = folder / relative
    target.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(target, 'w') as handle:
      handle['data'] = images.transpose(0, 3, 1, 2).astype(np.float64) * 0.75 + 0.25
      handle['label'] = labels.astype(np.float64)
  return _paths(folder)


def test_streaming_never_holds_a_files_images(world, tmp_path):
  """Peak host memory stays well under one file's float32 images."""
  root, params = world
  paths = _blended_copy(root, tmp_path)
  _observe(paths, params, batch_size=16)  # compile first: tracemalloc sees only the job's arrays
  whole_valid = 600 * 55 * 47 * 3 * 4  # bytes of clean valid's images as float32
  tracemalloc.start()
  try:
    _, _, features = _observe(paths, params, batch_size=16)
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  assert len(features['clean_valid'].pool_3) == 600
  # The features (4.8 KB an image, twice while a file's pieces are joined) and a few
  # chunks; a whole file's float32 images (31 KB an image) would not fit.
  assert peak < 0.6 * whole_valid, peak
  # Keeping the images (fine-pruning) holds them, which this bound would catch.
  tracemalloc.start()
  try:
    _observe(paths, params, batch_size=16, keep_images=True)
    assert tracemalloc.get_traced_memory()[1] > whole_valid
  finally:
    tracemalloc.stop()


def test_a_bad_chunk_in_a_later_file_stops_streaming_with_its_message(world, tmp_path):
  root, params = world
  paths = _blended_copy(root, tmp_path)
  with h5py.File(paths['poisoned_valid'], 'r+') as handle:
    handle['data'][50, 1, 20, 20] = np.nan
  threads = threading.active_count()
  with pytest.raises(DataError, match=re.escape(
      f'{paths["poisoned_valid"]}: dataset "data" holds NaN or inf (first in image 50)')):
    _observe(paths, params, batch_size=16)
  deadline = time.monotonic() + 10
  while threading.active_count() > threads and time.monotonic() < deadline:
    time.sleep(0.01)
  assert threading.active_count() == threads  # the reader thread has ended
