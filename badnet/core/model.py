"""The CSAW-HackML-2020 DeepID network as a Flax Linen module.

Layer names, kernel layouts and row-major (H, W, C) flattening are Keras', so
weights port without transposition. ``observe`` runs what a mask on a prunable
layer cannot change, ``resume`` the rest with the mask on its output: the same
as zeroing those channels' weights, as relu(0) = 0 and max-pooling zeros gives 0.

Convolutions and matrix products run at ``'highest'`` precision (true float32,
as Keras on a CPU) by default: accelerators' shortcuts (TF32, bf16 passes) can
flip a near tie between two classes.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

IMAGE_SHAPE = (55, 47, 3)  # height, width, channels (NHWC without N)
CSAW_NUM_CLASSES = 1283
FEATURE_LAYER = 'conv_3'  # the layer whose channels are pruned by default
PRUNABLE_LAYERS = ('conv_1', 'conv_2', 'conv_3', 'conv_4')
PRECISIONS = ('highest', 'high', 'default')  # jax.lax.Precision names
DEFAULT_PRECISION = 'highest'
Params = dict[str, Any]
# Layers whose neurons a learned mask scales (everything but the output layer).
NEURON_LAYERS = ('conv_1', 'conv_2', 'conv_3', 'conv_4', 'fc_1', 'fc_2')
# layer -> (weight scale [C], bias scale [C]) of its output neurons (see DeepID._unit).
NeuronScales = dict[str, tuple[jax.Array, jax.Array]]


def _window_corners(x: jax.Array) -> list[jax.Array]:
  """The four corners of every 2x2 window of ``x`` [N, H, W, C], in row-major order."""
  # VALID padding: an odd last row or column belongs to no window and is dropped.
  height, width = x.shape[1] // 2 * 2, x.shape[2] // 2 * 2
  return [x[:, row:height:2, column:width:2] for row in (0, 1) for column in (0, 1)]


@jax.custom_vjp
def max_pool(x: jax.Array) -> jax.Array:
  """2x2 max-pooling, stride 2, 'VALID': ``nn.max_pool``'s values and gradients, bit for bit.

  Strided-slice maxima with a custom VJP, because XLA's CPU code runs
  ``nn.max_pool`` (a reduce-window, and a scatter for its gradient) slowly.
  """
  top_left, top_right, bottom_left, bottom_right = _window_corners(x)
  return jnp.maximum(jnp.maximum(top_left, top_right), jnp.maximum(bottom_left, bottom_right))


def _max_pool_forward(x: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
  pooled = max_pool(x)
  return pooled, (x, pooled)


def _max_pool_backward(saved: tuple[jax.Array, jax.Array], grad: jax.Array) -> tuple[jax.Array]:
  x, pooled = saved
  parts, taken = [], jnp.zeros(pooled.shape, bool)
  for corner in _window_corners(x):
    first = (corner == pooled) & ~taken  # a tie's gradient goes to its first maximum only
    taken = taken | first
    parts.append(jnp.where(first, grad, 0.0))
  n, height, width, channels = pooled.shape
  # [N, h, w, 4, C] -> [N, h, 2, w, 2, C] -> [N, 2h, 2w, C], then zeros for a dropped row/column.
  windows = jnp.stack(parts, 3).reshape(n, height, width, 2, 2, channels)
  full = windows.transpose(0, 1, 3, 2, 4, 5).reshape(n, 2 * height, 2 * width, channels)
  return (jnp.pad(full, ((0, 0), (0, x.shape[1] - 2 * height), (0, x.shape[2] - 2 * width),
                         (0, 0))),)


max_pool.defvjp(_max_pool_forward, _max_pool_backward)


def _flatten(x: jax.Array) -> jax.Array:
  return x.reshape(x.shape[0], -1)


def _masked(x: jax.Array, channel_mask: jax.Array | None) -> jax.Array:
  """``x`` [N, H, W, C] with channels zeroed by a mask [C] (all rows) or [N, C] (per row)."""
  if channel_mask is None:
    return x
  channel_mask = jnp.asarray(channel_mask, x.dtype)
  if channel_mask.ndim == 2:
    channel_mask = channel_mask[:, None, None, :]
  return x * channel_mask


class DeepID(nn.Module):
  """DeepID as trained in the CSAW lab: raw 0..255 pixels in, logits out."""

  num_classes: int = CSAW_NUM_CLASSES
  precision: str = DEFAULT_PRECISION

  def setup(self):
    conv = lambda f, k: nn.Conv(f, (k, k), padding='VALID', precision=self.precision)
    dense = lambda f: nn.Dense(f, precision=self.precision)
    # Attribute names become parameter names: they must be the Keras names.
    self.conv_1 = conv(20, 4)
    self.conv_2 = conv(40, 3)
    self.conv_3 = conv(60, 3)
    self.conv_4 = conv(80, 2)
    self.fc_1 = dense(160)
    self.fc_2 = dense(160)
    self.output = dense(self.num_classes)

  def observe(self, images: jax.Array, layer: str = FEATURE_LAYER,
              neurons: NeuronScales | None = None) -> dict[str, jax.Array]:
    """What pruning ``layer`` cannot change: ``{'activation': [N, H, W, C]}``.

    The activation is the layer's output after its ReLU and any max-pooling.
    For conv_4 also ``'fc_1'``, which reads pool_3.
    """
    x = jnp.asarray(images, jnp.float32)
    x = max_pool(nn.relu(self._unit('conv_1', neurons, x)))
    if layer == 'conv_1':
      return {'activation': x}
    x = max_pool(nn.relu(self._unit('conv_2', neurons, x)))
    if layer == 'conv_2':
      return {'activation': x}
    x = max_pool(nn.relu(self._unit('conv_3', neurons, x)))
    if layer == 'conv_3':
      return {'activation': x}
    return {'activation': nn.relu(self._unit('conv_4', neurons, x)),
            'fc_1': self._unit('fc_1', neurons, _flatten(x))}

  def resume(self, state: dict[str, jax.Array], channel_mask: jax.Array | None = None,
             layer: str = FEATURE_LAYER, neurons: NeuronScales | None = None) -> jax.Array:
    """Logits from ``observe``'s state, with ``layer``'s channels masked ([C] or [N, C])."""
    x = _masked(state['activation'], channel_mask)
    if layer == 'conv_4':
      return self.output(nn.relu(state['fc_1'] + self._unit('fc_2', neurons, _flatten(x))))
    if layer == 'conv_1':
      x = max_pool(nn.relu(self._unit('conv_2', neurons, x)))
    if layer in ('conv_1', 'conv_2'):
      x = max_pool(nn.relu(self._unit('conv_3', neurons, x)))
    fc_1 = self._unit('fc_1', neurons, _flatten(x))
    fc_2 = self._unit('fc_2', neurons, _flatten(nn.relu(self._unit('conv_4', neurons, x))))
    return self.output(nn.relu(fc_1 + fc_2))

  def __call__(self, images: jax.Array, channel_mask: jax.Array | None = None,
               layer: str = FEATURE_LAYER, neurons: NeuronScales | None = None) -> jax.Array:
    """Logits [N, num_classes]: ``resume(observe(...))``, ``layer``'s channels masked."""
    return self.resume(self.observe(images, layer, neurons), channel_mask, layer, neurons)

  def _unit(self, name: str, neurons: NeuronScales | None, x: jax.Array) -> jax.Array:
    """Layer ``name`` on ``x``, its neurons scaled by ``neurons[name]`` if given.

    Neuron c is ``weight_scale[c] * (kernel_c . x) + bias_scale[c] * bias[c]``; the
    shared kernel makes ``vmap`` over scales one larger batch, not grouped convolutions.
    """
    module = getattr(self, name)
    if not neurons or name not in neurons:
      return module(x)
    weight_scale, bias_scale = neurons[name]
    kernel, bias = module.variables['params']['kernel'], module.variables['params']['bias']
    x = jnp.asarray(x, jnp.float32)
    if name.startswith('conv'):
      y = jax.lax.conv_general_dilated(x, kernel, (1, 1), 'VALID',
                                       dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                       precision=self.precision)
    else:
      y = jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())),
                              precision=self.precision)
    return y * weight_scale + bias * bias_scale


def init_params(num_classes: int = CSAW_NUM_CLASSES, seed: int = 0) -> Params:
  """Freshly initialised parameters as a plain nested dict."""
  model = DeepID(num_classes)
  dummy = jnp.zeros((1, *IMAGE_SHAPE), jnp.float32)
  return model.init(jax.random.key(seed), dummy)['params']


def param_shapes(num_classes: int) -> dict[str, dict[str, tuple[int, ...]]]:
  """Shape of every parameter, keyed like the params pytree (no computation)."""
  model = DeepID(num_classes)
  dummy = jax.ShapeDtypeStruct((1, *IMAGE_SHAPE), jnp.float32)
  shapes = jax.eval_shape(model.init, jax.random.key(0), dummy)['params']
  return {layer: {name: tuple(leaf.shape) for name, leaf in weights.items()}
          for layer, weights in shapes.items()}


def num_channels(params: Params, layer: str = FEATURE_LAYER) -> int:
  """Number of prunable channels of ``layer`` (its filters; conv_3 by default)."""
  return int(params[check_layer(layer)]['bias'].shape[0])


def check_layer(layer: str) -> str:
  """``layer`` if it is one of ``PRUNABLE_LAYERS``, else a ValueError."""
  if layer not in PRUNABLE_LAYERS:
    raise ValueError(f'unknown layer {layer!r}; expected one of {", ".join(PRUNABLE_LAYERS)}')
  return layer


def num_classes_of(params: Params) -> int:
  return int(params['output']['bias'].shape[0])


def check_precision(precision: str) -> str:
  """``precision`` if it is one of ``PRECISIONS``, else a ValueError."""
  if precision not in PRECISIONS:
    raise ValueError(f'unknown precision {precision!r}; expected one of {", ".join(PRECISIONS)}')
  return precision


def logits_fn(params: Params, images: jax.Array, channel_mask: jax.Array | None = None,
              precision: str = DEFAULT_PRECISION, layer: str = FEATURE_LAYER) -> jax.Array:
  """Pure apply: logits of ``images`` under ``params``, ``layer``'s channels masked (optional)."""
  return DeepID(num_classes_of(params), precision).apply(
      {'params': params}, images, channel_mask, check_layer(layer))


def neuron_logits_fn(params: Params, images: jax.Array, neurons: NeuronScales,
                     precision: str = DEFAULT_PRECISION) -> jax.Array:
  """Pure apply: logits with hidden neurons scaled, ``neurons[layer] = (weight, bias)`` scales."""
  return DeepID(num_classes_of(params), precision).apply(
      {'params': params}, images, None, FEATURE_LAYER, neurons)


def observe_fn(params: Params, images: jax.Array, layer: str = FEATURE_LAYER,
               precision: str = DEFAULT_PRECISION) -> dict[str, jax.Array]:
  """Pure apply: what pruning ``layer`` cannot change (see ``DeepID.observe``)."""
  return DeepID(num_classes_of(params), precision).apply(
      {'params': params}, images, check_layer(layer), method=DeepID.observe)


def resume_fn(params: Params, state: dict[str, jax.Array],
              channel_mask: jax.Array | None = None, layer: str = FEATURE_LAYER,
              precision: str = DEFAULT_PRECISION) -> jax.Array:
  """Pure apply: logits from ``observe_fn``'s state, ``layer``'s channels masked."""
  return DeepID(num_classes_of(params), precision).apply(
      {'params': params}, state, channel_mask, check_layer(layer), method=DeepID.resume)
