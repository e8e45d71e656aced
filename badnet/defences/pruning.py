"""The pruning defence: rank a layer's channels on clean data, prune until accuracy drops X.

Channels of conv_3 (observed at pool_3) are ranked by their mean activation on
clean data and pruned in that order (``masks.prune`` zeroes a channel's kernel
slice and bias, exactly what the Keras notebooks did). For each threshold X,
B'_X is the net after the first level whose clean accuracy is at least X
points below B's. Any of ``model.PRUNABLE_LAYERS`` can be pruned the same way
(``layer=``): channels are ranked by the mean of the layer's output after its
ReLU and, for conv_1..conv_3, its max-pooling.

As a plug-in (``badnet.defences``): ``defend(params, clean, config)`` offers
B'_X for each X reached, all chosen on the clean validation split.
"""

from typing import Literal

import jax
import numpy as np

from badnet import config as config_lib
from badnet.core import cache, evaluate, masks
from badnet.core import model as model_lib
from badnet.defences import base, sweep
from badnet.errors import ConfigError
from badnet.io import data

NAME = 'pruning'
Params = model_lib.Params
ORDERS = ('increasing', 'decreasing', 'random')
Order = Literal['increasing', 'decreasing', 'random']

THRESHOLD = config_lib.Number(0, 100, low_open=True)
FIELDS: config_lib.Fields = {
    **config_lib.BATCH_SIZE,
    'thresholds': config_lib.Each(
        THRESHOLD, empty='give at least one X in (0, 100]',
        note=' (X is a drop in clean accuracy, in percentage points)'),
    'relative': config_lib.Boolean(),
    'order': config_lib.Choice(ORDERS, 'order'),
    'seed': config_lib.Integer(),
    'precision': config_lib.Choice(model_lib.PRECISIONS, 'precision'),
}


def _channel_means(params: Params, images: jax.Array, *, layer: str) -> jax.Array:
  # Per-image mean over H and W; the host averages over images in float64.
  return model_lib.observe_fn(params, images, layer)['activation'].mean(axis=(1, 2))


def mean_activations(params: Params, images: np.ndarray,
                     batch_size: int = evaluate.DEFAULT_BATCH_SIZE,
                     layer: str = model_lib.FEATURE_LAYER) -> np.ndarray:
  """Mean activation of each channel of ``layer`` over N, H and W (float64 [C]).

  The activation is the layer's output after its ReLU and, for conv_1..conv_3,
  its max-pooling (pool_3 for conv_3, as the published lab runs ranked).
  """
  per_image = evaluate.map_batches(
      cache.bind(_channel_means, layer=model_lib.check_layer(layer)), params, (images,),
      batch_size)
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


def thresholds(config: config_lib.Config) -> list[float]:
  """The config's X values, sorted, without repeats."""
  return sorted({float(x) for x in config_lib.values(config.thresholds)})


def label(x: float) -> str:
  """'2' for 2.0, '2.5' for 2.5: the key of a threshold in results and file names."""
  return f'{x:g}'


def select_levels(clean_acc: np.ndarray, config: config_lib.Config) -> dict[float, int | None]:
  """X -> the level B'_X prunes to (None: never reached), for the config's thresholds."""
  return {x: select_level(clean_acc, x, config.relative) for x in thresholds(config)}


def level_accuracy(classes: np.ndarray, labels: np.ndarray) -> np.ndarray:
  """Percent of rows whose class equals the label, at each level (classes [N, L])."""
  return 100.0 * (classes == labels[:, None]).mean(axis=0)


def defend(params: Params, clean: data.Dataset, config: config_lib.Config) -> base.Outcome:
  """B'_X for each X reached, ranked and swept on the clean validation split ``clean``.

  The same ranking, sweep and threshold choice as the prune job (which streams
  its files through the same functions); ``config.layer`` picks the layer
  (conv_3 if the config has none).
  """
  layer = config.get('layer', model_lib.FEATURE_LAYER)
  features = sweep.features(params, clean.images, config.batch_size, config.precision, layer)
  order = pruning_order(features.mean_activations(), config.order, config.seed)
  classes = sweep.prefix_classes(params, features, order, None, config.batch_size,
                                 config.precision)
  clean_acc = level_accuracy(classes, clean.labels)
  levels = select_levels(clean_acc, config)
  prefix = masks.prefix_masks(order)
  candidates = {
      f'X={label(x)}': base.Candidate(
          params=jax.tree.map(np.asarray, masks.prune(params, prefix[level], layer)),
          pruned={layer: order[:level]},
          figures={'drop': x, 'channels_pruned': level, 'valid_clean_acc': float(clean_acc[level])})
      for x, level in levels.items() if level is not None}
  figures = {'layer': layer, 'order': [int(c) for c in order],
             'clean_acc': [float(a) for a in clean_acc],
             'levels': {label(x): level for x, level in levels.items()}}
  return base.Outcome(candidates, figures)
