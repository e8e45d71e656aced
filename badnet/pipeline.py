"""The pruning pipeline the prune and fine-prune jobs share: files in, figures out.

It reads the four data files (streamed in checked chunks, or whole when
fine-pruning needs the images), computes the layers up to pool_3 once per
image, runs the pruning defence on the clean validation split
(``defences.pruning``: ranking, sweep, threshold choice), and reports it on
the other files: the validation ASR curve and B, B'_X and G_X on the test
split. The poisoned files are read for these reports only.

On several processes each reads and computes its share of every file's rows;
per-image results are gathered, so every process holds the same figures.
"""

import concurrent.futures
import dataclasses
import pathlib
import queue
import threading
import time
from types import ModuleType

from absl import logging
import jax
import ml_collections
import numpy as np

from badnet.core import distributed, evaluate, masks, model
from badnet.defences import base, goodnet, pruning, sweep
from badnet.errors import DataError
from badnet.io import data, inputs, keras_io, report, workdir


@dataclasses.dataclass(frozen=True)
class PruningRun:
  """What the pruning defence found: everything a later stage (fine-pruning) builds on."""
  params: model.Params
  num_classes: int
  splits: dict[str, data.Dataset]  # keys of inputs.CSAW_FILES; {} unless keep_images
  order: np.ndarray                 # channels in pruning order
  masks: np.ndarray                 # [C + 1, C] prefix masks
  clean_acc: np.ndarray             # clean validation accuracy at levels 0..C
  asr: np.ndarray                   # validation ASR at levels 0..C
  levels: dict[float, int | None]   # X -> level (None: never reached)
  results: dict                     # what results.json holds


def _share(path: pathlib.Path, count: int) -> tuple[int, int] | None:
  """This process's rows of a data file of ``count`` rows (None: all, on one process)."""
  if jax.process_count() == 1:
    return None
  if count < jax.process_count():
    raise DataError(f'{path}: {count} images, fewer than the {jax.process_count()} processes '
                    f'that share them')
  return distributed.row_range(count)


def _load_share(path: pathlib.Path, count: int, num_classes: int) -> data.Dataset:
  """This process's rows of a data file of ``count`` rows, loaded whole."""
  return data.load_csaw_h5(path, num_classes, rows=_share(path, count))


def run_pruning(config: ml_collections.ConfigDict, out: pathlib.Path,
                keep_images: bool = False) -> PruningRun:
  """Loads the inputs, ranks and sweeps conv_3, selects B'_X and scores B, B'_X, G_X on test.

  Writes sweep.csv (process 0); the caller writes the rest.

  Args:
    config: the prune job's config.
    out: the workdir.
    keep_images: return the loaded data sets in ``PruningRun.splits``
      (fine-pruning trains on them). Otherwise each file's images are dropped
      once its features are computed, so at most two files' images (the one
      on the device, the next one loading) are held at a time.
  """
  given = inputs.resolve(config)
  params = keras_io.read_params(given.model_path)
  num_classes = model.num_classes_of(params)
  batch, precision = config.batch_size, config.precision

  start = time.perf_counter()
  # Every file's layout and length first (no pixels read), so a missing or
  # malformed file stops the job before any work.
  counts = {key: data.csaw_length(path) for key, path in given.paths.items()}
  splits, labels_here, features = distributed.on_every_process(
      _load_and_observe, given.paths, counts, params, num_classes, keep_images, config)
  logging.info('Loaded %s and %s; features in %.1f s.', given.model_path,
               ', '.join(f'{k}: {len(v)} of {counts[k]} images'
                         for k, v in labels_here.items()),
               time.perf_counter() - start)
  gather = lambda key, local: distributed.gather_rows(local, counts[key])
  labels = {key: gather(key, local) for key, local in labels_here.items()}

  # The defence: clean validation data only.
  channel_means = gather('clean_valid', features['clean_valid'].channel_means)
  order = pruning.pruning_order(channel_means.astype(np.float64).mean(axis=0), config.order,
                                config.seed)
  _say(f'Sweeping {len(order)} conv_3 channels, {config.order} mean activation first...')
  swept = lambda key, levels=None: gather(key, sweep.prefix_classes(
      params, features[key].pool_3, order, levels, batch, precision))
  clean_acc = pruning.level_accuracy(swept('clean_valid'), labels['clean_valid'])
  levels = pruning.select_levels(clean_acc, config)

  # Its report: the validation ASR curve and the test split.
  asr = pruning.level_accuracy(swept('poisoned_valid'), labels['poisoned_valid'])
  logging.info('Sweep done in %.1f s.', time.perf_counter() - start)
  if distributed.is_leader():
    report.write_sweep_csv(out / 'sweep.csv', order, clean_acc, asr)
  for x, level in levels.items():
    if level is None:
      logging.warning('No pruning level drops clean accuracy by %s points.', pruning.label(x))
  reached = sorted({level for level in levels.values() if level is not None})
  test_classes = {key: swept(key, [0, *reached]) for key in ('clean_test', 'poisoned_test')}
  results = {'model': str(given.model_path), 'synthetic_benchmark': given.synthetic,
             'data': inputs.recorded(given.paths),
             'order': config.order, 'relative': config.relative,
             'base': {'valid': {'clean_acc': float(clean_acc[0]), 'asr': float(asr[0])}},
             'thresholds': {}}
  results['base']['test'], results['thresholds'] = _test_figures(
      test_classes, labels, order, levels, reached, num_classes, config.relative)
  return PruningRun(params, num_classes, splits, order, masks.prefix_masks(order), clean_acc,
                    asr, levels, results)


def _load_and_observe(paths, counts, params, num_classes, keep_images, config):
  """This process's rows of each file: (data sets if kept, labels, features), by file key.

  One pass of conv_1..pool_3 per file: the ranking, the sweep and the test
  figures share it. Files are read by a thread while the device works: in
  chunks straight into the feature pass, or whole when ``keep_images``.
  """
  if not keep_images:
    labels, features = _stream_and_observe(paths, counts, params, num_classes, config)
    return {}, labels, features
  splits, labels, features = {}, {}, {}
  loader = concurrent.futures.ThreadPoolExecutor(1)
  try:
    loading = {key: loader.submit(_load_share, path, counts[key], num_classes)
               for key, path in paths.items()}
    for key in list(loading):
      split = loading.pop(key).result()  # popped: no future keeps the images alive
      features[key] = sweep.features(params, split.images, config.batch_size,
                                     config.precision)
      labels[key] = split.labels
      if keep_images:
        splits[key] = split
      del split
  finally:
    loader.shutdown(wait=False, cancel_futures=True)
  return splits, labels, features


def _stream_and_observe(paths, counts, params, num_classes, config):
  """Features of this process's rows of each file, computed chunk by chunk as a thread reads them.

  No file's images are ever held whole: at most a few chunks wait in the
  queue (``_read_chunks``), so memory stays at the features (4.8 KB an image).
  """
  params = evaluate.replicate(params)  # once, not for every chunk's map_batches
  chunks = queue.Queue(maxsize=4)
  stop = threading.Event()
  reader = threading.Thread(target=_read_chunks, daemon=True,
                            args=(paths, counts, num_classes, config.batch_size, chunks, stop))
  reader.start()
  labels, features = {}, {}
  try:
    for key in paths:
      pieces = []
      while True:
        kind, item = chunks.get()
        if kind == 'error':
          raise item
        if kind == 'end':
          break
        if kind == 'labels':
          labels[key] = item
        else:
          pieces.append(sweep.features(params, item, config.batch_size, config.precision,
                                       fixed_batch=True))
      features[key] = sweep.concatenate(pieces)
  finally:
    stop.set()
    while reader.is_alive():  # unblock a reader waiting on a full queue
      try:
        chunks.get_nowait()
      except queue.Empty:
        reader.join(0.01)
  return labels, features


def _read_chunks(paths, counts, num_classes, batch_size, chunks, stop):
  """Puts ('labels', ...), ('images', chunk) per checked chunk, ('end', None) on ``chunks``.

  An error (a DataError naming the file, or any other) goes on the queue as
  ('error', error) for the consumer to raise.
  """
  try:
    for key, path in paths.items():
      opened = data.iter_csaw_h5(path, num_classes, rows=_share(path, counts[key]),
                                 chunk_size=batch_size)
      chunks.put(('labels', opened.labels))
      for chunk in opened.chunks:
        if stop.is_set():
          return
        chunks.put(('images', chunk))
      chunks.put(('end', None))
  except BaseException as error:  # handed to the consumer, which raises it
    chunks.put(('error', error))


def _say(line: str) -> None:
  """Prints a line for the user, once (on process 0)."""
  if distributed.is_leader():
    print(line, flush=True)


def write_repaired(out: pathlib.Path, defence: PruningRun) -> None:
  """models/repaired_X=<X>.h5: B'_X as a full Keras model, for each X reached."""
  for x, level in defence.levels.items():
    if level is not None:
      keras_io.write_keras(out / 'models' / f'repaired_X={pruning.label(x)}.h5',
                           masks.prune(defence.params, defence.masks[level]), full_model=True)


def _test_figures(classes, labels, order, levels, reached, num_classes, relative):
  """B, B'_X and G_X on the test split from its classes at levels [0, *reached]."""
  at = lambda column: {key: classes[key][:, column] for key in ('clean_test', 'poisoned_test')}
  base, _ = goodnet.figures(at(0), at(0), labels, num_classes)
  figures = {}
  for x, level in levels.items():
    entry = {'drop': x, 'relative': relative, 'reached': level is not None}
    if level is None:
      figures[pruning.label(x)] = {**entry, 'channels_pruned': None, 'pruned_channels': None,
                                    'repaired': None, 'goodnet': None}
      continue
    repaired, good = goodnet.figures(at(0), at(1 + reached.index(level)), labels, num_classes)
    figures[pruning.label(x)] = {
        **entry, 'channels_pruned': level, 'pruned_channels': [int(c) for c in order[:level]],
        'repaired': repaired, 'goodnet': good,
        'model_file': f'models/repaired_X={pruning.label(x)}.h5'}
  return base, figures


def defend_on_clean(defence: ModuleType, config: ml_collections.ConfigDict
                    ) -> tuple[inputs.Inputs, model.Params, data.Dataset, base.Outcome, float]:
  """A defence run on what a defender has: the model and the clean validation split.

  No other file is read here; a job reads the test and poisoned files after
  this returns, to report.

  Returns:
    The job's inputs, B's params, the clean validation split, the defence's
    outcome and the seconds it took.
  """
  given = inputs.resolve(config)
  params = keras_io.read_params(given.model_path)
  clean_valid = data.load_csaw_h5(given.paths['clean_valid'], model.num_classes_of(params))
  start = time.perf_counter()
  outcome = defence.defend(params, clean_valid, config)
  return given, params, clean_valid, outcome, time.perf_counter() - start


def run_learned_masks(defence: ModuleType, config: ml_collections.ConfigDict,
                      out: pathlib.Path) -> dict:
  """A learned-mask defence (ANP, RNP) end to end: defend on clean data, then report.

  The defence sees the clean validation split only (its masks learned on one
  part, its depth chosen on the other). Only then are the test files and the
  poisoned validation file read, to report every candidate (the trade-off,
  ASR for reporting only), the chosen one and its GoodNet. Writes
  models/defended.h5, masks.npz, results.json, results.md and plots.
  """
  given, params, clean_valid, outcome, seconds = defend_on_clean(defence, config)
  num_classes = model.num_classes_of(params)
  logging.info('%s: masks learned and %d candidates scored on held-out clean data in %.1f s.',
               defence.NAME, len(outcome.candidates), seconds)
  # Reporting from here on: the poisoned files are read now, and only now.
  splits = {key: data.load_csaw_h5(given.paths[key], num_classes)
            for key in ('clean_test', 'poisoned_valid', 'poisoned_test')}
  labels = {key: split.labels for key, split in splits.items()}
  predict = lambda net, key: evaluate.predict(net, splits[key].images, config.batch_size,
                                              precision=config.precision)
  b_classes = {key: predict(params, key) for key in splits}
  base_test, _ = goodnet.figures(b_classes, b_classes, labels, num_classes)
  results = {
      'model': str(given.model_path), 'synthetic_benchmark': given.synthetic,
      'data': inputs.recorded(given.paths), 'defence': defence.NAME,
      'base': {'valid': {'clean_acc': evaluate.accuracy(params, clean_valid.images,
                                                       clean_valid.labels, config.batch_size),
                         'asr': evaluate.percent(b_classes['poisoned_valid']
                                                 == labels['poisoned_valid'])},
               'test': base_test},
      'b_holdout_acc': outcome.figures['b_holdout_acc'],
      'holdout_images': outcome.figures['holdout_images'],
      'max_clean_drop': config.max_clean_drop, 'recommended': outcome.recommended,
      'tradeoff': []}
  for name, candidate in outcome.candidates.items():
    classes = {key: predict(candidate.params, key) for key in splits}
    net, good = goodnet.figures(b_classes, classes, labels, num_classes)
    valid_asr = evaluate.percent(classes['poisoned_valid'] == labels['poisoned_valid'])
    row = {'candidate': name, **candidate.figures, 'test_clean_acc': net['clean_acc'],
           'test_asr': net['asr'], 'valid_asr': valid_asr}
    results['tradeoff'].append(row)
    if name == outcome.recommended:
      tuned = candidate.figures.get('fine_tuned')
      results['defended'] = {
          'candidate': name, 'neurons_pruned': candidate.figures['neurons_pruned'],
          'valid': {'clean_acc': (tuned or candidate.figures)['holdout_clean_acc'],
                    'asr': valid_asr},
          'test': net, 'fine_tuned': tuned}
      results['goodnet'] = {'test': good}
      results['pruned'] = {layer: [int(i) for i in indices]
                           for layer, indices in candidate.pruned.items()}
      results['model_file'] = 'models/defended.h5'
      keras_io.write_keras(out / results['model_file'], candidate.params, full_model=True)
  if 'unlearning' in outcome.figures:
    results['unlearning'] = outcome.figures['unlearning']
  results['masks_file'] = 'masks.npz'
  learned = outcome.figures['masks']
  variant_masks = {variant: found.masks for variant, found in learned.items()}
  report.write_masks(out / results['masks_file'], variant_masks,
                     {variant: found.means for variant, found in learned.items()})
  report.write_learned_mask_results(out, results, variant_masks)
  print(report.learned_mask_markdown(results), flush=True)
  return workdir.tidy(results)
