"""The CSAW DeepID net written independently in Keras 3: the oracle of the port.

Built from the CSAW architecture description with the Keras functional API,
sharing no code with badnet.model, so a mistake in either shows as a mismatch.
"""

import os

os.environ.setdefault('KERAS_BACKEND', 'jax')

import keras  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top


def build_csaw_keras_model(num_classes: int) -> keras.Model:
  """The CSAW-HackML-2020 DeepID architecture with Keras layer names."""
  inputs = keras.Input((55, 47, 3), name='input')
  x = keras.layers.Conv2D(20, 4, activation='relu', name='conv_1')(inputs)
  x = keras.layers.MaxPooling2D(2, name='pool_1')(x)
  x = keras.layers.Conv2D(40, 3, activation='relu', name='conv_2')(x)
  x = keras.layers.MaxPooling2D(2, name='pool_2')(x)
  x = keras.layers.Conv2D(60, 3, activation='relu', name='conv_3')(x)
  pool_3 = keras.layers.MaxPooling2D(2, name='pool_3')(x)
  conv_4 = keras.layers.Conv2D(80, 2, activation='relu', name='conv_4')(pool_3)
  fc_1 = keras.layers.Dense(160, name='fc_1')(keras.layers.Flatten(name='flatten_1')(pool_3))
  fc_2 = keras.layers.Dense(160, name='fc_2')(keras.layers.Flatten(name='flatten_2')(conv_4))
  hidden = keras.layers.Activation('relu', name='activation_1')(
      keras.layers.Add(name='add_1')([fc_1, fc_2]))
  outputs = keras.layers.Dense(num_classes, activation='softmax', name='output')(hidden)
  return keras.Model(inputs, outputs)


def keras_logits(net: keras.Model, images: np.ndarray) -> np.ndarray:
  """Pre-softmax logits: Keras up to activation_1, then the output layer's affine map."""
  hidden_model = keras.Model(net.inputs, net.get_layer('activation_1').output)
  hidden = np.asarray(hidden_model.predict(np.asarray(images, np.float32), verbose=0),
                      np.float64)
  kernel, bias = (np.asarray(w, np.float64) for w in net.get_layer('output').get_weights())
  return hidden @ kernel + bias
