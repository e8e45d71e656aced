"""Fine-pruning (Liu, Dolan-Gavitt and Garg, RAID 2018): prune, then fine-tune on clean data.

The defender prunes conv_3 (see ``prune``) and then trains the pruned net on
their clean data only, with the pruned channels held at exactly zero (kernel
slice and bias) through every step, whatever the optimiser. A held-out part of
the clean data chooses the epoch, so no poisoned input ever informs a choice.

Every piece is a pure function over parameter pytrees: ``train.train_step``
is the step (params, optimiser state, batch, mask in; params, state out) and
``fine_prune`` runs it over epochs.

As a plug-in (``badnet.defences``): ``defend(params, clean, config)`` prunes
as the pruning defence does, fine-prunes each B'_X, and recommends the deepest
X whose fine-pruned net keeps its held-out clean accuracy within
``finetune.max_clean_drop`` points of B's: clean data only.
"""

import dataclasses
from collections.abc import Sequence
import math
import time

from absl import logging
import numpy as np

from badnet import config as config_lib
from badnet.core import evaluate, masks, train
from badnet.core import model as model_lib
from badnet.defences import base, pruning
from badnet.errors import DataError
from badnet.io import data

NAME = 'fine_pruning'
Params = model_lib.Params


def recipe_fields(max_epochs: config_lib.Bound, holdout: bool = True) -> config_lib.Fields:
  """The fine-tuning recipe's fields but ``epochs``; warm-up at most ``max_epochs``.

  ``holdout``: with ``finetune.holdout_fraction`` (a job that splits its own).
  """
  fields = {
      'finetune.optimizer': config_lib.Choice(train.OPTIMIZERS, 'optimizer'),
      'finetune.schedule': config_lib.Choice(train.SCHEDULES, 'schedule'),
      'finetune.batch_size': config_lib.Integer(1),
      'finetune.learning_rate': config_lib.Number(0, math.inf, low_open=True, high_open=True),
      'finetune.weight_decay': config_lib.Number(0, math.inf, high_open=True),
      'finetune.warmup_epochs': config_lib.Number(0, max_epochs),
      'finetune.holdout_fraction': config_lib.Number(0, 1, low_open=True, high_open=True),
      'finetune.seed': config_lib.Integer(),
  }
  if not holdout:
    del fields['finetune.holdout_fraction']
  return fields


FIELDS: config_lib.Fields = {
    **pruning.FIELDS,
    'finetune.epochs': config_lib.Integer(1),
    **recipe_fields(lambda config: config.finetune.epochs),
    'finetune.max_clean_drop': config_lib.Number(0, 100),
    'finetune.stacking': config_lib.Choice(train.STACKING, 'stacking'),
}


def holdout_split(labels: np.ndarray, fraction: float, seed: int
                  ) -> tuple[np.ndarray, np.ndarray]:
  """Row indices (training, held out): ``fraction`` of each class held out, seeded.

  Stratified, so every class with at least two images is in both parts; a
  class with one image stays in training.
  """
  rng = np.random.default_rng(seed)
  held = []
  for label in np.unique(labels):
    rows = np.flatnonzero(labels == label)
    count = int(round(fraction * len(rows)))
    count = min(max(count, 1), len(rows) - 1) if len(rows) > 1 else 0
    held.append(rng.permutation(rows)[:count])
  holdout = np.sort(np.concatenate(held)) if held else np.zeros(0, np.int64)
  return np.setdiff1d(np.arange(len(labels)), holdout), holdout


def split_for_fine_tuning(labels: np.ndarray, fraction: float, seed: int
                          ) -> tuple[np.ndarray, np.ndarray]:
  """``holdout_split``, refusing a split that leaves either part empty (one clear line)."""
  fit_rows, holdout_rows = holdout_split(labels, fraction, seed)
  if not len(fit_rows) or not len(holdout_rows):
    raise DataError(f'{len(labels)} clean validation images leave {len(fit_rows)} to fine-tune '
                    f'on and {len(holdout_rows)} to hold out (holdout_fraction={fraction}); '
                    f'fine-pruning needs at least two images of some class')
  return fit_rows, holdout_rows


def fine_prune(params: Params, channel_mask: np.ndarray, images: np.ndarray,
               labels: np.ndarray, recipe: train.Recipe, holdout_fraction: float,
               name: str = 'fine-prune',
               layer: str = model_lib.FEATURE_LAYER) -> tuple[Params, list[dict]]:
  """B' = prune(params, mask), fine-tuned on clean (images, labels) with the pruned channels at 0.

  Args:
    params: the backdoored net B.
    channel_mask: [C] 1 keeps, 0 prunes a channel of ``layer`` (all ones:
      fine-tuning alone).
    images, labels: the defender's clean data (uint8 [N, 55, 47, 3], int [N]).
    recipe: optimiser, schedule, epochs, batch size and seed.
    holdout_fraction: the part of (images, labels) held out to choose the
      epoch (the one with the best held-out clean accuracy).
    name: shown in progress logs.
    layer: the pruned layer (conv_3 by default; see ``model.PRUNABLE_LAYERS``).

  Returns:
    The fine-pruned params and the per-epoch history (with ``holdout_acc``).
  """
  return fine_prune_many(params, [channel_mask], images, labels, recipe, holdout_fraction,
                         [name], layer, stacking='loop')[0]


def fine_prune_many(params: Params, channel_masks: Sequence[np.ndarray], images: np.ndarray,
                    labels: np.ndarray, recipe: train.Recipe, holdout_fraction: float,
                    names: Sequence[str], layer: str = model_lib.FEATURE_LAYER,
                    stacking: str = 'auto') -> list[tuple[Params, list[dict]]]:
  """``fine_prune`` for each mask, trained together or in turn (``train.stacks(stacking)``)."""
  channel_masks = [masks.check_mask(mask, model_lib.num_channels(params, layer))
                   for mask in channel_masks]
  if len(images) != len(labels):
    raise DataError(f'{len(images)} clean images but {len(labels)} labels')
  fit_rows, holdout_rows = split_for_fine_tuning(labels, holdout_fraction, recipe.seed)
  return train.fit_many([masks.prune(params, mask, layer) for mask in channel_masks],
                        images[fit_rows], labels[fit_rows], recipe, channel_masks=channel_masks,
                        hold_pruned_at_zero=True,
                        holdout=(images[holdout_rows], labels[holdout_rows]), names=names,
                        layer=layer, stacking=stacking)


def tune_many(params: Params, channel_masks: Sequence[np.ndarray], clean: data.Dataset,
              recipe: train.Recipe, holdout_fraction: float, names: Sequence[str],
              layer: str = model_lib.FEATURE_LAYER, stacking: str = 'auto'
              ) -> list[tuple[Params, dict]]:
  """``fine_prune_many`` on the clean split; each net's params and a summary of its epochs.

  A summary holds the chosen epoch, its held-out clean accuracy and the
  per-epoch history, without timings (so results files are reproducible).
  """
  start = time.perf_counter()
  tuned = fine_prune_many(params, channel_masks, clean.images, clean.labels, recipe,
                          holdout_fraction, names, layer, stacking)
  results = []
  for name, (tuned_params, history) in zip(names, tuned):
    best = max(history, key=lambda epoch: (epoch['holdout_acc'], epoch['epoch']))
    logging.info('%s: %d epochs; epoch %d chosen (held-out clean accuracy %.2f %%).', name,
                 len(history), best['epoch'], best['holdout_acc'])
    results.append((tuned_params, {
        'chosen_epoch': best['epoch'], 'holdout_acc': best['holdout_acc'],
        'history': [{key: value for key, value in epoch.items() if key != 'seconds'}
                    for epoch in history]}))
  logging.info('Fine-tuned %d net%s in %.1f s (%s).', len(names), 's' * (len(names) > 1),
               time.perf_counter() - start,
               'stacked' if train.stacks(stacking) and len(names) > 1 else 'in turn')
  return results


def recommend(holdout_accs: dict[str, tuple[tuple, float]], b_holdout_acc: float,
              max_clean_drop: float) -> str | None:
  """The deepest candidate whose held-out clean accuracy is within ``max_clean_drop`` of B's.

  Args:
    holdout_accs: name -> (depth, held-out clean accuracy); the largest depth
      (a tuple, compared in order) among those that qualify wins.
    b_holdout_acc: B's held-out clean accuracy.
    max_clean_drop: the most clean accuracy, in points, a candidate may lose.

  Uses held-out clean images only: a defender without poisoned data can make
  this choice. None if no candidate qualifies.
  """
  qualified = [(depth, name) for name, (depth, acc) in holdout_accs.items()
               if acc >= b_holdout_acc - max_clean_drop]
  return max(qualified)[1] if qualified else None


def holdout_accuracy(params: Params, clean: data.Dataset, config: config_lib.Config) -> float:
  """B's accuracy on the held-out part of the clean split (what candidates are compared with)."""
  _, holdout_rows = holdout_split(clean.labels, config.finetune.holdout_fraction,
                                  config.finetune.seed)
  return evaluate.accuracy(params, clean.images[holdout_rows], clean.labels[holdout_rows],
                           config.batch_size)


def defend(params: Params, clean: data.Dataset, config: config_lib.Config) -> base.Outcome:
  """The pruning defence's B'_X, each fine-tuned on ``clean``; the recommended X.

  Thresholds that land on the same pruning level share one fine-tuning.
  """
  pruned = pruning.defend(params, clean, config)
  recipe = train.Recipe.from_config(config.finetune)
  keys = {}  # (layer, channels) -> the first candidate's name: a level shares one fine-tuning
  for name, candidate in pruned.candidates.items():
    (layer, channels), = candidate.pruned.items()
    keys.setdefault((layer, tuple(channels)), name)
  layers = {layer for layer, _ in keys}
  if len(layers) > 1:
    raise ValueError(f'fine-pruning candidates of several layers: {sorted(layers)}')
  layer = layers.pop() if layers else model_lib.FEATURE_LAYER
  level_masks = []
  for _, channels in keys:
    mask = np.ones(model_lib.num_channels(params, layer), np.float32)
    mask[list(channels)] = 0
    level_masks.append(mask)
  tuned = dict(zip(keys, tune_many(params, level_masks, clean, recipe,
                                   config.finetune.holdout_fraction,
                                   [f'fine-prune {name}' for name in keys.values()], layer,
                                   config.finetune.get('stacking', 'auto'))))
  candidates = {}
  for name, candidate in pruned.candidates.items():
    (layer, channels), = candidate.pruned.items()
    tuned_params, summary = tuned[(layer, tuple(channels))]
    candidates[name] = base.Candidate(tuned_params, candidate.pruned,
                                      {**candidate.figures, **summary})
  b_holdout_acc = holdout_accuracy(params, clean, config)
  chosen = recommend({name: ((c.figures['channels_pruned'], c.figures['drop']),
                             c.figures['holdout_acc']) for name, c in candidates.items()},
                     b_holdout_acc, config.finetune.max_clean_drop)
  figures = {**pruned.figures, 'b_holdout_acc': b_holdout_acc,
             'finetune': dataclasses.asdict(recipe)}
  return base.Outcome(candidates, figures, recommended=chosen)
