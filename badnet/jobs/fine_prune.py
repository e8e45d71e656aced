"""Fine-pruning end to end: the prune job, then each B'_X fine-tuned on clean validation data.

Beside the prune job's outputs it writes, per X, the fine-pruned net
(models/fine_pruned_X=<X>.h5) and its figures and GoodNet's on the test split,
and a baseline: B fine-tuned alone (no channel pruned) with the same recipe.
Only the clean validation split is trained on (part of it held out to choose
the epoch); the poisoned files are read for reporting only.
"""

import dataclasses
import pathlib

from absl import logging
import ml_collections
import numpy as np

from badnet import pipeline
from badnet.core import evaluate, train
from badnet.defences import fine_pruning, goodnet, pruning
from badnet.errors import ConfigError, DataError
from badnet.io import inputs, keras_io, report, workdir

FIELDS = {**inputs.FIELDS, **fine_pruning.FIELDS}
TEST = ('clean_test', 'poisoned_test')


def run(config: ml_collections.ConfigDict, out: pathlib.Path) -> dict:
  """Runs the prune job's defence, then fine-prunes each B'_X and fine-tunes B alone."""
  run_ = pipeline.run_pruning(config, out, keep_images=True)
  pipeline.write_repaired(out, run_)
  results, batch, tune = run_.results, config.batch_size, config.finetune
  clean_valid = run_.splits['clean_valid']
  try:
    fit_rows, holdout_rows = fine_pruning.split_for_fine_tuning(
        clean_valid.labels, tune.holdout_fraction, tune.seed)
  except DataError as error:
    raise ConfigError(f'{results["data"]["clean_valid"]}: {error} (config.finetune.'
                      f'holdout_fraction)') from None
  recipe = train.Recipe.from_config(tune)
  results['finetune'] = {**dataclasses.asdict(recipe),
                         'holdout_fraction': tune.holdout_fraction,
                         'max_clean_drop': tune.max_clean_drop,
                         'train_images': len(fit_rows), 'holdout_images': len(holdout_rows),
                         'data': 'clean validation split only'}
  print(f'Fine-tuning on {len(fit_rows)} clean validation images ({len(holdout_rows)} held out '
        f'to choose the epoch): B alone, then B\'_X for each X reached...', flush=True)
  labels = {key: run_.splits[key].labels for key in TEST}
  b_classes = {key: evaluate.predict(run_.params, run_.splits[key].images, batch) for key in TEST}

  def scores(params) -> tuple[dict, dict]:
    classes = {key: evaluate.predict(params, run_.splits[key].images, batch) for key in TEST}
    return goodnet.figures(b_classes, classes, labels, run_.num_classes)

  # B alone and each distinct level, fine-tuned together or in turn (config.finetune.stacking).
  first_x = {}  # level -> the first X that reaches it (names its fine-tuning in the log)
  for x, level in run_.levels.items():
    if level is not None:
      first_x.setdefault(level, x)
  levels = list(first_x)
  names = ['fine-tune only'] + [f'fine-prune X={pruning.label(first_x[level])}'
                                for level in levels]
  fine_tuned = fine_pruning.tune_many(
      run_.params, [np.ones(len(run_.order), np.float32)] + [run_.masks[level] for level in levels],
      clean_valid, recipe, tune.holdout_fraction, names, stacking=tune.stacking)
  params, summary = fine_tuned[0]
  results['fine_tuned_only'] = {**scores(params)[0], **summary}
  tuned = {}  # level -> (params, figures): thresholds that share a level share the net
  for level, (params, summary) in zip(levels, fine_tuned[1:]):
    net, good = scores(params)
    tuned[level] = params, {**net, **summary}, good
  for x, level in run_.levels.items():
    name = pruning.label(x)
    entry = results['thresholds'][name]
    if level is None:
      entry.update(fine_pruned=None, goodnet_fine_pruned=None)
      continue
    params, net, good = tuned[level]
    entry['fine_pruned'], entry['goodnet_fine_pruned'] = dict(net), dict(good)
    entry['fine_pruned_model_file'] = f'models/fine_pruned_X={name}.h5'
    keras_io.write_keras(out / entry['fine_pruned_model_file'], params, full_model=True)
    logging.info('Fine-pruned X=%s: clean %.2f %%, ASR %.2f %% (test).', name,
                 entry['fine_pruned']['clean_acc'], entry['fine_pruned']['asr'])
  results['recommended'] = _recommended(results, run_, clean_valid, config)
  report.write_results(out, results, run_.clean_acc, run_.asr, run_.levels)
  print(report.summary(results), flush=True)
  return workdir.tidy(results)


def _recommended(results: dict, run_: pipeline.PruningRun, clean_valid, config) -> dict | None:
  """results.json's `recommended`: the deepest X within max_clean_drop of B (held-out data)."""
  b_holdout_acc = fine_pruning.holdout_accuracy(run_.params, clean_valid, config)
  entries = {x: entry for x, entry in results['thresholds'].items() if entry.get('fine_pruned')}
  x = fine_pruning.recommend(
      {x: ((entry['channels_pruned'], float(x)), entry['fine_pruned']['holdout_acc'])
       for x, entry in entries.items()}, b_holdout_acc, config.finetune.max_clean_drop)
  if x is None:
    return None
  return {'x': x, 'channels_pruned': entries[x]['channels_pruned'],
          'max_clean_drop': config.finetune.max_clean_drop, 'b_holdout_acc': b_holdout_acc,
          'holdout_acc': entries[x]['fine_pruned']['holdout_acc']}
