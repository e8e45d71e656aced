"""The CSAW DeepID net written independently in Keras 3: the oracle of the port.

Built from the CSAW architecture description with the Keras functional API,
sharing no code with badnet, so a mistake in either shows as a mismatch. Every
helper takes a ``keras.Model`` (built here or loaded from any file) and numpy
arrays, and returns numpy arrays.
"""

import os

os.environ['KERAS_BACKEND'] = 'jax'  # the one backend this project installs

import h5py  # pylint: disable=g-import-not-at-top
import keras  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

INPUT_SHAPE = (55, 47, 3)  # height, width, channels: Keras' channels-last image
CSAW_NUM_CLASSES = 1283


def build_csaw_keras_model(num_classes: int = CSAW_NUM_CLASSES) -> keras.Model:
  """The CSAW-HackML-2020 DeepID architecture, with the CSAW Keras layer names."""
  inputs = keras.Input(INPUT_SHAPE, name='input')
  x = keras.layers.Conv2D(20, (4, 4), padding='valid', activation='relu', name='conv_1')(inputs)
  x = keras.layers.MaxPooling2D((2, 2), name='pool_1')(x)
  x = keras.layers.Conv2D(40, (3, 3), padding='valid', activation='relu', name='conv_2')(x)
  x = keras.layers.MaxPooling2D((2, 2), name='pool_2')(x)
  x = keras.layers.Conv2D(60, (3, 3), padding='valid', activation='relu', name='conv_3')(x)
  pool_3 = keras.layers.MaxPooling2D((2, 2), name='pool_3')(x)
  conv_4 = keras.layers.Conv2D(80, (2, 2), padding='valid', activation='relu',
                               name='conv_4')(pool_3)
  fc_1 = keras.layers.Dense(160, name='fc_1')(keras.layers.Flatten(name='flatten_1')(pool_3))
  fc_2 = keras.layers.Dense(160, name='fc_2')(keras.layers.Flatten(name='flatten_2')(conv_4))
  hidden = keras.layers.Activation('relu', name='activation_1')(
      keras.layers.Add(name='add_1')([fc_1, fc_2]))
  outputs = keras.layers.Dense(num_classes, activation='softmax', name='output')(hidden)
  return keras.Model(inputs, outputs)


def load_keras_net(path, num_classes: int = CSAW_NUM_CLASSES) -> keras.Model:
  """Keras' own reading of a Keras 2 .h5 file.

  Full-model files (a ``model_config`` attribute) go through
  ``keras.models.load_model``; weights-only files are loaded into
  ``build_csaw_keras_model(num_classes)``.
  """
  with h5py.File(path, 'r') as handle:
    full_model = 'model_config' in handle.attrs
  if full_model:
    return keras.models.load_model(path, compile=False)
  net = build_csaw_keras_model(num_classes)
  net.load_weights(path)
  return net


def layer_output(net: keras.Model, layer: str, images: np.ndarray) -> np.ndarray:
  """The output of ``layer`` (e.g. 'pool_3') for float32 images [N, 55, 47, 3]."""
  sub_model = keras.Model(net.inputs, net.get_layer(layer).output)
  return np.asarray(sub_model.predict(np.asarray(images, np.float32), verbose=0))


def keras_logits(net: keras.Model, images: np.ndarray) -> np.ndarray:
  """Pre-softmax logits (float64): Keras up to activation_1, then the output layer's affine map.

  Done in float64 on the host, so the only float32 rounding is Keras' own up
  to activation_1.
  """
  hidden = np.asarray(layer_output(net, 'activation_1', images), np.float64)
  kernel, bias = (np.asarray(w, np.float64) for w in net.get_layer('output').get_weights())
  return hidden @ kernel + bias


def keras_params(net: keras.Model) -> dict[str, dict[str, np.ndarray]]:
  """The net's weights as {layer: {'kernel', 'bias'}} (Keras' own layouts), copied."""
  return {layer.name: {name: np.array(weight) for name, weight
                       in zip(('kernel', 'bias'), layer.get_weights())}
          for layer in net.layers if layer.get_weights()}


def random_keras_net(num_classes: int, seed: int, scale: float = 0.05) -> keras.Model:
  """A CSAW net with seeded normal(0, scale) weights and biases.

  Larger than Keras' default init (and with non-zero biases), so that its
  predictions vary with the input and a swapped or transposed weight shows.
  """
  net = build_csaw_keras_model(num_classes)
  rng = np.random.default_rng(seed)
  net.set_weights([rng.normal(0, scale, w.shape).astype(np.float32) for w in net.get_weights()])
  return net
