"""The pruning defence and GoodNet, end to end: sweep, thresholds, reports, repaired nets."""

import concurrent.futures
import dataclasses
import pathlib
import queue
import threading
import time

from absl import logging
import jax
import ml_collections
import numpy as np

from badnet import data, distributed, evaluate, goodnet, keras_io, model, prune, report, sweep
from badnet import workdir as workdir_lib
from badnet.errors import ConfigError, DataError
from badnet.jobs import common


@dataclasses.dataclass(frozen=True)
class Inputs:
  model_path: pathlib.Path
  paths: dict[str, pathlib.Path]  # keys of common.CSAW_FILES
  synthetic: bool


def check_config(config: ml_collections.ConfigDict) -> None:
  """Rejects bad config values before any work is done."""
  common.check_batch_size(config)
  common.check_benchmark(config)
  thresholds = config.thresholds
  if isinstance(thresholds, (int, float)):
    thresholds = (thresholds,)
  if not thresholds:
    raise ConfigError('config.thresholds is empty; give at least one X in (0, 100]')
  for x in thresholds:
    common.check_threshold(x)
  common.check_precision(config)
  if config.order not in prune.ORDERS:
    raise ConfigError(f'config.order: unknown order {config.order!r}; expected one of '
                      f'{", ".join(prune.ORDERS)}')


def _thresholds(config: ml_collections.ConfigDict) -> list[float]:
  values = config.thresholds
  values = (values,) if isinstance(values, (int, float)) else values
  return sorted({float(x) for x in values})


def label(x: float) -> str:
  """'2' for 2.0, '2.5' for 2.5: the key of a threshold in results and file names."""
  return f'{x:g}'


def resolve_inputs(config: ml_collections.ConfigDict, out: pathlib.Path) -> Inputs:
  """The model and the four data files, from the config or the shipped benchmark."""
  overrides = {key: config.data[key] for key in common.CSAW_FILES}
  if not config.model and not config.data.dir and not any(overrides.values()):
    # Process 0 regenerates the data; the others wait for it, then find it there.
    if distributed.is_leader():
      common.shipped_benchmark(out, config.benchmark)
    distributed.barrier('shipped benchmark data')
    model_path, data_dir = common.shipped_benchmark(out, config.benchmark, quiet=True)
    synthetic = True
  else:
    if not config.model:
      raise ConfigError('config.model is empty; give the backdoored net (.h5), or leave '
                        'model and data empty to run on the shipped synthetic benchmark')
    model_path, data_dir, synthetic = pathlib.Path(config.model), config.data.dir, False
  paths = {}
  for key, relative in common.CSAW_FILES.items():
    if overrides[key]:
      paths[key] = pathlib.Path(overrides[key])
    elif data_dir:
      paths[key] = pathlib.Path(data_dir) / relative
    else:
      raise ConfigError(f'no path for the {key.replace("_", " ")} file: set config.data.dir '
                        f'(CSAW layout: {relative}) or config.data.{key}')
  return Inputs(pathlib.Path(model_path), paths, synthetic)


def _level_metrics(classes: np.ndarray, labels: np.ndarray) -> np.ndarray:
  """Percent of rows whose class equals the label, at each level (classes [N, L])."""
  return 100.0 * (classes == labels[:, None]).mean(axis=0)


@dataclasses.dataclass(frozen=True)
class Defence:
  """What the pruning defence found: everything a later stage (fine-pruning) builds on."""
  params: model.Params
  num_classes: int
  splits: dict[str, data.Dataset]  # keys of common.CSAW_FILES; {} unless keep_images
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


def defend(config: ml_collections.ConfigDict, out: pathlib.Path,
           keep_images: bool = False) -> Defence:
  """Loads the inputs, ranks and sweeps conv_3, selects B'_X and scores B, B'_X, G_X on test.

  On several processes each reads and computes its share of every file's rows;
  per-image results are gathered, so every process holds the same figures.
  Writes sweep.csv (process 0); the caller writes the rest.

  Args:
    config: the prune job's config.
    out: the workdir.
    keep_images: return the loaded data sets in ``Defence.splits`` (fine-pruning
      trains on them). Otherwise each file's images are dropped once its
      features are computed, so at most two files' images (the one on the
      device, the next one loading) are held at a time.
  """
  inputs = resolve_inputs(config, out)
  params = keras_io.read_params(inputs.model_path)
  num_classes = model.num_classes_of(params)
  batch, precision = config.batch_size, config.precision

  start = time.perf_counter()
  # Every file's layout and length first (no pixels read), so a missing or
  # malformed file stops the job before any work.
  counts = {key: data.csaw_length(path) for key, path in inputs.paths.items()}
  splits, labels_here, features = distributed.on_every_process(
      _load_and_observe, inputs.paths, counts, params, num_classes, keep_images, config)
  logging.info('Loaded %s and %s; features in %.1f s.', inputs.model_path,
               ', '.join(f'{k}: {len(v)} of {counts[k]} images'
                         for k, v in labels_here.items()),
               time.perf_counter() - start)
  gather = lambda key, local: distributed.gather_rows(local, counts[key])
  labels = {key: gather(key, local) for key, local in labels_here.items()}
  channel_means = gather('clean_valid', features['clean_valid'].channel_means)
  order = prune.pruning_order(channel_means.astype(np.float64).mean(axis=0), config.order,
                              config.seed)
  masks = prune.prefix_masks(order)
  _say(f'Sweeping {len(order)} conv_3 channels, {config.order} mean activation first...')
  clean_acc, asr = (
      _level_metrics(gather(key, sweep.prefix_classes(params, features[key].pool_3, order,
                                                      None, batch, precision)), labels[key])
      for key in ('clean_valid', 'poisoned_valid'))
  logging.info('Sweep done in %.1f s.', time.perf_counter() - start)
  if distributed.is_leader():
    report.write_sweep_csv(out / 'sweep.csv', order, clean_acc, asr)

  levels = {x: prune.select_level(clean_acc, x, config.relative) for x in _thresholds(config)}
  for x, level in levels.items():
    if level is None:
      logging.warning('No pruning level drops clean accuracy by %s points.', label(x))
  reached = sorted({level for level in levels.values() if level is not None})
  test_classes = {
      key: gather(key, sweep.prefix_classes(params, features[key].pool_3, order,
                                            [0, *reached], batch, precision))
      for key in ('clean_test', 'poisoned_test')}
  results = {'model': str(inputs.model_path), 'synthetic_benchmark': inputs.synthetic,
             'order': config.order, 'relative': config.relative,
             'base': {'valid': {'clean_acc': float(clean_acc[0]), 'asr': float(asr[0])}},
             'thresholds': {}}
  results['base']['test'], results['thresholds'] = _test_figures(
      test_classes, labels, order, levels, reached, num_classes, config.relative)
  return Defence(params, num_classes, splits, order, masks, clean_acc, asr, levels, results)


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
  """Puts ('labels', ...), then ('images', chunk) for each validated chunk, then ('end', None) on ``chunks``, file by file.

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


def write_repaired(out: pathlib.Path, defence: Defence) -> None:
  """models/repaired_X=<X>.h5: B'_X as a full Keras model, for each X reached."""
  for x, level in defence.levels.items():
    if level is not None:
      keras_io.write_keras(out / 'models' / f'repaired_X={label(x)}.h5',
                           prune.prune(defence.params, defence.masks[level]), full_model=True)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs the defence; writes sweep.csv, results.json/.md, plots and repaired nets."""
  check_config(config)
  out = distributed.on_every_process(_prepare_workdir, config, workdir, 'prune')
  defence = defend(config, out)
  if distributed.is_leader():
    write_repaired(out, defence)
    report.write_results(out, defence.results, defence.clean_acc, defence.asr,
                         defence.levels)
  _say(report.summary(defence.results))
  return defence.results


def _prepare_workdir(config: ml_collections.ConfigDict, workdir: str,
                     job: str) -> pathlib.Path:
  """The checked workdir with its config.json; only process 0 touches it."""
  if not distributed.is_leader():
    return pathlib.Path(workdir)
  out = workdir_lib.prepare(workdir)
  workdir_lib.write_config(out, config, job)
  return out


def _test_figures(classes, labels, order, levels, reached, num_classes, relative):
  """B, B'_X and G_X on the test split from its classes at levels [0, *reached]."""
  clean_classes, poisoned_classes = classes['clean_test'], classes['poisoned_test']
  clean_labels, poisoned_labels = labels['clean_test'], labels['poisoned_test']
  base = {'clean_acc': evaluate.percent(clean_classes[:, 0] == clean_labels),
          'asr': evaluate.percent(poisoned_classes[:, 0] == poisoned_labels)}
  figures = {}
  for x, level in levels.items():
    entry = {'drop': x, 'relative': relative, 'reached': level is not None}
    if level is None:
      figures[label(x)] = {**entry, 'channels_pruned': None, 'pruned_channels': None,
                            'repaired': None, 'goodnet': None}
      continue
    column = 1 + reached.index(level)
    g_clean = np.asarray(goodnet.combine(clean_classes[:, 0], clean_classes[:, column],
                                         num_classes))
    g_poisoned = np.asarray(goodnet.combine(poisoned_classes[:, 0],
                                            poisoned_classes[:, column], num_classes))
    figures[label(x)] = {
        **entry,
        'channels_pruned': level,
        'pruned_channels': [int(c) for c in order[:level]],
        'repaired': {
            'clean_acc': evaluate.percent(clean_classes[:, column] == clean_labels),
            'asr': evaluate.percent(poisoned_classes[:, column] == poisoned_labels)},
        'goodnet': goodnet.metrics(g_clean, clean_labels, g_poisoned, poisoned_labels,
                                   num_classes),
        'model_file': f'models/repaired_X={label(x)}.h5',
    }
  return base, figures
