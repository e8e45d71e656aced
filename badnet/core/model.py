"""The CSAW-HackML-2020 DeepID network as one pure function over its parameters, ``apply``.

Layer names, kernel layouts and row-major (H, W, C) flattening are Keras', so
weights port without transposition. ``apply(stop=layer)`` runs what a mask on a
prunable layer cannot change, ``apply(start=layer)`` the rest with the mask on its
output: the same as zeroing those channels' weights, as relu(0) = 0 and
max-pooling zeros gives 0.

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
# layer -> (weight scale [C], bias scale [C]) of its output neurons (see ``apply``).
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


def linear(params: Params, name: str, x: jax.Array, precision: str = DEFAULT_PRECISION,
           conv_as_matmul: bool = False) -> jax.Array:
  """Layer ``name``'s kernel applied to ``x``, without its bias (convolutions VALID, stride 1).

  ``conv_as_matmul`` computes a convolution as one matrix product over its patches: the same
  sum in another order, which XLA's CPU code runs faster for conv_4's small maps.
  """
  kernel = params[name]['kernel']
  x = jnp.asarray(x, jnp.float32)
  if kernel.ndim == 2:
    return jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=precision)
  if not conv_as_matmul:
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), 'VALID',
                                        dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                        precision=precision)
  taps_h, taps_w, channels, filters = kernel.shape
  out_h, out_w = x.shape[1] - taps_h + 1, x.shape[2] - taps_w + 1
  # Patch channels in the kernel's (tap row, tap column, channel) order.
  patches = jnp.concatenate([x[:, i:i + out_h, j:j + out_w, :]
                             for i in range(taps_h) for j in range(taps_w)], axis=-1)
  return jnp.dot(patches, kernel.reshape(taps_h * taps_w * channels, filters),
                 precision=precision)


def apply(params: Params, inputs: jax.Array | dict[str, jax.Array],
          channel_mask: jax.Array | None = None, layer: str | None = None, *,
          start: str | None = None, stop: str | None = None, neurons: NeuronScales | None = None,
          precision: str = DEFAULT_PRECISION, conv_4_as_matmul: bool = False
          ) -> jax.Array | dict[str, jax.Array]:
  """DeepID, pure: logits [N, classes] of raw 0..255 images, or a part of the net.

  Args:
    channel_mask: scales ``layer``'s output channels, [C] (every row) or [N, C] (per row).
    layer: the prunable layer the mask is on (default ``start`` or ``stop``, else conv_3).
    start: a prunable layer: ``inputs`` is the state ``stop=start`` returned, and the net runs
      from there (the mask, then the layers after it).
    stop: a prunable layer: return its state, unmasked: ``{'activation': [N, H, W, C]}``, its
      output after ReLU and any max-pooling, and for conv_4 also ``'fc_1'``, which reads pool_3.
    neurons: ``{layer: (weight scale [C], bias scale [C])}``: neuron c of a scaled layer is
      ``weight_scale[c] * (kernel_c . x) + bias_scale[c] * bias[c]``.
    conv_4_as_matmul: see ``linear``.
  """
  layer = check_layer(layer or start or stop or FEATURE_LAYER)
  check_layer(stop or layer)
  if start is not None and layer != start:
    raise ValueError(f'a mask on {layer} cannot apply to a net started after {start}')
  neurons = neurons or {}

  def unit(name: str, x: jax.Array) -> jax.Array:
    y = linear(params, name, x, precision, conv_4_as_matmul and name == 'conv_4')
    if name in neurons:
      weight_scale, bias_scale = neurons[name]
      return y * weight_scale + params[name]['bias'] * bias_scale
    return y + params[name]['bias']

  if start is None:
    state, remaining = {'activation': jnp.asarray(inputs, jnp.float32)}, PRUNABLE_LAYERS
  else:
    state, remaining = dict(inputs), PRUNABLE_LAYERS[PRUNABLE_LAYERS.index(start) + 1:]
    state['activation'] = _masked(state['activation'], channel_mask)
  for name in remaining:
    x = state['activation']
    if name == 'conv_4':
      state = {'fc_1': unit('fc_1', _flatten(x)), 'activation': nn.relu(unit('conv_4', x))}
    else:
      state = {'activation': max_pool(nn.relu(unit(name, x)))}
    if name == stop:
      return state
    if name == layer:
      state['activation'] = _masked(state['activation'], channel_mask)
  fc_2 = unit('fc_2', _flatten(state['activation']))
  return unit('output', nn.relu(state['fc_1'] + fc_2))


class _Layer(nn.Module):
  """One layer's kernel and bias, initialised as Flax's Conv and Dense initialise theirs."""
  kernel_shape: tuple[int, ...]

  @nn.compact
  def __call__(self) -> Params:
    return {'kernel': self.param('kernel', nn.initializers.lecun_normal(), self.kernel_shape),
            'bias': self.param('bias', nn.initializers.zeros_init(), self.kernel_shape[-1:])}


class _DeepIDParams(nn.Module):
  """DeepID's parameters under their Keras names; ``apply`` is the net."""
  num_classes: int

  @nn.compact
  def __call__(self) -> Params:
    return {name: _Layer(shape, name=name)() for name, shape in kernel_shapes(self.num_classes)}


def kernel_shapes(num_classes: int) -> list[tuple[str, tuple[int, ...]]]:
  """Each layer's kernel shape, in the order the net runs them (fc_1 reads pool_3)."""
  height, width, channels = IMAGE_SHAPE
  shapes = []
  for name, size, filters in (('conv_1', 4, 20), ('conv_2', 3, 40), ('conv_3', 3, 60)):
    shapes.append((name, (size, size, channels, filters)))
    height, width, channels = (height - size + 1) // 2, (width - size + 1) // 2, filters
  shapes.append(('fc_1', (height * width * channels, 160)))
  shapes.append(('conv_4', (2, 2, channels, 80)))
  shapes.append(('fc_2', ((height - 1) * (width - 1) * 80, 160)))
  shapes.append(('output', (160, num_classes)))
  return shapes


def init_params(num_classes: int = CSAW_NUM_CLASSES, seed: int = 0) -> Params:
  """Freshly initialised parameters as a plain nested dict."""
  return _DeepIDParams(num_classes).init_with_output(jax.random.key(seed))[1]['params']


def param_shapes(num_classes: int) -> dict[str, dict[str, tuple[int, ...]]]:
  """Shape of every parameter, keyed like the params pytree (no computation)."""
  return {name: {'bias': shape[-1:], 'kernel': shape}
          for name, shape in sorted(kernel_shapes(num_classes))}


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
