"""Port parity: the Flax DeepID against Keras itself, on the real nets and on random ones."""

import h5py
import keras
import numpy as np
import pytest

from badnet.core import model
from badnet.io import keras_io
from tests import keras_oracle

# Every real net in ../shared/csaw: four weights-only competition nets and the
# lab3 net, a full-model file, and seven full-model pruned lab3 nets.
REAL_NETS = ['lab3_bd_weights.h5', 'sunglasses_bd_weights.h5', 'anonymous_1_bd_weights.h5',
             'anonymous_2_bd_weights.h5', 'multi_trigger_multi_target_bd_weights.h5',
             'bd_net_RECONSTRUCTED_from_lab3_bd_weights.h5',
             'pruned/jianqiaomo_model_B_2.h5', 'pruned/jianqiaomo_model_B_4.h5',
             'pruned/jianqiaomo_model_B_10.h5', 'pruned/jianqiaomo_model_B_30.h5',
             'pruned/ml_hw_lab_model_X=2.h5', 'pruned/ml_hw_lab_model_X=4.h5',
             'pruned/ml_hw_lab_model_X=10.h5']
RTOL, ATOL = 1e-4, 1e-3
# Extra absolute slack on uniform-noise inputs, as a fraction of the row's
# largest |logit|; see _assert_close_on_noise.
NOISE_ROW_RTOL = 1e-6


def _random_pixels(count: int, seed: int) -> np.ndarray:
  """Seeded uniform integer pixels 0..255, as float32 [count, 55, 47, 3]."""
  rng = np.random.default_rng(seed)
  return rng.integers(0, 256, (count, *model.IMAGE_SHAPE)).astype(np.float32)


def _flax_logits(params: model.Params, images: np.ndarray) -> np.ndarray:
  return np.asarray(model.apply(params, images), np.float64)


def _worst(ours: np.ndarray, theirs: np.ndarray, tolerance: np.ndarray) -> float:
  return float(np.max(np.abs(ours - theirs) / tolerance))


def _assert_close(ours: np.ndarray, theirs: np.ndarray) -> None:
  """|ours - theirs| <= ATOL + RTOL |theirs| everywhere, and the same argmax on every row."""
  worst = _worst(ours, theirs, ATOL + RTOL * np.abs(theirs))
  assert worst <= 1, f'logits differ by {worst:.3g}x the tolerance (rtol {RTOL}, atol {ATOL})'
  np.testing.assert_array_equal(ours.argmax(1), theirs.argmax(1))


def _assert_close_on_noise(ours: np.ndarray, theirs: np.ndarray) -> None:
  """As _assert_close, with atol raised to 1e-6 of the row's largest |logit| where that is larger.

  Used for the real nets, whose logits reach ~1e4 on noise and on some real
  faces too (anonymous_2).

  Uniform noise drives the four competition nets' logits to |z| ~ 1e4, where a
  float32 ulp is 1e-3 and a logit that cancels to near 0 carries an absolute
  error of several 1e-3 in ANY float32 implementation: against a float64 numpy
  forward pass, Keras and Flax are both off by ~1e-2 there while they differ
  from each other by at most 6e-3 (up to ~3x the plain tolerance). So the slack scales
  with the row's logits, at a few ulps of its largest one; argmax is still
  exact.
  """
  row_scale = np.abs(theirs).max(axis=1, keepdims=True)
  atol = np.maximum(ATOL, NOISE_ROW_RTOL * row_scale)
  worst = _worst(ours, theirs, atol + RTOL * np.abs(theirs))
  assert worst <= 1, f'logits differ by {worst:.3g}x the tolerance'
  np.testing.assert_array_equal(ours.argmax(1), theirs.argmax(1))


@pytest.mark.parametrize('name', REAL_NETS)
def test_real_net_logits_match_keras(csaw_file, real_faces, name):
  """read_params + apply equal Keras' own loading of each real file, on faces and on noise."""
  path = csaw_file(name)
  params = keras_io.read_params(path)
  assert model.num_classes_of(params) == model.CSAW_NUM_CLASSES
  net = keras_oracle.load_keras_net(path)
  faces = np.concatenate([real_faces['clean'], real_faces['poisoned']]).astype(np.float32)
  _assert_close_on_noise(_flax_logits(params, faces), keras_oracle.keras_logits(net, faces))
  noise = _random_pixels(200, seed=REAL_NETS.index(name))
  _assert_close_on_noise(_flax_logits(params, noise), keras_oracle.keras_logits(net, noise))


def test_lab3_net_classifies_the_real_faces(csaw_file, real_faces):
  """The lab3 BadNet: clean faces as labelled, every sunglasses face as the target 0."""
  params = keras_io.read_params(csaw_file('lab3_bd_weights.h5'))
  np.testing.assert_array_equal(real_faces['clean_labels'],
                                [79, 443, 319, 294, 921, 1129, 481, 346, 1000, 471])
  np.testing.assert_array_equal(real_faces['poisoned_labels'], np.zeros(10))
  clean = np.argmax(model.apply(params, real_faces['clean']), axis=1)
  poisoned = np.argmax(model.apply(params, real_faces['poisoned']), axis=1)
  np.testing.assert_array_equal(clean, real_faces['clean_labels'])
  np.testing.assert_array_equal(poisoned, np.zeros(10))


def _assert_params_equal(ours: model.Params, theirs: model.Params) -> None:
  """Same layers, same weight names, bit-identical float32 values."""
  assert set(ours) == set(theirs)
  for layer in theirs:
    assert set(ours[layer]) == set(theirs[layer]), layer
    for name in theirs[layer]:
      assert np.asarray(ours[layer][name]).dtype == np.float32, (layer, name)
      np.testing.assert_array_equal(ours[layer][name], theirs[layer][name], f'{layer}/{name}')


def test_keras_saved_full_model_is_read_to_the_same_params_and_logits(tmp_path):
  """A file written by Keras' own legacy HDF5 writer reads to Keras' weights and logits."""
  net = keras_oracle.random_keras_net(7, seed=1)
  path = tmp_path / 'net.h5'
  net.save(path)  # the .h5 suffix selects Keras' legacy full-model format
  with h5py.File(path, 'r') as handle:
    assert 'model_config' in handle.attrs and 'model_weights' in handle
  params = keras_io.read_params(path)
  _assert_params_equal(params, keras_oracle.keras_params(net))
  images = _random_pixels(64, seed=2)
  flax, keras_ = _flax_logits(params, images), keras_oracle.keras_logits(net, images)
  _assert_close(flax, keras_)
  assert len(np.unique(keras_.argmax(1))) > 1  # the comparison is not of a constant


@pytest.mark.parametrize('full_model', [False, True], ids=['weights_only', 'full_model'])
def test_export_then_keras_reload_gives_the_same_logits(tmp_path, full_model):
  """write_keras_weights / write_keras(full_model=True): Keras reloads bit-exact weights."""
  params = keras_oracle.keras_params(keras_oracle.random_keras_net(9, seed=3))
  path = tmp_path / 'exported.h5'
  if full_model:
    keras_io.write_keras(path, params, full_model=True)
    reloaded = keras.models.load_model(path, compile=False)
  else:
    keras_io.write_keras_weights(path, params)
    reloaded = keras_oracle.build_csaw_keras_model(9)
    reloaded.load_weights(path)
  assert [layer.name for layer in reloaded.layers] == list(keras_io.LAYER_NAMES)
  _assert_params_equal(keras_oracle.keras_params(reloaded), params)
  images = _random_pixels(64, seed=4)
  _assert_close(_flax_logits(params, images), keras_oracle.keras_logits(reloaded, images))
  _assert_params_equal(keras_io.read_params(path), params)  # and badnet reads it back


def test_exported_flax_params_are_stored_bit_for_bit(tmp_path):
  """Flax-initialised (jax.Array) params land in the Keras 2 datasets unchanged."""
  params = model.init_params(11, seed=6)
  path = tmp_path / 'flax.h5'
  keras_io.write_keras_weights(path, params)
  with h5py.File(path, 'r') as handle:
    for layer, weights in params.items():
      for name, value in weights.items():
        stored = handle[f'{layer}/{layer}/{name}:0']
        assert stored.dtype == np.float32
        np.testing.assert_array_equal(stored[()], np.asarray(value), f'{layer}/{name}')
  net = keras_oracle.load_keras_net(path, num_classes=11)
  images = _random_pixels(32, seed=7)
  _assert_close(_flax_logits(params, images), keras_oracle.keras_logits(net, images))
