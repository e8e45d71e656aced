"""Bad input: every malformed data, image or model file gets one clear message."""

import os
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest
from PIL import Image

from badnet import data, evaluate, keras_io, model
from badnet.errors import DataError, ModelFileError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _h5(path, **datasets) -> str:
  with h5py.File(path, 'w') as handle:
    for name, value in datasets.items():
      handle[name] = value
  return str(path)


def _nchw(count: int = 4, dtype=np.float32, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (count, 3, 55, 47)).astype(dtype)


def test_nchw_nhwc_and_float64_files_load_to_the_same_uint8_images(tmp_path):
  pixels = _nchw(5, np.float64)
  labels = np.array([0, 1, 2, 3, 4])
  from_nchw = data.load_csaw_h5(_h5(tmp_path / 'a.h5', data=pixels, label=labels.astype(float)))
  from_nhwc = data.load_csaw_h5(_h5(tmp_path / 'b.h5', data=pixels.transpose(0, 2, 3, 1),
                                    label=labels))
  assert from_nchw.images.dtype == np.uint8 and from_nchw.images.shape == (5, 55, 47, 3)
  np.testing.assert_array_equal(from_nchw.images, pixels.transpose(0, 2, 3, 1))
  np.testing.assert_array_equal(from_nchw.images, from_nhwc.images)
  np.testing.assert_array_equal(from_nchw.labels, labels)


def test_written_csaw_file_is_read_back_exactly(tmp_path):
  images = np.random.default_rng(0).integers(0, 256, (7, 55, 47, 3)).astype(np.uint8)
  data.write_csaw_h5(tmp_path / 'x.h5', images, np.arange(7))
  with h5py.File(tmp_path / 'x.h5') as handle:  # the CSAW layout itself
    assert handle['data'].shape == (7, 3, 55, 47) and handle['label'].shape == (7,)
  loaded = data.load_csaw_h5(tmp_path / 'x.h5', num_classes=7)
  np.testing.assert_array_equal(loaded.images, images)
  np.testing.assert_array_equal(loaded.labels, np.arange(7))


def _bad_data_files(tmp_path):
  good = _nchw()
  labels = np.arange(4)
  nan, inf, negative, big, fraction = (good.copy() for _ in range(5))
  nan[1, 0, 3, 3] = np.nan
  inf[2, 1, 0, 0] = np.inf
  negative[0, 0, 0, 0] = -1
  big[3, 2, 54, 46] = 256
  fraction[0, 0, 1, 1] = 0.5
  cases = {
      'missing': (None, 'no such data file'),
      'no_data': (dict(label=labels), 'no dataset "data"'),
      'no_label': (dict(data=good), 'no dataset "label"'),
      'rank': (dict(data=good[:, 0], label=labels), 'has rank 3'),
      'shape': (dict(data=np.zeros((4, 3, 64, 64), np.float32), label=labels),
                'images of shape \\(3, 64, 64\\)'),
      'nan': (dict(data=nan, label=labels), 'NaN or inf \\(first in image 1\\)'),
      'inf': (dict(data=inf, label=labels), 'NaN or inf \\(first in image 2\\)'),
      'negative': (dict(data=negative, label=labels), 'values in \\[-1.0, 255.0\\]'),
      'too_big': (dict(data=big, label=labels), 'values in \\[0.0, 256.0\\]'),
      'fraction': (dict(data=fraction, label=labels), 'non-integer pixel values'),
      'text': (dict(data=np.array([b'x'] * 4), label=labels), 'rank 1'),
      'label_fraction': (dict(data=good, label=labels + 0.5), 'non-integer values'),
      'label_negative': (dict(data=good, label=labels - 1), 'negative labels'),
      'label_range': (dict(data=good, label=labels + 8), 'label 11, out of range'),
      'label_nan': (dict(data=good, label=np.array([0, np.nan, 1, 2])), '"label" holds NaN'),
      'label_2d': (dict(data=good, label=labels[:, None]), 'expected \\(N,\\)'),
      'length': (dict(data=good, label=labels[:3]), '4 images but 3 labels'),
      'empty': (dict(data=np.zeros((0, 3, 55, 47), np.float32), label=np.zeros(0)),
                'holds no images'),
  }
  for name, (datasets, message) in cases.items():
    path = tmp_path / f'{name}.h5'
    if datasets is not None:
      _h5(path, **datasets)
    yield name, path, message
  not_hdf5 = tmp_path / 'not_hdf5.h5'
  not_hdf5.write_text('label,pixels\n')
  yield 'not_hdf5', not_hdf5, 'not a readable HDF5 file'


def test_every_bad_data_file_gets_its_message(tmp_path):
  for name, path, message in _bad_data_files(tmp_path):
    with pytest.raises(DataError, match=message) as caught:
      data.load_csaw_h5(path, num_classes=10)
    assert str(path) in str(caught.value), name


def test_image_files(tmp_path):
  face = np.random.default_rng(0).integers(0, 256, (55, 47, 3)).astype(np.uint8)
  Image.fromarray(face).save(tmp_path / 'face.png')
  Image.fromarray(face).convert('RGBA').save(tmp_path / 'face_rgba.png')
  smooth = np.broadcast_to(np.linspace(0, 255, 47, dtype=np.uint8)[None, :, None], (55, 47, 3))
  Image.fromarray(np.ascontiguousarray(smooth)).save(tmp_path / 'face.jpg', quality=95)
  Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / 'big.png')
  (tmp_path / 'broken.png').write_bytes(b'\x89PNG\r\n\x1a\nnot really')
  np.testing.assert_array_equal(data.load_image(tmp_path / 'face.png'), face)
  np.testing.assert_array_equal(data.load_image(tmp_path / 'face_rgba.png'), face)
  jpeg = data.load_image(tmp_path / 'face.jpg')
  assert jpeg.shape == (55, 47, 3) and np.abs(jpeg.astype(int) - smooth).mean() < 3
  with pytest.raises(DataError, match='64 wide x 64 high; expected 47 x 55'):
    data.load_image(tmp_path / 'big.png')
  assert data.load_image(tmp_path / 'big.png', resize=True).shape == (55, 47, 3)
  with pytest.raises(DataError, match='broken.png: not a readable image'):
    data.load_images([tmp_path / 'face.png', tmp_path / 'broken.png'])
  with pytest.raises(DataError, match='no such image file'):
    data.load_image(tmp_path / 'nope.png')


@pytest.fixture
def weights_file(tmp_path):
  path = tmp_path / 'good.h5'
  keras_io.write_keras_weights(path, model.init_params(10, seed=0))
  return path


def _edit(path, edit) -> None:
  with h5py.File(path, 'r+') as handle:
    edit(handle)


def _replace(handle, name, value) -> None:
  del handle[name]
  handle[name] = value


def test_malformed_model_files(tmp_path, weights_file):
  assert model.num_classes_of(keras_io.read_params(weights_file)) == 10

  truncated = tmp_path / 'truncated.h5'
  truncated.write_bytes(weights_file.read_bytes()[:os.path.getsize(weights_file) // 2])
  not_hdf5 = tmp_path / 'not_hdf5.h5'
  not_hdf5.write_text('weights')
  wide = tmp_path / 'wide.h5'  # conv_3 with 50 filters: three weights change shape
  shutil.copy(weights_file, wide)
  _edit(wide, lambda h: (_replace(h, 'conv_3/conv_3/kernel:0', np.zeros((3, 3, 40, 50))),
                         _replace(h, 'conv_3/conv_3/bias:0', np.zeros(50)),
                         _replace(h, 'conv_4/conv_4/kernel:0', np.zeros((2, 2, 50, 80)))))
  missing = tmp_path / 'missing.h5'
  shutil.copy(weights_file, missing)
  _edit(missing, lambda h: h['conv_2'].attrs.__setitem__('weight_names', np.zeros(0)))
  extra = tmp_path / 'extra.h5'
  shutil.copy(weights_file, extra)
  def add_layer(handle):
    group = handle.create_group('fc_3')
    group['fc_3/kernel:0'] = np.zeros((160, 160))
    group.attrs['weight_names'] = [b'fc_3/kernel:0']
    handle.attrs['layer_names'] = list(handle.attrs['layer_names']) + [b'fc_3']
  _edit(extra, add_layer)
  nan = tmp_path / 'nan.h5'
  shutil.copy(weights_file, nan)
  _edit(nan, lambda h: h['fc_1/fc_1/bias:0'].__setitem__(3, np.nan))

  cases = [
      (tmp_path / 'absent.h5', 'no such model file'),
      (not_hdf5, 'not a readable HDF5 file'),
      (truncated, 'not a readable HDF5 file|truncated'),
      (wide, r'conv_3/bias: expected shape \(60,\), found \(50,\); conv_3/kernel: expected '
             r'shape \(3, 3, 40, 60\), found \(3, 3, 40, 50\); conv_4/kernel: expected '
             r'shape \(2, 2, 60, 80\), found \(2, 2, 50, 80\)'),
      (missing, 'missing layer "conv_2"'),
      (extra, 'unexpected layer "fc_3"'),
      (nan, 'fc_1/bias: holds NaN or inf'),
  ]
  for path, message in cases:
    with pytest.raises(ModelFileError, match=message) as caught:
      keras_io.read_params(path)
    assert str(path) in str(caught.value)
  with pytest.raises(ModelFileError, match=r'output/bias: expected shape \(1283,\)'):
    keras_io.read_params(weights_file, num_classes=1283)


# --- through the command line: one line on stderr, no traceback, exit 1 ---


def _evaluate(tmp_path, model_path, clean_path, workdir=None) -> subprocess.CompletedProcess:
  return subprocess.run(
      [sys.executable, 'main.py', '--config=configs/evaluate.py',
       f'--config.model={model_path}', f'--config.data.clean={clean_path}',
       f'--workdir={workdir or tmp_path / "run"}'],
      cwd=REPO, capture_output=True, text=True, timeout=300, check=False)


def test_cli_reports_bad_input_in_one_line(tmp_path, weights_file):
  clean = tmp_path / 'clean.h5'
  data.write_csaw_h5(clean, np.zeros((3, 55, 47, 3), np.uint8), np.array([0, 1, 12]))
  corrupt = tmp_path / 'corrupt.h5'
  corrupt.write_bytes(b'\x89HDF\r\n\x1a\n' + b'\0' * 100)
  foreign = tmp_path / 'foreign'
  foreign.mkdir()
  (foreign / 'notes.txt').write_text('mine')
  blocker = tmp_path / 'file'
  blocker.write_text('')
  cases = [
      (corrupt, clean, None, f'{corrupt}: not a readable HDF5 file'),
      (weights_file, clean, None, f'{clean}: dataset "label" holds label 12, out of range'),
      (weights_file, tmp_path / 'absent.h5', None, f'{tmp_path / "absent.h5"}: no such data'),
      (weights_file, clean, foreign, f'{foreign}: the workdir holds files that no badnet'),
      (weights_file, clean, blocker / 'run', f'{blocker / "run"}: the workdir is not writable'),
  ]
  for model_path, clean_path, workdir, message in cases:
    result = _evaluate(tmp_path, model_path, clean_path, workdir)
    assert result.returncode == 1, result.stderr
    assert 'Traceback' not in result.stderr
    error_lines = [l for l in result.stderr.splitlines() if l.startswith('error: ')]
    assert len(error_lines) == 1 and message in error_lines[0], result.stderr
  assert (foreign / 'notes.txt').read_text() == 'mine'


def test_cli_evaluate_prints_and_writes_the_figures(tmp_path):
  import json  # pylint: disable=g-import-not-at-top
  from tests import helpers  # pylint: disable=g-import-not-at-top
  params = model.init_params(10, seed=3)
  keras_io.write_keras_weights(tmp_path / 'net.h5', params)
  images = helpers.varied_images(40, seed=1)
  labels = np.arange(40) % 10
  poisoned = helpers.varied_images(30, seed=2)
  data.write_csaw_h5(tmp_path / 'clean.h5', images, labels)
  data.write_csaw_h5(tmp_path / 'poisoned.h5', poisoned, np.full(30, 9))
  result = subprocess.run(
      [sys.executable, 'main.py', '--config=configs/evaluate.py',
       f'--config.model={tmp_path / "net.h5"}', f'--config.data.clean={tmp_path / "clean.h5"}',
       f'--config.data.poisoned={tmp_path / "poisoned.h5"}', f'--workdir={tmp_path / "run"}'],
      cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr
  results = json.loads((tmp_path / 'run' / 'results.json').read_text())
  assert results['clean_acc'] == evaluate.accuracy(params, images, labels)
  assert results['asr'] == evaluate.accuracy(params, poisoned, np.full(30, 9))
  assert f'clean accuracy: {results["clean_acc"]:.2f} % (40 images' in result.stdout
  assert f'attack success rate: {results["asr"]:.2f} % (30 images' in result.stdout
