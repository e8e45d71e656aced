"""Keras 2 HDF5 files <-> Flax params, checked against the DeepID module.

Each weight is found through its layer's ``weight_names`` attribute, as Keras
does; every missing, extra or mis-shaped weight is reported in one message.
Files are written in the Keras 2 layout that Keras 2 and Keras 3 both read.
"""

import json
import os

import h5py
import numpy as np

from badnet.io import data
from badnet.core import model as model_lib
from badnet.errors import ModelFileError
from badnet.io.workdir import atomic_path

Params = model_lib.Params

_WEIGHT_ORDER = ('kernel', 'bias')  # Keras' order within a Conv2D/Dense layer
# keras_version is the Keras whose file layout we write; Keras 2 loaders branch on it.
_KERAS_ATTRS = {'backend': 'tensorflow', 'keras_version': '2.3.1'}


def _decode(value) -> str:
  return value.decode('utf8') if isinstance(value, bytes) else str(value)


def _read_layers(path: str, handle: h5py.File) -> dict[str, dict[str, np.ndarray]]:
  """Every layer's weights, by layer name and short weight name ('kernel'), in either layout."""
  full_model = 'model_weights' in handle and isinstance(handle['model_weights'], h5py.Group)
  root = handle['model_weights'] if full_model else handle
  if 'layer_names' in root.attrs:
    layer_names = [_decode(n) for n in root.attrs['layer_names']]
  else:
    layer_names = [n for n, g in root.items() if isinstance(g, h5py.Group)]
  layers = {}
  for layer in layer_names:
    if layer not in root:
      raise ModelFileError(f'{path}: layer "{layer}" is listed in layer_names but has no group')
    group = root[layer]
    weights = {}
    for full_name in (_decode(n) for n in group.attrs.get('weight_names', [])):
      if full_name not in group:
        raise ModelFileError(f'{path}: weight "{full_name}" of layer "{layer}" is listed '
                             f'but missing')
      # 'conv_1/kernel:0' (Keras 2) or 'kernel' (other writers) -> 'kernel'.
      short = full_name.split('/')[-1].split(':')[0]
      try:
        weights[short] = np.asarray(group[full_name][()])
      except (OSError, KeyError) as error:
        raise ModelFileError(f'{path}: weight "{full_name}" is unreadable ({error}); '
                             f'is the file truncated?') from None
    if weights:
      layers[layer] = weights
  return layers


def _check(path: str, layers: dict[str, dict[str, np.ndarray]],
           expected: dict[str, dict[str, tuple[int, ...]]]) -> None:
  """Raises one ModelFileError listing every difference from ``expected``."""
  problems = [f'missing layer "{layer}"' for layer in sorted(set(expected) - set(layers))]
  problems += [f'unexpected layer "{layer}" with weights {sorted(layers[layer])}'
               for layer in sorted(set(layers) - set(expected))]
  for layer in sorted(set(layers) & set(expected)):
    found, wanted = layers[layer], expected[layer]
    for name in sorted(set(wanted) - set(found)):
      problems.append(f'{layer}: missing weight "{name}" (expected shape {wanted[name]})')
    for name in sorted(set(found) - set(wanted)):
      problems.append(f'{layer}: unexpected weight "{name}" of shape {found[name].shape}')
    for name in sorted(set(found) & set(wanted)):
      array = found[name]
      if array.shape != wanted[name]:
        problems.append(f'{layer}/{name}: expected shape {wanted[name]}, found {array.shape}')
      elif not np.issubdtype(array.dtype, np.floating):
        problems.append(f'{layer}/{name}: dtype {array.dtype}, expected floats')
      elif not np.isfinite(array).all():
        problems.append(f'{layer}/{name}: holds NaN or inf')
  if problems:
    raise ModelFileError(
        f'{path}: does not match the CSAW DeepID architecture: ' + '; '.join(problems))


def read_params(path: str | os.PathLike, num_classes: int | None = None) -> Params:
  """Reads a Keras 2 weights-only or full-model file into float32 DeepID params."""
  path = str(path)
  with data.open_hdf5(path, ModelFileError, 'model') as handle:
    try:
      layers = _read_layers(path, handle)
    except OSError as error:  # a damaged group or attribute table
      raise ModelFileError(f'{path}: unreadable ({error}); is the file truncated?') from None
  if not layers:
    raise ModelFileError(f'{path}: holds no layer weights; is it a Keras model file?')
  if num_classes is None:
    bias = layers.get('output', {}).get('bias')
    num_classes = int(bias.shape[0]) if bias is not None and bias.ndim == 1 else (
        model_lib.CSAW_NUM_CLASSES)
  _check(path, layers, model_lib.param_shapes(num_classes))
  return {layer: {name: np.asarray(array, np.float32) for name, array in weights.items()}
          for layer, weights in layers.items()}


def _layer_specs(num_classes: int) -> list[tuple[str, str, dict, list[str]]]:
  """(class_name, layer name, config, inbound layer names) for the CSAW graph."""
  def conv(filters, size):
    return {'filters': filters, 'kernel_size': [size, size], 'strides': [1, 1],
            'padding': 'valid', 'data_format': 'channels_last', 'dilation_rate': [1, 1],
            'activation': 'relu', 'use_bias': True}
  pool = {'pool_size': [2, 2], 'padding': 'valid', 'strides': [2, 2],
          'data_format': 'channels_last'}
  dense = lambda units, activation: {'units': units, 'activation': activation, 'use_bias': True}
  return [
      ('InputLayer', 'input', {'batch_input_shape': [None, *model_lib.IMAGE_SHAPE],
                               'dtype': 'float32', 'sparse': False}, []),
      ('Conv2D', 'conv_1', conv(20, 4), ['input']),
      ('MaxPooling2D', 'pool_1', pool, ['conv_1']),
      ('Conv2D', 'conv_2', conv(40, 3), ['pool_1']),
      ('MaxPooling2D', 'pool_2', pool, ['conv_2']),
      ('Conv2D', 'conv_3', conv(60, 3), ['pool_2']),
      ('MaxPooling2D', 'pool_3', pool, ['conv_3']),
      ('Conv2D', 'conv_4', conv(80, 2), ['pool_3']),
      ('Flatten', 'flatten_1', {'data_format': 'channels_last'}, ['pool_3']),
      ('Flatten', 'flatten_2', {'data_format': 'channels_last'}, ['conv_4']),
      ('Dense', 'fc_1', dense(160, 'linear'), ['flatten_1']),
      ('Dense', 'fc_2', dense(160, 'linear'), ['flatten_2']),
      ('Add', 'add_1', {}, ['fc_1', 'fc_2']),
      ('Activation', 'activation_1', {'activation': 'relu'}, ['add_1']),
      ('Dense', 'output', dense(num_classes, 'softmax'), ['activation_1']),
  ]


# Keras layer names of the CSAW DeepID graph, in the order Keras lists them.
LAYER_NAMES = tuple(name for _, name, _, _ in _layer_specs(model_lib.CSAW_NUM_CLASSES))


def model_config(num_classes: int) -> dict:
  """The Keras 2 functional-model config of the CSAW DeepID net."""
  layers = []
  for class_name, name, config, inbound in _layer_specs(num_classes):
    config = {'name': name, 'trainable': True, **config}
    if class_name != 'InputLayer':
      config['dtype'] = 'float32'
    nodes = [[[source, 0, 0, {}] for source in inbound]] if inbound else []
    layers.append({'class_name': class_name, 'config': config, 'name': name,
                   'inbound_nodes': nodes})
  return {'class_name': 'Model',
          'config': {'name': 'model_1', 'layers': layers, 'input_layers': [['input', 0, 0]],
                     'output_layers': [['output', 0, 0]]}}


def _write_layers(root: h5py.Group, params: Params) -> None:
  root.attrs['layer_names'] = np.array([n.encode() for n in LAYER_NAMES])
  root.attrs.update(_KERAS_ATTRS)
  for layer in LAYER_NAMES:
    group = root.create_group(layer)
    weights = params.get(layer, {})
    names = [f'{layer}/{name}:0' for name in _WEIGHT_ORDER if name in weights]
    # Keras writes an empty float array for weightless layers; so do we.
    group.attrs['weight_names'] = np.array([n.encode() for n in names]) if names else (
        np.zeros((0,), np.float64))
    for name, full_name in zip(_WEIGHT_ORDER, names):
      group.create_dataset(full_name, data=np.asarray(weights[name], np.float32))


def write_keras(path: str | os.PathLike, params: Params, full_model: bool = False) -> None:
  """Writes params atomically as a Keras 2 weights-only or (``full_model``) full-model file."""
  arrays = {layer: {n: np.asarray(a) for n, a in w.items()} for layer, w in params.items()}
  _check(str(path), arrays, model_lib.param_shapes(model_lib.num_classes_of(params)))
  with atomic_path(path) as tmp, h5py.File(tmp, 'w') as handle:
    if full_model:
      handle.attrs['model_config'] = json.dumps(model_config(model_lib.num_classes_of(params)))
      handle.attrs.update(_KERAS_ATTRS)
      _write_layers(handle.create_group('model_weights'), params)
    else:
      _write_layers(handle, params)


def write_keras_weights(path: str | os.PathLike, params: Params) -> None:
  """Writes a Keras 2 weights-only file (``model.load_weights`` reads it)."""
  write_keras(path, params, full_model=False)
