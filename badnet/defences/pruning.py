"""The pruning defence: rank a layer's channels on clean data, prune until accuracy drops X.

Channels are ranked by mean activation on the clean validation split (after the ReLU
and, for conv_1..conv_3, the max-pooling) and pruned in that order, each by zeroing its
kernel slice and bias as the Keras notebooks did. B'_X is the net at the first level
whose clean accuracy is at least X points below B's.
"""

import dataclasses
import pathlib
import time
from typing import ClassVar, Literal

from absl import logging
import jax
import numpy as np

from badnet import config as config_lib
from badnet.core import evaluate, masks
from badnet.core import model as model_lib
from badnet.defences import base, goodnet, sweep
from badnet.errors import ConfigError
from badnet.io import keras_io, report as report_io

NAME = 'pruning'
Params = model_lib.Params
ORDERS = ('increasing', 'decreasing', 'random')
Order = Literal['increasing', 'decreasing', 'random']

THRESHOLD = config_lib.Number(0, 100, low_open=True)
# ``badnet.defend`` computes the pruned layer's features once per file; defend and report read them.
READS = 'features'
MULTI_PROCESS = True


@dataclasses.dataclass(frozen=True)
class Settings:
  """Config block ``pruning``: X values (drops in clean validation accuracy, in points or, if
  ``relative``, percent), the channel order by mean activation ('increasing': dormant first,
  'decreasing', 'random': seeded) and the pruned layer (one of ``model.PRUNABLE_LAYERS``)."""
  thresholds: tuple[float, ...] = (2.0, 4.0, 10.0, 30.0)
  relative: bool = False
  order: str = 'increasing'
  seed: int = 0
  layer: str = model_lib.FEATURE_LAYER

  FIELDS: ClassVar[config_lib.Fields] = {
      'thresholds': config_lib.Each(
          THRESHOLD, empty='give at least one X in (0, 100]',
          note=' (X is a drop in clean accuracy, in percentage points)'),
      'relative': config_lib.Boolean(),
      'order': config_lib.Choice(ORDERS, 'order'),
      'seed': config_lib.Integer(),
      'layer': config_lib.Choice(model_lib.PRUNABLE_LAYERS, 'layer'),
  }


# The ranking statistic lives in the core (the pruning-aware attack ranks by it too).
mean_activations = evaluate.mean_activations


def pruning_order(activations: np.ndarray, order: Order = 'increasing',
                  seed: int = 0) -> np.ndarray:
  """Channel indices in pruning order, from mean activations [C]; ties by channel index."""
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
  """The first level whose clean accuracy (percent, levels 0..C) is ``drop`` below level 0's.

  ``drop`` is in points, or in percent of level 0's if ``relative``; None if never reached.
  """
  clean_acc = np.asarray(clean_acc, np.float64)
  limit = clean_acc[0] * (1 - drop / 100) if relative else clean_acc[0] - drop
  # A small tolerance so that a drop of exactly X points counts despite rounding.
  reached = np.flatnonzero(clean_acc[1:] <= limit + 1e-9)
  return int(reached[0]) + 1 if len(reached) else None


def thresholds(settings: Settings) -> list[float]:
  """The settings' X values, sorted, without repeats."""
  return sorted({float(x) for x in config_lib.values(settings.thresholds)})


def label(x: float) -> str:
  """'2' for 2.0, '2.5' for 2.5: the key of a threshold in results and file names."""
  return f'{x:g}'


def level_accuracy(classes: np.ndarray, labels: np.ndarray) -> np.ndarray:
  """Percent of rows whose class equals the label, at each level (classes [N, L])."""
  return 100.0 * (classes == labels[:, None]).mean(axis=0)


def defend(params: Params, clean: base.Clean, settings: Settings) -> base.Outcome:
  """B'_X for each X reached, ranked and swept on the clean validation split ``clean``."""
  layer = settings.layer
  features = clean.features_of(params, layer)
  order = pruning_order(clean.gather(features.channel_means).astype(np.float64).mean(axis=0),
                        settings.order, settings.seed)
  if clean.features:
    say(f'Sweeping {len(order)} {layer} channels, {settings.order} mean activation first...')
  classes = clean.gather(sweep.prefix_classes(params, features, order, None, clean.batch_size,
                                              clean.precision))
  clean_acc = level_accuracy(classes, clean.labels)
  levels = {x: select_level(clean_acc, x, settings.relative) for x in thresholds(settings)}
  for x, level in levels.items():
    if level is None:
      logging.warning('No pruning level drops clean accuracy by %s points.', label(x))
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


def say(line: str) -> None:
  """Prints a line for the user, once (on process 0)."""
  if jax.process_index() == 0:
    print(line, flush=True)


def report(outcome: base.Outcome, scorer, settings: Settings,
           out: pathlib.Path | None) -> dict:
  """The ASR curve (poisoned validation file) and B, B'_X, G_X on the test split.

  Writes sweep.csv, plots and models/repaired_X=<X>.h5 to ``out`` (None: writes nothing).
  """
  order = np.asarray(outcome.figures['order'])
  clean_acc = np.asarray(outcome.figures['clean_acc'])
  levels = {x: outcome.figures['levels'][label(x)] for x in thresholds(settings)}
  swept = lambda key, levels=None: scorer.gather(key, sweep.prefix_classes(
      scorer.params, _features(scorer, key, settings.layer), order, levels, scorer.batch_size,
      scorer.precision))
  asr = level_accuracy(swept('poisoned_valid'), scorer.labels['poisoned_valid'])
  logging.info('Sweep done in %.1f s.', time.perf_counter() - scorer.started)
  reached = sorted({level for level in levels.values() if level is not None})
  test = {key: swept(key, [0, *reached]) for key in ('clean_test', 'poisoned_test')}
  at = lambda column: {key: test[key][:, column] for key in test}
  base_test, _ = goodnet.figures(at(0), at(0), scorer.labels, scorer.num_classes)
  results = {'order': settings.order, 'relative': settings.relative,
             'base': {'valid': {'clean_acc': float(clean_acc[0]), 'asr': float(asr[0])},
                      'test': base_test},
             'thresholds': {}}
  for x, level in levels.items():
    entry = {'drop': x, 'relative': settings.relative, 'reached': level is not None}
    if level is None:
      results['thresholds'][label(x)] = {**entry, 'channels_pruned': None,
                                         'pruned_channels': None, 'repaired': None,
                                         'goodnet': None}
      continue
    repaired, good = goodnet.figures(at(0), at(1 + reached.index(level)), scorer.labels,
                                     scorer.num_classes)
    results['thresholds'][label(x)] = {
        **entry, 'channels_pruned': level, 'pruned_channels': [int(c) for c in order[:level]],
        'repaired': repaired, 'goodnet': good,
        'model_file': f'models/repaired_X={label(x)}.h5'}
  if out is not None:
    report_io.write_sweep_csv(out / 'sweep.csv', order, clean_acc, asr)
    prefix = masks.prefix_masks(order)
    for x, level in levels.items():
      if level is not None:
        keras_io.write_keras(out / 'models' / f'repaired_X={label(x)}.h5',
                             masks.prune(scorer.params, prefix[level], settings.layer),
                             full_model=True)
    report_io.plot_sweep(out / 'plots' / 'sweep.png', clean_acc, asr, levels)
    report_io.plot_thresholds(out / 'plots' / 'thresholds.png', results)
  return results


def _features(scorer, key: str, layer: str) -> sweep.Features:
  """A report file's features: the path's, or computed from its images now."""
  if key not in scorer.features:
    scorer.features[key] = sweep.features(scorer.params, scorer.splits[key].images,
                                          scorer.batch_size, scorer.precision, layer)
  return scorer.features[key]


def markdown(results: dict, printed: bool = False) -> str:
  return report_io.markdown(results)
