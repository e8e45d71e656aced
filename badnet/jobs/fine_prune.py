"""Fine-pruning end to end: the prune job, then each B'_X fine-tuned on clean validation data.

Beside the prune job's outputs it writes, per X, the fine-pruned net
(models/fine_pruned_X=<X>.h5) and its figures and GoodNet's on the test split,
and a baseline: B fine-tuned alone (no channel pruned) with the same recipe.
Only the clean validation split is trained on (part of it held out to choose
the epoch); the poisoned files are read for reporting only.
"""

import dataclasses
import math
import time

from absl import logging
import jax
import ml_collections
import numpy as np

from badnet import evaluate, fineprune, goodnet, keras_io, report, train
from badnet import workdir as workdir_lib
from badnet.errors import ConfigError
from badnet.jobs import prune as prune_job


def _number(config: ml_collections.ConfigDict, name: str, low: float, high: float,
            low_open: bool, high_open: bool, what: str) -> None:
  value = config.finetune[name]
  inside = (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value) and (low < value if low_open else low <= value)
            and (value < high if high_open else value <= high))
  if not inside:
    raise ConfigError(f'config.finetune.{name} must be {what}, got {value!r}')


def check_config(config: ml_collections.ConfigDict) -> None:
  """The prune job's checks and the fine-tuning fields', before any work."""
  prune_job.check_config(config)
  if jax.process_count() > 1:
    raise ConfigError('the fine_prune job runs on one process; fine-tuning across '
                      'processes is not supported (run configs/prune.py across processes)')
  tune = config.finetune
  if isinstance(tune.epochs, bool) or not isinstance(tune.epochs, int) or tune.epochs < 1:
    raise ConfigError(f'config.finetune.epochs must be a positive integer, got {tune.epochs!r}')
  check_recipe(config, tune.epochs)
  _number(config, 'max_clean_drop', 0, 100, False, False, 'in [0, 100]')


def check_recipe(config: ml_collections.ConfigDict, epochs: int) -> None:
  """The fine-tuning recipe's fields but ``epochs`` (warm-up at most ``epochs``)."""
  tune = config.finetune
  if tune.optimizer not in train.OPTIMIZERS:
    raise ConfigError(f'config.finetune.optimizer: unknown optimizer {tune.optimizer!r}; '
                      f'expected one of {", ".join(train.OPTIMIZERS)}')
  if tune.schedule not in train.SCHEDULES:
    raise ConfigError(f'config.finetune.schedule: unknown schedule {tune.schedule!r}; '
                      f'expected one of {", ".join(train.SCHEDULES)}')
  if isinstance(tune.batch_size, bool) or not isinstance(tune.batch_size, int) or (
      tune.batch_size < 1):
    raise ConfigError(f'config.finetune.batch_size must be a positive integer, '
                      f'got {tune.batch_size!r}')
  _number(config, 'learning_rate', 0, math.inf, True, True, 'positive')
  _number(config, 'weight_decay', 0, math.inf, False, True, 'zero or positive')
  _number(config, 'warmup_epochs', 0, epochs, False, False, f'in [0, {epochs}]')
  _number(config, 'holdout_fraction', 0, 1, True, True, 'in (0, 1)')
  if isinstance(tune.seed, bool) or not isinstance(tune.seed, int):
    raise ConfigError(f'config.finetune.seed must be an integer, got {tune.seed!r}')


def recipe(config: ml_collections.ConfigDict, epochs: int | None = None) -> train.Recipe:
  """config.finetune as a Recipe (``epochs`` overrides config.finetune.epochs)."""
  tune = config.finetune
  return train.Recipe(optimizer=tune.optimizer, learning_rate=float(tune.learning_rate),
                      schedule=tune.schedule, warmup_epochs=float(tune.warmup_epochs),
                      epochs=tune.epochs if epochs is None else epochs,
                      batch_size=tune.batch_size,
                      weight_decay=float(tune.weight_decay), seed=tune.seed)


def _scores(params, b_classes: dict[str, np.ndarray], defence: prune_job.Defence,
            batch: int) -> tuple[dict, dict]:
  """The net's {clean_acc, asr} and its GoodNet's figures (with B) on the test split."""
  clean, poisoned = defence.splits['clean_test'], defence.splits['poisoned_test']
  classes = {key: evaluate.predict(params, defence.splits[key].images, batch)
             for key in ('clean_test', 'poisoned_test')}
  net = {'clean_acc': evaluate.percent(classes['clean_test'] == clean.labels),
         'asr': evaluate.percent(classes['poisoned_test'] == poisoned.labels)}
  g_classes = {key: np.asarray(goodnet.combine(b_classes[key], classes[key],
                                               defence.num_classes)) for key in classes}
  good = goodnet.metrics(g_classes['clean_test'], clean.labels, g_classes['poisoned_test'],
                         poisoned.labels, defence.num_classes)
  return net, good


def _tune(defence: prune_job.Defence, mask: np.ndarray, config: ml_collections.ConfigDict,
          name: str) -> tuple[dict, dict]:
  """Fine-prunes B with ``mask`` on the clean validation split; the params and a summary."""
  start = time.perf_counter()
  clean = defence.splits['clean_valid']
  params, history = fineprune.fine_prune(defence.params, mask, clean.images, clean.labels,
                                         recipe(config), config.finetune.holdout_fraction,
                                         name=name)
  return params, _summary(history, time.perf_counter() - start, name)


def _summary(history: list[dict], seconds: float, name: str) -> dict:
  """The chosen epoch and the per-epoch history (no timings: results.json is reproducible)."""
  best = max(history, key=lambda epoch: (epoch['holdout_acc'], epoch['epoch']))
  logging.info('%s: %d epochs in %.1f s; epoch %d chosen (held-out clean accuracy %.2f %%).',
               name, len(history), seconds, best['epoch'], best['holdout_acc'])
  return {'chosen_epoch': best['epoch'], 'holdout_acc': best['holdout_acc'],
          'history': [{key: value for key, value in epoch.items() if key != 'seconds'}
                      for epoch in history]}


def recommend(results: dict, b_holdout_acc: float, max_clean_drop: float) -> dict | None:
  """The deepest X whose fine-pruned net keeps held-out clean accuracy within the drop of B's.

  Uses the held-out clean images only: a defender without poisoned data can
  make this choice. None if no fine-pruned net qualifies.
  """
  candidates = [(entry['channels_pruned'], x) for x, entry in results['thresholds'].items()
                if entry.get('fine_pruned')
                and entry['fine_pruned']['holdout_acc'] >= b_holdout_acc - max_clean_drop]
  if not candidates:
    return None
  level, x = max(candidates, key=lambda c: (c[0], float(c[1])))
  return {'x': x, 'channels_pruned': level, 'max_clean_drop': max_clean_drop,
          'b_holdout_acc': b_holdout_acc,
          'holdout_acc': results['thresholds'][x]['fine_pruned']['holdout_acc']}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs the prune job's defence, then fine-prunes each B'_X and fine-tunes B alone."""
  check_config(config)
  out = workdir_lib.prepare(workdir)
  workdir_lib.write_config(out, config, 'fine_prune')
  defence = prune_job.defend(config, out, keep_images=True)
  prune_job.write_repaired(out, defence)
  results, batch = defence.results, config.batch_size
  clean_valid = defence.splits['clean_valid']
  fit_rows, holdout_rows = fineprune.holdout_split(clean_valid.labels,
                                                   config.finetune.holdout_fraction,
                                                   config.finetune.seed)
  if not len(holdout_rows) or not len(fit_rows):
    raise ConfigError(
        f'{prune_job.resolve_inputs(config, out).paths["clean_valid"]}: '
        f'{len(clean_valid.labels)} clean validation '
        f'images leave {len(fit_rows)} to fine-tune on and {len(holdout_rows)} to hold out '
        f'(config.finetune.holdout_fraction={config.finetune.holdout_fraction}); fine-pruning '
        f'needs at least two images of some class')
  results['finetune'] = {**dataclasses.asdict(recipe(config)),
                         'holdout_fraction': config.finetune.holdout_fraction,
                         'max_clean_drop': config.finetune.max_clean_drop,
                         'train_images': len(fit_rows), 'holdout_images': len(holdout_rows),
                         'data': 'clean validation split only'}
  print(f'Fine-tuning on {len(fit_rows)} clean validation images ({len(holdout_rows)} held out '
        f'to choose the epoch): B alone, then B\'_X for each X reached...', flush=True)
  b_classes = {key: evaluate.predict(defence.params, defence.splits[key].images, batch)
               for key in ('clean_test', 'poisoned_test')}

  all_kept = np.ones(len(defence.order), np.float32)
  params, summary = _tune(defence, all_kept, config, 'fine-tune only')
  results['fine_tuned_only'] = {**_scores(params, b_classes, defence, batch)[0], **summary}
  tuned = {}  # level -> (params, figures): thresholds that share a level share the net
  for x, level in defence.levels.items():
    entry = results['thresholds'][prune_job.label(x)]
    if level is None:
      entry.update(fine_pruned=None, goodnet_fine_pruned=None)
      continue
    if level not in tuned:
      params, summary = _tune(defence, defence.masks[level], config,
                              f'fine-prune X={prune_job.label(x)}')
      net, good = _scores(params, b_classes, defence, batch)
      tuned[level] = params, {**net, **summary}, good
    params, net, good = tuned[level]
    entry['fine_pruned'], entry['goodnet_fine_pruned'] = dict(net), dict(good)
    entry['fine_pruned_model_file'] = f'models/fine_pruned_X={prune_job.label(x)}.h5'
    keras_io.write_keras(out / entry['fine_pruned_model_file'], params, full_model=True)
    logging.info('Fine-pruned X=%s: clean %.2f %%, ASR %.2f %% (test).', prune_job.label(x),
                 entry['fine_pruned']['clean_acc'], entry['fine_pruned']['asr'])
  b_holdout_acc = evaluate.accuracy(defence.params, clean_valid.images[holdout_rows],
                                    clean_valid.labels[holdout_rows], batch)
  results['recommended'] = recommend(results, b_holdout_acc, config.finetune.max_clean_drop)
  report.write_results(out, results, defence.clean_acc, defence.asr, defence.levels)
  print(report.summary(results), flush=True)
  return results
