"""Fine-pruning (Liu, Dolan-Gavitt and Garg, RAID 2018): prune, then fine-tune on clean data.

Prunes as the pruning defence does (by default once, to the paper's 4-point drop of clean
validation accuracy), then trains each B'_X (and B alone, the baseline) on clean data for a fixed
number of epochs with the pruned channels held at exactly zero. A held-out part of the clean data
watches the training and, where several X are given, chooses the recommended one (in whole
held-out images), so no poisoned input informs a choice.
"""

import dataclasses
import pathlib
from collections.abc import Sequence
import time
from typing import ClassVar

from absl import logging
import numpy as np

from badnet import config as config_lib
from badnet.core import evaluate, masks, train
from badnet.core import model as model_lib
from badnet.defences import base, pruning
from badnet.errors import ConfigError, DataError
from badnet.io import keras_io, report as report_io

NAME = 'fine_pruning'
Params = model_lib.Params
READS = 'both'  # the pruning defence's features, and the images to train on
BASELINE = 'fine-tuned only'  # the candidate of B fine-tuned alone, nothing pruned


@dataclasses.dataclass(frozen=True)
class Settings(pruning.Settings):
  """Config block ``fine_pruning``: pruning's settings, then the fine-tuning.

  ``thresholds``: the paper prunes until clean validation accuracy has dropped 4 points, once.
  ``finetune`` is the same for every X and the baseline, its last epoch kept;
  ``holdout_fraction`` of the clean split is held out; ``max_clean_drop`` (points) bounds the
  recommended X.
  """
  thresholds: tuple[float, ...] = (4.0,)
  finetune: base.Tuning = base.Tuning()
  holdout_fraction: float = 0.2
  max_clean_drop: float = 3.0

  FIELDS: ClassVar[config_lib.Fields] = {
      **pruning.Settings.FIELDS,
      'finetune.epochs': config_lib.Integer(1),
      'holdout_fraction': config_lib.Number(0, 1, low_open=True, high_open=True),
      'max_clean_drop': config_lib.Number(0, 100),
  }


def fine_prune(params: Params, channel_mask: np.ndarray, images: np.ndarray,
               labels: np.ndarray, recipe: train.Recipe, holdout_fraction: float,
               name: str = 'fine-prune', layer: str = model_lib.FEATURE_LAYER,
               best_epoch: bool = True) -> tuple[Params, list[dict]]:
  """B pruned by ``channel_mask`` [C] (1 keeps), fine-tuned on clean data, pruned channels at 0.

  ``holdout_fraction`` of (images, labels) is held out, to choose the epoch if ``best_epoch``
  (else the last is kept). Returns the params and the per-epoch history (with ``holdout_acc``).
  """
  rows = base.split_for_fine_tuning(labels, holdout_fraction, recipe.seed)
  return fine_prune_many(params, [channel_mask], images, labels, recipe, rows, [name], layer,
                         stacking='loop', best_epoch=best_epoch)[0]


def fine_prune_many(params: Params, channel_masks: Sequence[np.ndarray], images: np.ndarray,
                    labels: np.ndarray, recipe: train.Recipe,
                    rows: tuple[np.ndarray, np.ndarray], names: Sequence[str],
                    layer: str = model_lib.FEATURE_LAYER, stacking: str = 'auto',
                    best_epoch: bool = True) -> list[tuple[Params, list[dict]]]:
  """``fine_prune`` for each mask, trained together or in turn (``train.stacks(stacking)``).

  ``rows``: the (fit, held-out) rows of (images, labels), ``base.split_for_fine_tuning``'s.
  """
  channel_masks = [masks.check_mask(mask, model_lib.num_channels(params, layer))
                   for mask in channel_masks]
  if len(images) != len(labels):
    raise DataError(f'{len(images)} clean images but {len(labels)} labels')
  fit_rows, holdout_rows = rows
  return train.fit_many([masks.prune(params, mask, layer) for mask in channel_masks],
                        images[fit_rows], labels[fit_rows], recipe, channel_masks=channel_masks,
                        held=[{layer: mask} for mask in channel_masks],
                        holdout=(images[holdout_rows], labels[holdout_rows]), names=names,
                        layer=layer, stacking=stacking, best_epoch=best_epoch)


def tune_many(params: Params, channel_masks: Sequence[np.ndarray], clean: base.Clean,
              recipe: train.Recipe, rows: tuple[np.ndarray, np.ndarray], names: Sequence[str],
              layer: str = model_lib.FEATURE_LAYER, stacking: str = 'auto'
              ) -> list[tuple[Params, dict]]:
  """``fine_prune_many`` on ``clean``, each net's last epoch kept: params, that epoch, history
  (no timings: reproducible)."""
  start = time.perf_counter()
  tuned = fine_prune_many(params, channel_masks, clean.images, clean.labels, recipe, rows,
                          names, layer, stacking, best_epoch=False)
  results = []
  for name, (tuned_params, history) in zip(names, tuned):
    chosen = train.summary(history, best_epoch=False)
    logging.info('%s: %d epochs; held-out clean accuracy %.2f %% after the last.', name,
                 len(history), chosen['holdout_acc'])
    results.append((tuned_params, chosen))
  logging.info('Fine-tuned %d net%s in %.1f s (%s).', len(names), 's' * (len(names) > 1),
               time.perf_counter() - start,
               'stacked' if train.stacks(stacking) and len(names) > 1 else 'in turn')
  return results


def recommend(holdout_accs: dict[str, tuple[tuple, float]], b_holdout_acc: float,
              max_clean_drop: float, images: int) -> str | None:
  """The deepest candidate that loses at most ``max_clean_drop`` points of B's held-out clean
  accuracy, counted in whole images of the ``images`` held out (one is 100 / images points).

  ``holdout_accs``: name -> (depth, a tuple compared in order; held-out clean accuracy).
  Clean data only, so a defender without poisoned data can choose; None if none qualifies.
  """
  qualified = [(depth, name) for name, (depth, acc) in holdout_accs.items()
               if base.within_budget(b_holdout_acc, acc, max_clean_drop, images)]
  return max(qualified)[1] if qualified else None


def defend(params: Params, clean: base.Clean, settings: Settings) -> base.Outcome:
  """B alone and each B'_X fine-tuned on ``clean`` (once per pruning level); the recommended X."""
  pruned = pruning.defend(params, clean, settings)
  tune = settings.finetune
  try:
    fit_rows, holdout_rows = base.split_for_fine_tuning(clean.labels, settings.holdout_fraction,
                                                   tune.seed)
  except DataError as error:
    raise ConfigError(f'{clean.source}: {error} (config.fine_pruning.holdout_fraction)'
                      ) from None
  recipe = tune.recipe()
  pruning.say(f'Fine-tuning on {len(fit_rows)} clean validation images ({len(holdout_rows)} '
              f'held out): B alone, then B\'_X for each X reached...')
  keys = {}  # channels -> the first candidate's name: a level shares one fine-tuning
  for name, candidate in pruned.candidates.items():
    keys.setdefault(tuple(candidate.pruned[settings.layer]), name)
  level_masks = [np.ones(model_lib.num_channels(params, settings.layer), np.float32)]
  for channels in keys:
    level_masks.append(level_masks[0].copy())
    level_masks[-1][list(channels)] = 0
  tuned = tune_many(params, level_masks, clean, recipe, (fit_rows, holdout_rows),
                    ['fine-tune only'] + [f'fine-prune {name}' for name in keys.values()],
                    settings.layer, tune.stacking)
  by_level = dict(zip(keys, tuned[1:]))
  candidates = {BASELINE: base.Candidate(tuned[0][0], {}, tuned[0][1])}
  for name, candidate in pruned.candidates.items():
    tuned_params, summary = by_level[tuple(candidate.pruned[settings.layer])]
    candidates[name] = base.Candidate(tuned_params, candidate.pruned,
                                      {**candidate.figures, **summary})
  b_holdout_acc = evaluate.accuracy(params, clean.images[holdout_rows],
                                    clean.labels[holdout_rows], clean.batch_size,
                                    precision=clean.precision)
  chosen = recommend({name: ((c.figures['channels_pruned'], c.figures['drop']),
                             c.figures['holdout_acc'])
                      for name, c in candidates.items() if name != BASELINE},
                     b_holdout_acc, settings.max_clean_drop, len(holdout_rows))
  figures = {**pruned.figures, 'b_holdout_acc': b_holdout_acc,
             'finetune': {**dataclasses.asdict(recipe),
                          'holdout_fraction': settings.holdout_fraction,
                          'max_clean_drop': settings.max_clean_drop,
                          'train_images': len(fit_rows), 'holdout_images': len(holdout_rows),
                          'data': 'clean validation split only'}}
  return base.Outcome(candidates, figures, recommended=chosen)


def report(outcome: base.Outcome, scorer, settings: Settings, out: pathlib.Path | None) -> dict:
  """Pruning's report, plus each fine-pruned net and its GoodNet on the test split."""
  results = pruning.report(outcome, scorer, settings, out)
  results['finetune'] = outcome.figures['finetune']
  scores = lambda net: scorer.figures(scorer.classes(net))
  baseline = outcome.candidates[BASELINE]
  results['fine_tuned_only'] = {**scores(baseline.params)[0], **baseline.figures}
  tuned = {}  # channels -> (net, GoodNet's) figures: thresholds that share a level share them
  for name, entry in results['thresholds'].items():
    if not entry['reached']:
      entry.update(fine_pruned=None, goodnet_fine_pruned=None)
      continue
    candidate = outcome.candidates[f'X={name}']
    key = tuple(entry['pruned_channels'])
    if key not in tuned:
      net, good = scores(candidate.params)
      summary = {k: candidate.figures[k] for k in ('chosen_epoch', 'holdout_acc', 'history')}
      tuned[key] = {**net, **summary}, good
    entry['fine_pruned'], entry['goodnet_fine_pruned'] = dict(tuned[key][0]), dict(tuned[key][1])
    entry['fine_pruned_model_file'] = f'models/fine_pruned_X={name}.h5'
    if out is not None:
      keras_io.write_keras(out / entry['fine_pruned_model_file'], candidate.params,
                           full_model=True)
    logging.info('Fine-pruned X=%s: clean %.2f %%, ASR %.2f %% (test).', name,
                 entry['fine_pruned']['clean_acc'], entry['fine_pruned']['asr'])
  chosen = outcome.recommended
  results['recommended'] = None if chosen is None else {
      'x': chosen.removeprefix('X='),
      'channels_pruned': outcome.candidates[chosen].figures['channels_pruned'],
      'max_clean_drop': settings.max_clean_drop,
      'b_holdout_acc': outcome.figures['b_holdout_acc'],
      'holdout_acc': outcome.candidates[chosen].figures['holdout_acc']}
  if out is not None:
    report_io.plot_fine_pruning(out / 'plots' / 'fine_prune.png', results)
  return results


def markdown(results: dict, printed: bool = False) -> str:
  return report_io.markdown(results)
