"""Hard pruning: channel c of a layer pruned by zeroing its ``kernel[..., c]`` and ``bias[c]``.

As in the Keras notebooks; the same as a 0 in a mask on the layer's output
(``model.apply``), because relu(0) = 0 and max-pooling zeros gives zero. ANP and RNP
zero the kernel slice only (``keep_bias``), as their originals zero BatchNorm's gamma and
keep beta: the neuron then outputs its bias, exactly what their learned mask of 0 gives.
"""

import jax
import jax.numpy as jnp
import numpy as np

from badnet.core import model as model_lib

Params = model_lib.Params


def prune(params: Params, channel_mask: jax.Array,
          layer: str = model_lib.FEATURE_LAYER) -> Params:
  """Params with ``layer``'s channels where ``channel_mask`` is 0 zeroed; other layers shared.

  Works under ``jit`` and ``grad``. Under ``vmap`` over masks every leaf gets
  the mask axis, so to stack many pruned nets vmap ``prune_layer`` instead.
  """
  weights = params[model_lib.check_layer(layer)]
  return {**params, layer: prune_layer(weights, channel_mask, layer)}


def prune_layer(weights: dict[str, jax.Array], channel_mask: jax.Array,
                layer: str = model_lib.FEATURE_LAYER, keep_bias: bool = False
                ) -> dict[str, jax.Array]:
  """One layer's {'kernel', 'bias'} with the masked output channels zeroed (kernel only where
  ``keep_bias``)."""
  keep = jnp.asarray(channel_mask) != 0
  if keep.shape[-1:] != weights['bias'].shape:
    raise ValueError(f'channel mask of shape {keep.shape} for a {layer} with '
                     f'{weights["bias"].shape[0]} channels')
  return {'kernel': jnp.where(keep, weights['kernel'], 0.0),
          'bias': weights['bias'] if keep_bias else jnp.where(keep, weights['bias'], 0.0)}


def prefix_masks(order: np.ndarray) -> np.ndarray:
  """Masks [C + 1, C] (float32): level k keeps every channel but ``order[:k]``."""
  num_channels = len(order)
  masks = np.ones((num_channels + 1, num_channels), np.float32)
  for level in range(1, num_channels + 1):
    masks[level:, order[level - 1]] = 0.0
  return masks


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


def prune_neurons(params: Params, pruned: dict[str, np.ndarray], keep_bias: bool = False
                  ) -> Params:
  """Params with the neurons ``pruned[layer]`` (indices) of several layers zeroed (kernel, and
  bias unless ``keep_bias``)."""
  pruned_params = dict(params)
  for layer, indices in pruned.items():
    mask = np.ones(params[layer]['bias'].shape, np.float32)
    mask[np.asarray(indices, np.int64)] = 0.0
    pruned_params[layer] = prune_layer(params[layer], mask, layer, keep_bias)
  return pruned_params
