"""The exact pruning sweep: features once per image, the head only where pruning changes it.

Level k of a sweep zeroes conv_3 channels ``order[:k]``. Three facts make it cheap without
changing a single prediction:

1. Masking happens after pool_3, so conv_1..pool_3 run once per image (``features``), a pass
   that also gives the channel means the ranking needs.
2. If channel ``order[k - 1]`` is zero everywhere in an image's pool_3, level k feeds the head
   the same input as level k - 1, so the head runs only at level 0 and at the levels whose
   channel is active on the image; the others copy the class of the level before.
3. A channel that is zero in every image of the file, or pruned, adds only zero terms, so each
   head reads only the live channels its level keeps, at one of a few widths (``head_widths``).

Each class is the head applied to exactly what the naive zero-the-channel-and-predict loop feeds
it, so the classes equal that loop's image by image: no incremental sums, no tolerance (the
conv_4 product and the narrow heads sum the same non-zero terms in another order). Pruning
conv_1, conv_2 or conv_4 (``layer=``) works the same through ``model.apply``'s ``stop`` and
``start``; ``masked_logits`` is the pure, traceable form.
"""

import dataclasses
from collections.abc import Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from badnet.core import cache, evaluate, masks
from badnet.core import model as model_lib

Params = model_lib.Params


@dataclasses.dataclass(frozen=True)
class Features:
  """What one pass of the layers up to the pruned one gives, per image."""
  state: dict[str, np.ndarray]  # model.apply(stop=layer)'s output: 'activation' (and 'fc_1')
  channel_means: np.ndarray     # float32 [N, C]: each image's mean over H and W
  layer: str = model_lib.FEATURE_LAYER

  @property
  def activation(self) -> np.ndarray:
    """The pruned layer's output [N, H, W, C] (pool_3 for conv_3)."""
    return self.state['activation']

  @property
  def pool_3(self) -> np.ndarray:
    if self.layer != 'conv_3':
      raise AttributeError(f'features of {self.layer} hold no pool_3')
    return self.activation

  def mean_activations(self) -> np.ndarray:
    """Mean activation per channel over N, H, W (float64 [C]), as ``pruning.mean_activations``."""
    return self.channel_means.astype(np.float64).mean(axis=0)

  def active(self) -> np.ndarray:
    """bool [N, C]: the channel is non-zero somewhere in the image's activation."""
    return (self.activation != 0).any(axis=(1, 2))


def _features_step(params: Params, images: jax.Array, *, layer: str, precision: str
                   ) -> tuple[dict[str, jax.Array], jax.Array]:
  state = model_lib.apply(params, images, stop=layer, precision=precision)
  return state, state['activation'].mean(axis=(1, 2))


def features(params: Params, images: np.ndarray,
             batch_size: int = evaluate.DEFAULT_BATCH_SIZE,
             precision: str = model_lib.DEFAULT_PRECISION,
             layer: str = model_lib.FEATURE_LAYER, fixed_batch: bool = False) -> Features:
  """The pruned layer's activation and per-image channel means of ``images``, in one pass.

  ``fixed_batch`` pads every step to ``batch_size`` rows: chunks of any length, one compilation.
  """
  state, means = evaluate.map_batches(
      cache.bind(_features_step, layer=model_lib.check_layer(layer),
                 precision=model_lib.check_precision(precision)),
      params, (images,), batch_size, fixed_batch)
  return Features(state, means, layer)


def concatenate(pieces: Sequence[Features]) -> Features:
  """The features of the images of ``pieces`` one after the other (one layer)."""
  layers = {piece.layer for piece in pieces}
  if len(layers) != 1:
    raise ValueError(f'features of one layer expected, got {sorted(layers)}')
  state = {key: np.concatenate([piece.state[key] for piece in pieces]) for key in pieces[0].state}
  return Features(state, np.concatenate([piece.channel_means for piece in pieces]), layers.pop())


def masked_logits(params: Params, images: jax.Array, masks: jax.Array,
                  layer: str = model_lib.FEATURE_LAYER,
                  precision: str = model_lib.DEFAULT_PRECISION) -> jax.Array:
  """Logits [L, N, classes] of ``images``, ``layer``'s channels masked by each of ``masks`` [L, C].

  Pure: the layers before the mask run once, the rest of the net vmapped over the masks.
  """
  state = model_lib.apply(params, images, stop=layer, precision=precision)
  return jax.vmap(lambda mask: model_lib.apply(params, state, mask, start=layer,
                                               precision=precision))(masks)


def masked_classes(params: Params, images: jax.Array, masks: jax.Array,
                   layer: str = model_lib.FEATURE_LAYER,
                   precision: str = model_lib.DEFAULT_PRECISION) -> jax.Array:
  """Classes [L, N] under each mask: ``argmax`` of ``masked_logits``."""
  return jnp.argmax(masked_logits(params, images, masks, layer, precision), axis=-1)


def effective_levels(active_in_order: np.ndarray, levels: np.ndarray) -> np.ndarray:
  """int [N, L]: for each image and level, the lowest level whose head input equals it.

  ``active_in_order`` is bool [N, C], column j: the channel pruned at level j + 1 is active on
  the image. ``levels`` is int [L], each in 0..C.
  """
  count, channels = active_in_order.shape
  changes = np.where(active_in_order, np.arange(1, channels + 1), 0)
  last_change = np.maximum.accumulate(
      np.concatenate([np.zeros((count, 1), changes.dtype), changes], axis=1), axis=1)
  return last_change[:, np.asarray(levels)]


class _GatheredRows:
  """``base[index]``, gathered one slice at a time so the whole never exists at once."""

  def __init__(self, base: np.ndarray, index: np.ndarray):
    self.base, self.index = base, index

  def __len__(self) -> int:
    return len(self.index)

  def __getitem__(self, rows: slice) -> np.ndarray:
    return self.base[self.index[rows]]


def state_classes(params: Params, state: dict[str, jax.Array], channel_mask: jax.Array,
                  layer: str = model_lib.FEATURE_LAYER,
                  precision: str = model_lib.DEFAULT_PRECISION) -> jax.Array:
  """Classes from ``features``' state, ``layer``'s channels masked ([C] or [N, C]); after conv_3,
  conv_4 runs as a matrix product, which XLA's CPU code runs faster than that small convolution."""
  return jnp.argmax(model_lib.apply(params, state, channel_mask, start=layer, precision=precision,
                                    conv_4_as_matmul=layer == 'conv_3'), axis=-1)


def _head_classes(params_and_masks: tuple[Params, jax.Array], *rows: jax.Array,
                  keys: tuple[str, ...], layer: str, precision: str) -> jax.Array:
  params, masks = params_and_masks
  *state_rows, level = rows
  return state_classes(params, dict(zip(keys, state_rows)), masks[level], layer, precision)


def _stacked_classes(params_and_masks: tuple[Params, jax.Array], *state_rows: jax.Array,
                     keys: tuple[str, ...], layer: str, precision: str,
                     masks_per_step: int) -> jax.Array:
  params, masks = params_and_masks
  state = dict(zip(keys, state_rows))
  classes = jax.lax.map(lambda mask: state_classes(params, state, mask, layer, precision),
                        masks, batch_size=masks_per_step)
  return classes.T


def stacked_classes(params: Params, features: Features, masks: np.ndarray,
                    batch_size: int = evaluate.DEFAULT_BATCH_SIZE,
                    precision: str = model_lib.DEFAULT_PRECISION,
                    masks_per_step: int = 16) -> np.ndarray:
  """Classes (int32 [N, M]) under each of ``masks`` [M, C], ``masks_per_step`` at once (memory)."""
  keys = tuple(sorted(features.state))
  return evaluate.map_batches(
      cache.bind(_stacked_classes, keys=keys, layer=features.layer,
                 precision=model_lib.check_precision(precision), masks_per_step=masks_per_step),
      (params, np.asarray(masks, np.float32)), tuple(features.state[k] for k in keys),
      batch_size)


def prefix_classes(params: Params, state: np.ndarray | dict[str, np.ndarray] | Features,
                   order: np.ndarray, levels: Sequence[int] | np.ndarray | None = None,
                   batch_size: int = evaluate.DEFAULT_BATCH_SIZE,
                   precision: str = model_lib.DEFAULT_PRECISION,
                   layer: str | None = None) -> np.ndarray:
  """Classes (int32 [N, L]) at ``levels`` of the pruning order ``order``, as the naive loop gives.

  Args:
    state: ``features(...)``, its ``state``, or the pruned layer's activation (pool_3 for conv_3).
    order: channels in pruning order [C] (level k prunes ``order[:k]``).
    levels: the levels to report (default 0..C, the full sweep).
    batch_size: head rows (image, level pairs) per step.
    layer: the pruned layer (default: the features' layer, else conv_3).
  """
  if isinstance(state, Features):
    layer = layer or state.layer
    state = state.state
  layer = model_lib.check_layer(layer or model_lib.FEATURE_LAYER)
  if not isinstance(state, dict):
    state = {'activation': state}
  activation = state['activation']
  order = np.asarray(order)
  num_channels = activation.shape[-1]
  if sorted(order.tolist()) != list(range(num_channels)):
    raise ValueError(f'order must be a permutation of 0..{num_channels - 1}')
  levels = np.arange(num_channels + 1) if levels is None else np.asarray(levels, np.int64)
  if levels.size and (levels.min() < 0 or levels.max() > num_channels):
    raise ValueError(f'levels must lie in 0..{num_channels}, got {levels}')
  count = len(activation)
  active = (activation != 0).any(axis=(1, 2))[:, order]
  effective = effective_levels(active, levels)
  needed = np.zeros((count, num_channels + 1), bool)
  needed[np.arange(count)[:, None], effective] = True
  rows, row_levels = np.nonzero(needed)
  logging.debug('Head on %d (image, level) pairs of %d x %d.', len(rows), count, len(levels))
  if layer == 'conv_3':
    computed = _narrow_head(params, activation, order, active.any(axis=0), rows, row_levels,
                            batch_size, precision)
  else:
    keys = tuple(sorted(state))
    computed = evaluate.map_batches(
        cache.bind(_head_classes, keys=keys, layer=layer,
                   precision=model_lib.check_precision(precision)),
        (params, masks.prefix_masks(order)),
        (*(_GatheredRows(state[key], rows) for key in keys), row_levels.astype(np.int32)),
        batch_size)
  table = np.full((count, num_channels + 1), -1, np.int32)
  table[rows, row_levels] = computed
  return table[np.arange(count)[:, None], effective]


# Head widths besides all channels: few, so a sweep compiles at most len(HEAD_WIDTHS) + 1 heads.
HEAD_WIDTHS = (8, 16, 32)


def head_widths(num_channels: int) -> tuple[int, ...]:
  """The channel counts the sweep's head runs at, for a layer of ``num_channels``."""
  return tuple(sorted({min(width, num_channels) for width in HEAD_WIDTHS} | {num_channels}))


def narrow_params(params: Params, channels: np.ndarray) -> Params:
  """The net with conv_3's output cut to ``channels``: the head's weights for them only."""
  channels = np.asarray(channels)
  fc_1 = np.asarray(params['fc_1']['kernel'])
  num_channels = model_lib.num_channels(params)
  spatial = fc_1.shape[0] // num_channels
  fc_1 = fc_1.reshape(spatial, num_channels, -1)[:, channels].reshape(-1, fc_1.shape[-1])
  conv_4 = np.asarray(params['conv_4']['kernel'])[:, :, channels]
  return {**params, 'fc_1': {**params['fc_1'], 'kernel': fc_1},
          'conv_4': {**params['conv_4'], 'kernel': conv_4}}


def _narrow_head_classes(params: Params, pool_3: jax.Array, first_kept: jax.Array, *,
                         precision: str) -> jax.Array:
  """Classes from pool_3 rows [B, H, W, w] that keep their channels ``first_kept`` [B] .. w - 1."""
  mask = jnp.arange(pool_3.shape[-1]) >= first_kept[:, None]
  return state_classes(params, {'activation': pool_3}, mask, 'conv_3', precision)


def _narrow_head(params: Params, pool_3: np.ndarray, order: np.ndarray, live_in_order: np.ndarray,
                 rows: np.ndarray, row_levels: np.ndarray, batch_size: int,
                 precision: str) -> np.ndarray:
  """Classes of (image ``rows``, level ``row_levels``) pairs; each head reads the channels it needs.

  The channels are laid out dead first, then the live ones in pruning order, so a row needs a
  suffix of the layout: the last channels of the narrowest of ``head_widths`` that holds it.
  """
  num_channels = len(order)
  live = order[live_in_order]
  layout = np.concatenate([order[~live_in_order], live])
  # pruned_live[k]: live channels among order[:k]; level k needs the other ones.
  pruned_live = np.concatenate([[0], np.cumsum(live_in_order)])[row_levels]
  needs = len(live) - pruned_live
  widths = np.array(head_widths(num_channels))
  row_widths = widths[np.searchsorted(widths, needs)]
  first_kept = np.maximum(0, pruned_live + row_widths - len(live)).astype(np.int32)
  logging.debug('Head rows by channels read (%d of %d live): %s.', len(live), num_channels,
               ' '.join(f'{w}:{np.count_nonzero(row_widths == w)}' for w in widths))
  classes = np.empty(len(rows), np.int32)
  for width in widths:
    chosen = np.flatnonzero(row_widths == width)
    if not len(chosen):
      continue
    channels = layout[num_channels - width:]
    narrow = np.ascontiguousarray(pool_3[..., channels])
    classes[chosen] = evaluate.map_batches(
        cache.bind(_narrow_head_classes, precision=model_lib.check_precision(precision)),
        narrow_params(params, channels),
        (_GatheredRows(narrow, rows[chosen]), first_kept[chosen]), batch_size, fixed_batch=True)
  return classes
