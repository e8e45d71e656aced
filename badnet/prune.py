"""The pruning defence as pure functions over parameter pytrees.

Channels of conv_3 (observed at pool_3) are ranked by their mean activation on
clean data and pruned in that order. Pruning channel c zeroes
``conv_3/kernel[..., c]`` and ``conv_3/bias[c]``, exactly what the Keras
notebooks did, which is the same as a 0 in a channel mask on pool_3.

Any of ``model.PRUNABLE_LAYERS`` can be pruned the same way (``layer=``):
channels are ranked by the mean of the layer's output after its ReLU and,
for conv_1..conv_3, its max-pooling; pruning zeroes the layer's kernel slice
and bias, the same as masking that output.
"""

import functools
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from badnet import evaluate
from badnet import model as model_lib
from badnet.errors import ConfigError

Params = model_lib.Params
ORDERS = ('increasing', 'decreasing', 'random')
Order = Literal['increasing', 'decreasing', 'random']


def _channel_means(params: Params, images: jax.Array, *, layer: str) -> jax.Array:
  # Per-image mean over H and W; the host averages over images in float64.
  return model_lib.observe_fn(params, images, layer)['activation'].mean(axis=(1, 2))


@functools.cache
def _channel_means_step(layer: str):
  return functools.partial(_channel_means, layer=model_lib.check_layer(layer))


def mean_activations(params: Params, images: np.ndarray,
                     batch_size: int = evaluate.DEFAULT_BATCH_SIZE,
                     layer: str = model_lib.FEATURE_LAYER) -> np.ndarray:
  """Mean activation of each channel of ``layer`` over N, H and W (float64 [C]).

  The activation is the layer's output after its ReLU and, for conv_1..conv_3,
  its max-pooling (pool_3 for conv_3, as the published lab runs ranked).
  """
  per_image = evaluate.map_batches(_channel_means_step(layer), params, (images,), batch_size)
  return per_image.astype(np.float64).mean(axis=0)


def pruning_order(activations: np.ndarray, order: Order = 'increasing',
                  seed: int = 0) -> np.ndarray:
  """Channel indices in the order they are pruned.

  Args:
    activations: mean activation per channel [C].
    order: 'increasing' (dormant first: Fine-Pruning and the published lab
      runs), 'decreasing' (what the lab text literally says) or 'random'
      (a seeded baseline). Ties are broken by channel index.
    seed: the seed of the 'random' order.
  """
  activations = np.asarray(activations)
  if order == 'increasing':
    return np.argsort(activations, kind='stable')
  if order == 'decreasing':
    # Stable on the negated values keeps lower indices first among ties.
    return np.argsort(-activations, kind='stable')
  if order == 'random':
    return np.random.default_rng(seed).permutation(len(activations))
  raise ConfigError(f'unknown pruning order {order!r}; expected one of {", ".join(ORDERS)}')


def prefix_masks(order: np.ndarray) -> np.ndarray:
  """Masks [C + 1, C] (float32): level k keeps every channel but ``order[:k]``."""
  num_channels = len(order)
  masks = np.ones((num_channels + 1, num_channels), np.float32)
  for level in range(1, num_channels + 1):
    masks[level:, order[level - 1]] = 0.0
  return masks


def prune(params: Params, channel_mask: jax.Array,
          layer: str = model_lib.FEATURE_LAYER) -> Params:
  """Params with ``layer``'s channels where ``channel_mask`` is 0 zeroed (kernel and bias).

  A pure jax.numpy function: it works on host or device arrays and under
  ``jit``, ``vmap`` (over masks or params) and ``grad``. Never mutates
  ``params``; every other layer is shared, not copied.
  """
  keep = jnp.asarray(channel_mask) != 0
  weights = params[model_lib.check_layer(layer)]
  if keep.shape[-1:] != weights['bias'].shape:
    raise ValueError(f'channel mask of shape {keep.shape} for a {layer} with '
                     f'{weights["bias"].shape[0]} channels')
  pruned = {'kernel': jnp.where(keep, weights['kernel'], 0.0),
            'bias': jnp.where(keep, weights['bias'], 0.0)}
  return {**params, layer: pruned}


def check_mask(channel_mask: np.ndarray, num_channels: int) -> np.ndarray:
  """A host mask checked to be 0/1 of length ``num_channels``; returned as float32."""
  mask = np.asarray(channel_mask)
  if mask.shape != (num_channels,):
    raise ValueError(f'channel mask of shape {mask.shape}; expected ({num_channels},)')
  if not np.isin(mask, (0, 1)).all():
    raise ValueError(f'channel mask holds values other than 0 and 1: '
                     f'{np.unique(mask[~np.isin(mask, (0, 1))])[:5]}')
  return mask.astype(np.float32)


def pruned_channels(channel_mask: np.ndarray) -> np.ndarray:
  """Indices of the channels a mask prunes."""
  return np.flatnonzero(np.asarray(channel_mask) == 0)


def select_level(clean_acc: np.ndarray, drop: float, relative: bool = False) -> int | None:
  """The first pruning level whose clean accuracy is at least ``drop`` below level 0's.

  Args:
    clean_acc: clean accuracy in percent at levels 0..C (level 0 = unpruned).
    drop: X, in percentage points (or, if ``relative``, percent of level 0's
      accuracy).
    relative: measure the drop relative to the unpruned accuracy.

  Returns:
    The level (number of channels pruned), or None if no level drops that far.
  """
  clean_acc = np.asarray(clean_acc, np.float64)
  limit = clean_acc[0] * (1 - drop / 100) if relative else clean_acc[0] - drop
  # A small tolerance so that a drop of exactly X points counts despite rounding.
  reached = np.flatnonzero(clean_acc[1:] <= limit + 1e-9)
  return int(reached[0]) + 1 if len(reached) else None
