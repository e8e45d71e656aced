"""Bad input: every malformed data, image or model file gets one clear message naming it."""

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest
from PIL import Image

from badnet.core import evaluate, model
from badnet.io import data, keras_io
from badnet.io import workdir as workdir_lib
from badnet.errors import DataError, ModelFileError
from tests import helpers

REPO = pathlib.Path(__file__).resolve().parents[1]
NUM_CLASSES = 10


def _h5(path: pathlib.Path, **datasets) -> pathlib.Path:
  with h5py.File(path, 'w') as handle:
    for name, value in datasets.items():
      handle[name] = value
  return path


def _nchw(count: int = 4, dtype=np.float32, seed: int = 0) -> np.ndarray:
  """Random raw pixels in the CSAW layout, N x 3 x 55 x 47."""
  return np.random.default_rng(seed).integers(0, 256, (count, 3, 55, 47)).astype(dtype)


# --- data files ---


def test_nchw_nhwc_and_float64_files_load_to_the_same_uint8_images(tmp_path):
  """float64 NCHW (the real valid.h5), float32/uint8 NHWC: identical uint8 NHWC, exact values."""
  pixels = _nchw(5, np.float64)
  nhwc = pixels.transpose(0, 2, 3, 1)
  labels = np.array([0, 1, 2, 3, 9])
  loaded = [
      data.load_csaw_h5(_h5(tmp_path / 'nchw64.h5', data=pixels, label=labels.astype(float)),
                        NUM_CLASSES),
      data.load_csaw_h5(_h5(tmp_path / 'nhwc32.h5', data=nhwc.astype(np.float32), label=labels)),
      data.load_csaw_h5(_h5(tmp_path / 'nhwc8.h5', data=nhwc.astype(np.uint8),
                            label=labels.astype(np.int64))),
  ]
  for dataset in loaded:
    assert dataset.images.dtype == np.uint8 and dataset.images.shape == (5, 55, 47, 3)
    assert dataset.labels.dtype == np.int32
    np.testing.assert_array_equal(dataset.images, nhwc)  # exactly the stored values
    np.testing.assert_array_equal(dataset.labels, labels)


def test_written_csaw_file_is_read_back_exactly(tmp_path):
  """write_csaw_h5 writes the CSAW layout (N x 3 x 55 x 47) and load_csaw_h5 inverts it."""
  images = np.random.default_rng(0).integers(0, 256, (7, 55, 47, 3)).astype(np.uint8)
  data.write_csaw_h5(tmp_path / 'x.h5', images, np.arange(7))
  with h5py.File(tmp_path / 'x.h5', 'r') as handle:
    assert handle['data'].shape == (7, 3, 55, 47) and handle['label'].shape == (7,)
  loaded = data.load_csaw_h5(tmp_path / 'x.h5', num_classes=7)
  np.testing.assert_array_equal(loaded.images, images)
  np.testing.assert_array_equal(loaded.labels, np.arange(7))


def _with(pixels: np.ndarray, index: tuple[int, ...], value: float) -> np.ndarray:
  pixels = pixels.copy()
  pixels[index] = value
  return pixels


_GOOD, _LABELS = _nchw(), np.arange(4)
# name -> (datasets, or None for no file; the message expected after the path)
BAD_DATA_FILES = {
    'missing': (None, 'no such data file'),
    'no_data': (dict(label=_LABELS), 'no dataset "data"'),
    'no_label': (dict(data=_GOOD), 'no dataset "label"'),
    'label_is_group': (dict(data=_GOOD, **{'label/x': _LABELS}), 'no dataset "label"'),
    'rank_3': (dict(data=_GOOD[:, 0], label=_LABELS), 'has rank 3'),
    'rank_5': (dict(data=_GOOD[None], label=_LABELS), 'has rank 5'),
    'shape': (dict(data=np.zeros((4, 3, 64, 64), np.float32), label=_LABELS),
              r'images of shape \(3, 64, 64\)'),
    'height_width_swapped': (dict(data=np.zeros((4, 47, 55, 3), np.float32), label=_LABELS),
                             r'images of shape \(47, 55, 3\)'),
    'nan': (dict(data=_with(_GOOD, (1, 0, 3, 3), np.nan), label=_LABELS),
            r'NaN or inf \(first in image 1\)'),
    'inf': (dict(data=_with(_GOOD, (2, 1, 0, 0), -np.inf), label=_LABELS),
            r'NaN or inf \(first in image 2\)'),
    'negative': (dict(data=_with(_GOOD, (0, 0, 0, 0), -1), label=_LABELS),
                 r'values in \[-1.0, 255.0\]; expected pixel values in 0..255'),
    'too_big': (dict(data=_with(_GOOD, (3, 2, 54, 46), 256), label=_LABELS),
                r'values in \[0.0, 256.0\]'),
    # Fractional pixels are accepted (blended triggers), but not outside 0..255.
    'fraction_too_big': (dict(data=_with(_GOOD, (3, 0, 1, 1), 255.5), label=_LABELS),
                         r'values in \[0.0, 255.5\]; expected pixel values in 0..255'),
    'fraction_negative': (dict(data=_with(_GOOD, (0, 2, 9, 9), -0.5), label=_LABELS),
                          r'values in \[-0.5, 255.0\]; expected pixel values in 0..255'),
    'fraction_nan': (dict(data=_with(_with(_GOOD, (0, 0, 0, 0), 0.5), (2, 0, 0, 0), np.nan),
                          label=_LABELS), r'NaN or inf \(first in image 2\)'),
    # Fractions all in [0, 1]: pixels normalised for another net, which would read as black.
    'normalised': (dict(data=_GOOD / 255, label=_LABELS), r'all in \[0, 1\]: normalised pixels'),
    'text': (dict(data=np.array([b'x'] * 4), label=_LABELS), 'rank 1'),
    'label_fraction': (dict(data=_GOOD, label=_LABELS + 0.5), '"label" holds non-integer'),
    'label_negative': (dict(data=_GOOD, label=_LABELS - 1), 'negative labels'),
    'label_range': (dict(data=_GOOD, label=_LABELS + 7),
                    r'label 10, out of range for a model with 10 classes \(0..9\)'),
    'label_nan': (dict(data=_GOOD, label=np.array([0, np.nan, 1, 2])), '"label" holds NaN'),
    'label_text': (dict(data=_GOOD, label=np.array([b'a'] * 4)), '"label" has dtype'),
    'label_2d': (dict(data=_GOOD, label=_LABELS[:, None]), r'expected \(N,\)'),
    'length': (dict(data=_GOOD, label=_LABELS[:3]), '4 images but 3 labels'),
    'empty': (dict(data=np.zeros((0, 3, 55, 47), np.float32), label=np.zeros(0)),
              'holds no images'),
}


def bad_data_file(folder: pathlib.Path, name: str) -> tuple[pathlib.Path, str]:
  """BAD_DATA_FILES[name]'s file, written under ``folder`` (absent for 'missing'); its message."""
  datasets, message = BAD_DATA_FILES[name]
  path = folder / f'{name}.h5'
  if datasets is not None:
    _h5(path, **datasets)
  return path, message


@pytest.mark.parametrize('name', BAD_DATA_FILES)
def test_bad_data_file_gets_its_message(tmp_path, name):
  """Each malformed CSAW file raises DataError: the path, then what is wrong with it."""
  path, message = bad_data_file(tmp_path, name)
  with pytest.raises(DataError, match=message) as caught:
    data.load_csaw_h5(path, num_classes=NUM_CLASSES)
  assert str(caught.value).startswith(f'{path}: ')


@pytest.mark.parametrize('pixels', [_GOOD * (254.75 / 255), _with(_GOOD, (3, 0, 1, 1), 0.5)],
                         ids=['all_fractional', 'one_fraction'])
def test_fractional_pixel_values_load_as_float32_not_refused(tmp_path, pixels):
  """Non-integer values in 0..255 (once refused) load as float32, exactly the file's values."""
  path = _h5(tmp_path / 'fraction.h5', data=pixels, label=_LABELS)
  loaded = data.load_csaw_h5(path, num_classes=NUM_CLASSES)
  assert loaded.images.dtype == np.float32
  np.testing.assert_array_equal(loaded.images, pixels.transpose(0, 2, 3, 1))


@pytest.mark.parametrize('content', [b'', b'label,pixels\n0,1 2 3\n', b'\x89HDF\r\n\x1a\n'],
                         ids=['zero_bytes', 'csv', 'hdf5_signature_only'])
def test_a_file_that_is_not_hdf5_gets_its_message(tmp_path, content):
  """Empty, text and cut-short files are 'not a readable HDF5 file', for data and models."""
  path = tmp_path / 'file.h5'
  path.write_bytes(content)
  message = f'^{re.escape(str(path))}: not a readable HDF5 file'
  with pytest.raises(DataError, match=message):
    data.load_csaw_h5(path)
  with pytest.raises(ModelFileError, match=message):
    keras_io.read_params(path)


# --- image files ---


def test_image_files(tmp_path):
  """PNG, RGBA PNG and JPEG faces load as uint8 [55, 47, 3]; wrong sizes only with resize."""
  face = np.random.default_rng(0).integers(0, 256, (55, 47, 3)).astype(np.uint8)
  Image.fromarray(face).save(tmp_path / 'face.png')
  Image.fromarray(face).convert('RGBA').save(tmp_path / 'face_rgba.png')
  Image.fromarray(face[..., 0]).save(tmp_path / 'face_grey.png')
  smooth = np.ascontiguousarray(np.broadcast_to(
      np.linspace(0, 255, 47).astype(np.uint8)[None, :, None], (55, 47, 3)))
  Image.fromarray(smooth).save(tmp_path / 'face.jpg', quality=95)
  Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / 'big.png')
  Image.fromarray(np.zeros((47, 55, 3), np.uint8)).save(tmp_path / 'turned.png')

  np.testing.assert_array_equal(data.load_image(tmp_path / 'face.png'), face)
  np.testing.assert_array_equal(data.load_image(tmp_path / 'face_rgba.png'), face)
  np.testing.assert_array_equal(data.load_image(tmp_path / 'face_grey.png'),
                                np.repeat(face[..., :1], 3, axis=2))
  jpeg = data.load_image(tmp_path / 'face.jpg')
  assert jpeg.dtype == np.uint8 and jpeg.shape == (55, 47, 3)
  assert np.abs(jpeg.astype(int) - smooth).mean() < 3  # lossy, but the same picture
  stacked = data.load_images([tmp_path / 'face.png', tmp_path / 'face.jpg'])
  assert stacked.shape == (2, 55, 47, 3) and stacked.dtype == np.uint8
  for name, size in (('big.png', '64 wide x 64 high'), ('turned.png', '55 wide x 47 high')):
    message = f'{tmp_path / name}: image is {size}; expected 47 x 55'
    with pytest.raises(DataError, match=re.escape(message)):
      data.load_image(tmp_path / name)
    assert data.load_image(tmp_path / name, resize=True).shape == (55, 47, 3)


@pytest.mark.parametrize('content', [b'\x89PNG\r\n\x1a\nnot really', b'\xff\xd8\xff\xe0JFIF',
                                     b'', b'hello'],
                         ids=['cut_png', 'cut_jpeg', 'zero_bytes', 'text'])
def test_a_corrupt_image_file_gets_its_message(tmp_path, content):
  """load_images names the one bad file among good ones."""
  good = tmp_path / 'good.png'
  Image.fromarray(np.zeros((55, 47, 3), np.uint8)).save(good)
  bad = tmp_path / 'bad.png'
  bad.write_bytes(content)
  with pytest.raises(DataError, match=f'^{re.escape(str(bad))}: not a readable image'):
    data.load_images([good, bad])
  absent = tmp_path / 'nope.png'
  with pytest.raises(DataError, match=f'^{re.escape(str(absent))}: no such image file'):
    data.load_image(absent)
  with pytest.raises(DataError, match='no image files given'):
    data.load_images([])


def test_real_competition_images_load(csaw_dir):
  """Every 47x55 face image shipped with the CSAW samples loads as uint8 [55, 47, 3]."""
  paths = sorted(p for p in (csaw_dir / 'samples').iterdir()
                 if p.suffix.lower() in ('.png', '.jpg', '.jpeg'))
  assert len(paths) >= 5
  images = data.load_images(paths)
  assert images.shape == (len(paths), 55, 47, 3) and images.dtype == np.uint8
  assert all(image.std() > 10 for image in images)  # real pictures, not blanks


# --- model files ---


@pytest.fixture
def weights_file(tmp_path) -> pathlib.Path:
  """A valid weights-only file of a random 10-class net, written by write_keras_weights."""
  path = tmp_path / 'good.h5'
  keras_io.write_keras_weights(path, model.init_params(NUM_CLASSES, seed=0))
  return path


def _edited_copy(source: pathlib.Path, path: pathlib.Path, edit) -> pathlib.Path:
  shutil.copy(source, path)
  with h5py.File(path, 'r+') as handle:
    edit(handle)
  return path


def _replace(handle: h5py.File, name: str, value: np.ndarray) -> None:
  del handle[name]
  handle[name] = value


def _widen_conv_3(handle: h5py.File) -> None:
  """conv_3 with 50 filters: conv_3's kernel and bias and conv_4's kernel change shape."""
  _replace(handle, 'conv_3/conv_3/kernel:0', np.zeros((3, 3, 40, 50), np.float32))
  _replace(handle, 'conv_3/conv_3/bias:0', np.zeros(50, np.float32))
  _replace(handle, 'conv_4/conv_4/kernel:0', np.zeros((2, 2, 50, 80), np.float32))


def _add_fc_3(handle: h5py.File) -> None:
  group = handle.create_group('fc_3')
  group['fc_3/kernel:0'] = np.zeros((160, 160), np.float32)
  group.attrs['weight_names'] = [b'fc_3/kernel:0']
  handle.attrs['layer_names'] = [*handle.attrs['layer_names'], b'fc_3']


def _drop_bias_name(handle: h5py.File) -> None:
  handle['conv_2'].attrs['weight_names'] = [b'conv_2/kernel:0']


def _set_nan(handle: h5py.File) -> None:
  handle['fc_1/fc_1/bias:0'][3] = np.nan


def _dangling_name(handle: h5py.File) -> None:
  del handle['fc_2/fc_2/bias:0']


def test_model_file_with_the_wrong_architecture_names_every_bad_weight(tmp_path, weights_file):
  """conv_3 with 50 filters: all three mis-shaped weights, expected and found, in one message."""
  path = _edited_copy(weights_file, tmp_path / 'wide.h5', _widen_conv_3)
  with pytest.raises(ModelFileError) as caught:
    keras_io.read_params(path)
  message = str(caught.value)
  assert message.startswith(f'{path}: does not match the CSAW DeepID architecture')
  for expected in ('conv_3/bias: expected shape (60,), found (50,)',
                   'conv_3/kernel: expected shape (3, 3, 40, 60), found (3, 3, 40, 50)',
                   'conv_4/kernel: expected shape (2, 2, 60, 80), found (2, 2, 50, 80)'):
    assert expected in message
  assert '\n' not in message


MODEL_EDITS = {
    'missing_layer': (lambda h: h['conv_2'].attrs.__setitem__('weight_names', np.zeros(0)),
                      'missing layer "conv_2"'),
    'missing_weight': (_drop_bias_name,
                       r'conv_2: missing weight "bias" \(expected shape \(40,\)\)'),
    'extra_layer': (_add_fc_3, r'unexpected layer "fc_3" with weights \[\'kernel\'\]'),
    'nan_weight': (_set_nan, 'fc_1/bias: holds NaN or inf'),
    'dangling_weight_name': (_dangling_name, 'weight "fc_2/bias:0" of layer "fc_2" is listed'),
}


@pytest.mark.parametrize('name', MODEL_EDITS)
def test_malformed_model_file_gets_its_message(tmp_path, weights_file, name):
  """A valid file with one defect: ModelFileError naming the file and the defect."""
  edit, message = MODEL_EDITS[name]
  path = _edited_copy(weights_file, tmp_path / f'{name}.h5', edit)
  with pytest.raises(ModelFileError, match=message) as caught:
    keras_io.read_params(path)
  assert str(caught.value).startswith(f'{path}: ')


def test_missing_truncated_and_mismatched_model_files(tmp_path, weights_file):
  """Absent, cut in half, other class count, Keras 3's own format: each a clear error."""
  assert model.num_classes_of(keras_io.read_params(weights_file)) == NUM_CLASSES
  truncated = tmp_path / 'truncated.h5'
  truncated.write_bytes(weights_file.read_bytes()[:os.path.getsize(weights_file) // 2])
  cases = [
      (tmp_path / 'absent.h5', {}, 'no such model file'),
      (truncated, {}, 'not a readable HDF5 file|truncated'),
      (weights_file, {'num_classes': 1283},
       r'output/bias: expected shape \(1283,\), found \(10,\)'),
  ]
  for path, kwargs, message in cases:
    with pytest.raises(ModelFileError, match=message) as caught:
      keras_io.read_params(path, **kwargs)
    assert str(caught.value).startswith(f'{path}: ')


def test_keras_3_native_weights_file_is_refused_clearly(tmp_path):
  """Keras 3's .weights.h5 layout is not the Keras 2 one: an error naming the file."""
  from tests import keras_oracle  # pylint: disable=g-import-not-at-top
  path = tmp_path / 'net.weights.h5'
  keras_oracle.build_csaw_keras_model(NUM_CLASSES).save_weights(path)
  with pytest.raises(ModelFileError, match=f'^{re.escape(str(path))}: '):
    keras_io.read_params(path)


# --- through the command line: one line on stderr, no traceback, exit status 1 ---


def _main(*flags: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, 'main.py', '--config=configs/evaluate.py', *flags],
                        cwd=REPO, capture_output=True, text=True, timeout=300, check=False)


def test_cli_reports_bad_input_in_one_line(tmp_path, weights_file):
  """Corrupt model, labels out of range, missing data, foreign or unwritable workdir."""
  clean = tmp_path / 'clean.h5'
  data.write_csaw_h5(clean, np.zeros((3, 55, 47, 3), np.uint8), np.array([0, 1, 12]))
  corrupt = tmp_path / 'corrupt.h5'
  corrupt.write_bytes(weights_file.read_bytes()[:2000])
  foreign = tmp_path / 'foreign'
  foreign.mkdir()
  (foreign / 'notes.txt').write_text('mine')
  blocker = tmp_path / 'a_file'
  blocker.write_text('')
  absent = tmp_path / 'absent.h5'
  run = tmp_path / 'run'
  cases = [
      (corrupt, clean, run, f'{corrupt}: not a readable HDF5 file'),
      (weights_file, clean, run, f'{clean}: dataset "label" holds label 12, out of range'),
      (weights_file, absent, run, f'{absent}: no such data file'),
      (weights_file, clean, foreign, f'{foreign}: the workdir holds files that no badnet'),
      (weights_file, clean, blocker / 'run', f'{blocker / "run"}: the workdir is not writable'),
  ]
  for model_path, clean_path, workdir, message in cases:
    result = _main(f'--config.model={model_path}', f'--config.data.clean={clean_path}',
                   f'--workdir={workdir}')
    assert result.returncode == 1, (message, result.stderr)
    assert 'Traceback' not in result.stderr + result.stdout, result.stderr
    lines = result.stderr.strip().splitlines()
    # The message is one line, and it is the last thing printed.
    assert lines and lines[-1].startswith(f'error: {message}'), (message, result.stderr)
    assert sum(line.startswith('error: ') for line in lines) == 1, result.stderr
  assert sorted(os.listdir(foreign)) == ['notes.txt']  # untouched
  assert (foreign / 'notes.txt').read_text() == 'mine'


def test_cli_evaluate_prints_and_writes_the_figures(tmp_path):
  """A good run: printed clean accuracy and ASR equal results.json and evaluate.accuracy."""
  params = helpers.random_params(NUM_CLASSES, seed=3)
  keras_io.write_keras_weights(tmp_path / 'net.h5', params)
  images, labels = helpers.varied_images(40, seed=1), np.arange(40) % NUM_CLASSES
  poisoned, target = helpers.varied_images(30, seed=2), np.full(30, 9)
  # Labels that agree with the net on part of the set, so the figures are not 0 or 100.
  labels[:15] = evaluate.predict(params, images[:15])
  target[:10] = evaluate.predict(params, poisoned[:10])
  data.write_csaw_h5(tmp_path / 'clean.h5', images, labels)
  data.write_csaw_h5(tmp_path / 'poisoned.h5', poisoned, target)
  result = _main(f'--config.model={tmp_path / "net.h5"}',
                 f'--config.data.clean={tmp_path / "clean.h5"}',
                 f'--config.data.poisoned={tmp_path / "poisoned.h5"}',
                 '--config.batch_size=16', f'--workdir={tmp_path / "run"}')
  assert result.returncode == 0, result.stderr
  results = json.loads((tmp_path / 'run' / 'results.json').read_text())
  clean_acc = evaluate.accuracy(params, images, labels)
  asr = evaluate.attack_success_rate(params, poisoned, target)
  assert 0 < clean_acc < 100 and 0 < asr < 100
  assert results['clean_acc'] == workdir_lib.tidy(clean_acc)
  assert results['asr'] == workdir_lib.tidy(asr)
  assert (f'clean accuracy: {clean_acc:.2f} % (40 images, {tmp_path / "clean.h5"})'
          in result.stdout)
  assert (f'attack success rate: {asr:.2f} % (30 images, {tmp_path / "poisoned.h5"})'
          in result.stdout)
  assert not any(line.startswith('error') for line in result.stderr.splitlines())
