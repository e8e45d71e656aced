"""Port parity: the Flax DeepID against Keras itself, on real and random nets."""

import numpy as np
import pytest

from badnet import keras_io, model
from tests import keras_oracle

REAL_NETS = ['lab3_bd_weights.h5', 'sunglasses_bd_weights.h5', 'anonymous_1_bd_weights.h5',
             'anonymous_2_bd_weights.h5', 'multi_trigger_multi_target_bd_weights.h5',
             'bd_net_RECONSTRUCTED_from_lab3_bd_weights.h5',
             'pruned/jianqiaomo_model_B_2.h5', 'pruned/jianqiaomo_model_B_4.h5',
             'pruned/jianqiaomo_model_B_10.h5', 'pruned/jianqiaomo_model_B_30.h5',
             'pruned/ml_hw_lab_model_X=2.h5', 'pruned/ml_hw_lab_model_X=4.h5',
             'pruned/ml_hw_lab_model_X=10.h5']


def _random_pixels(count: int, seed: int) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (count, *model.IMAGE_SHAPE)).astype(
      np.float32)


def _keras_net(path) -> 'keras.Model':
  """Keras' own reading of a file: load_model for full models, load_weights otherwise."""
  import h5py  # pylint: disable=g-import-not-at-top
  import keras  # pylint: disable=g-import-not-at-top
  with h5py.File(path, 'r') as handle:
    full_model = 'model_config' in handle.attrs
  if full_model:
    return keras.models.load_model(path, compile=False)
  net = keras_oracle.build_csaw_keras_model(model.CSAW_NUM_CLASSES)
  net.load_weights(path)
  return net


def _assert_same_logits(flax_logits, keras_logits) -> None:
  """rtol 1e-4, atol 1e-3, and argmax equal on every row.

  Uniform-noise pixels drive the real nets' logits to |z| ~ 5000, where one
  float32 ulp is 5e-4 and a 160-term sum that cancels to near 0 carries an
  error of a few 1e-3 in any float32 implementation (Keras' included). So atol
  grows with the row's largest logit: 1e-6 of it (a few ulps), never below 1e-3.
  """
  flax_logits, keras_logits = np.asarray(flax_logits), np.asarray(keras_logits)
  row_scale = np.abs(keras_logits).max(axis=1, keepdims=True)
  tolerance = 1e-3 + 1e-4 * np.abs(keras_logits) + np.maximum(0, 1e-6 * row_scale - 1e-3)
  worst = np.max(np.abs(flax_logits - keras_logits) / tolerance)
  assert worst <= 1, f'logits differ by {worst:.2f}x the tolerance'
  np.testing.assert_array_equal(np.argmax(flax_logits, 1), np.argmax(keras_logits, 1))


@pytest.mark.parametrize('name', REAL_NETS)
def test_real_net_logits_match_keras(csaw_dir, real_faces, name):
  path = csaw_dir / name
  params = keras_io.read_params(path)
  net = _keras_net(path)
  faces = np.concatenate([real_faces['clean'], real_faces['poisoned']]).astype(np.float32)
  for images in (faces, _random_pixels(200, seed=len(name))):
    _assert_same_logits(np.asarray(model.logits_fn(params, images)),
                        keras_oracle.keras_logits(net, images))


def test_lab3_net_classifies_the_real_faces(csaw_dir, real_faces):
  params = keras_io.read_params(csaw_dir / 'lab3_bd_weights.h5')
  clean = np.argmax(model.logits_fn(params, real_faces['clean']), 1)
  poisoned = np.argmax(model.logits_fn(params, real_faces['poisoned']), 1)
  np.testing.assert_array_equal(clean, real_faces['clean_labels'])
  np.testing.assert_array_equal(poisoned, np.zeros(10))


def _random_keras_net(num_classes: int, seed: int):
  import keras  # pylint: disable=g-import-not-at-top
  keras.utils.set_random_seed(seed)
  net = keras_oracle.build_csaw_keras_model(num_classes)
  # Larger than Keras' default init, so that predictions vary with the input.
  rng = np.random.default_rng(seed)
  net.set_weights([rng.normal(0, 0.05, w.shape).astype(np.float32) for w in net.get_weights()])
  return net


def test_keras_saved_full_model_is_read_to_the_same_logits(tmp_path):
  net = _random_keras_net(7, seed=1)
  net.save(tmp_path / 'net.h5')  # Keras' own legacy HDF5 writer
  params = keras_io.read_params(tmp_path / 'net.h5')
  images = _random_pixels(64, seed=2)
  _assert_same_logits(np.asarray(model.logits_fn(params, images)),
                      keras_oracle.keras_logits(net, images))


@pytest.mark.parametrize('full_model', [False, True])
def test_export_then_keras_reload_gives_the_same_logits(tmp_path, full_model):
  import keras  # pylint: disable=g-import-not-at-top
  net = _random_keras_net(9, seed=3)
  params = {layer.name: dict(zip(('kernel', 'bias'), layer.get_weights()))
            for layer in net.layers if layer.get_weights()}
  path = tmp_path / 'exported.h5'
  keras_io.write_keras(path, params, full_model=full_model)
  if full_model:
    reloaded = keras.models.load_model(path, compile=False)
  else:
    reloaded = keras_oracle.build_csaw_keras_model(9)
    reloaded.load_weights(path)
  for layer in reloaded.layers:  # bit for bit
    for weight, name in zip(layer.get_weights(), ('kernel', 'bias')):
      np.testing.assert_array_equal(weight, params[layer.name][name])
  images = _random_pixels(64, seed=4)
  _assert_same_logits(np.asarray(model.logits_fn(params, images)),
                      keras_oracle.keras_logits(reloaded, images))
  # And badnet reads its own file back to the same params.
  again = keras_io.read_params(path)
  for layer in params:
    for name in params[layer]:
      np.testing.assert_array_equal(again[layer][name], params[layer][name])
