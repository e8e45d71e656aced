"""The one path every defence takes: inputs, defend on clean data, score, report.

``run`` hands the clean validation split alone to ``defences.get(config.defence)
.defend`` with the settings of its block ``config.<defence>``. Only then does
one ``Scorer`` read the test and poisoned files; the defence's ``report`` turns
its outcome and those scores into results.json's parts and its own files.

A defence that ranks channels (``READS = 'features'``) gets the layers up to
the pruned one computed once per image for all four files in one streamed pass
(no file's images held whole; on several processes each reads its share of
rows); ``'both'`` keeps the images too (fine-pruning trains on them).
"""

import concurrent.futures
import dataclasses
import functools
import pathlib
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from absl import logging
import jax
import numpy as np

from badnet import config as config_lib
from badnet import defences, inputs
from badnet.core import distributed, evaluate, model
from badnet.defences import base, goodnet, sweep
from badnet.errors import ConfigError, DataError
from badnet.io import data, keras_io, workdir

Params = model.Params
REPORT_FILES = ('clean_test', 'poisoned_valid', 'poisoned_test')
TEST_FILES = ('clean_test', 'poisoned_test')


def settings_of(config: config_lib.Config, name: str | None = None) -> Any:
  """Defence ``name``'s settings (default ``config.defence``), from its block ``config.<name>``."""
  name = name or config.defence
  defence = defences.get(name)
  if name not in config:
    raise ConfigError(f'config.{name} is missing: the settings of the {name} defence')
  return config_lib.build(defence.Settings, config[name], f'{name}.')


def check(config: config_lib.Config) -> None:
  """Every check of a defence config that needs no work: its block, then the defence's own."""
  defence = defences.get(config.defence)
  settings = settings_of(config)
  if hasattr(defence, 'check'):
    defence.check(settings, config)


@dataclasses.dataclass
class Scorer:
  """Nets' classes and figures on the report files (B's cached); ``splits`` and ``features``
  hold this process's rows, ``gather(key, rows)`` every process's, ``labels`` all rows'."""
  params: Params
  num_classes: int
  labels: dict[str, np.ndarray]
  splits: dict[str, data.Dataset]
  features: dict[str, sweep.Features]
  batch_size: int
  precision: str
  gather: Callable[[str, np.ndarray], np.ndarray]
  model: str = ''  # B's file, for titles
  started: float = 0.0  # time.perf_counter() when the run began reading its files
  _b_classes: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

  def predict(self, net: Params, key: str) -> np.ndarray:
    """``net``'s classes on file ``key``."""
    return self.gather(key, evaluate.predict(net, self.splits[key].images, self.batch_size,
                                             precision=self.precision))

  def b_classes(self, key: str) -> np.ndarray:
    """B's classes on file ``key`` (computed once)."""
    if key not in self._b_classes:
      self._b_classes[key] = self.predict(self.params, key)
    return self._b_classes[key]

  def classes(self, net: Params, keys: tuple[str, ...] = TEST_FILES) -> dict[str, np.ndarray]:
    return {key: self.predict(net, key) for key in keys}

  def figures(self, classes: dict[str, np.ndarray]) -> tuple[dict, dict]:
    """A net's {clean_acc, asr} on the test split and its GoodNet's (with B) figures."""
    return goodnet.figures({key: self.b_classes(key) for key in TEST_FILES}, classes,
                           self.labels, self.num_classes)

  def percent(self, classes: np.ndarray, key: str) -> float:
    """Percent of file ``key`` given its label (the target, for a poisoned file: ASR)."""
    return evaluate.percent(classes == self.labels[key])

  def accuracy(self, net: Params, images: np.ndarray, labels: np.ndarray) -> float:
    return evaluate.accuracy(net, images, labels, self.batch_size, precision=self.precision)


def run(config: config_lib.Config, out: pathlib.Path) -> dict:
  """Runs ``config.defence`` on ``config``'s inputs; writes its results to the workdir ``out``."""
  defence = defences.get(config.defence)
  settings = settings_of(config)
  given = inputs.resolve(config)
  params = keras_io.read_params(given.model_path)
  reads = getattr(defence, 'READS', 'images')
  layer = getattr(settings, 'layer', model.FEATURE_LAYER)
  # The files this run reads: the clean split, and those its report scores on.
  paths = {key: given.paths[key]
           for key in ('clean_valid', *getattr(defence, 'REPORT_FILES', REPORT_FILES))}
  started = time.perf_counter()
  files = _Files(paths, params, config.batch_size, config.precision,
                 layer if reads in ('features', 'both') else None, reads != 'features')
  clean = files.clean()
  start = time.perf_counter()
  outcome = defence.defend(params, clean, settings)
  logging.info('%s: defended on clean data in %.1f s.', defence.NAME, time.perf_counter() - start)
  # Reporting from here on: the test and poisoned files are read now (or their
  # features, computed in the same pass as the clean split's, are used now).
  scorer = files.scorer(str(given.model_path), started)
  results = {'model': str(given.model_path), 'synthetic_benchmark': given.synthetic,
             'data': inputs.recorded(paths), 'defence': defence.NAME}
  leader = distributed.is_leader()
  results.update(defence.report(outcome, scorer, settings, out if leader else None))
  if leader:
    workdir.write_json(out / 'results.json', results)
    workdir.write_text(out / 'results.md', defence.markdown(results))
    print(defence.markdown(results, printed=True), flush=True)
  return workdir.tidy(results)


class _Files:
  """The run's four data files: the clean split for the defence, the others for the report."""

  def __init__(self, paths: dict[str, pathlib.Path], params: Params, batch_size: int,
               precision: str, layer: str | None, keep_images: bool):
    self.paths, self.params, self.layer, self.keep_images = paths, params, layer, keep_images
    self.batch_size, self.precision = batch_size, precision
    self.num_classes = model.num_classes_of(params)
    self.splits: dict[str, data.Dataset] = {}
    self.labels: dict[str, np.ndarray] = {}
    self.features: dict[str, sweep.Features] = {}
    # Every file's layout and length first (no pixels read), so a missing or
    # malformed file stops the job before any work.
    self.counts = {key: data.csaw_length(path) for key, path in paths.items()}
    if layer is not None:
      start = time.perf_counter()
      self.splits, labels, self.features = distributed.on_every_process(self._observe)
      self.labels = {key: self.gather(key, local) for key, local in labels.items()}
      logging.info('Loaded %s; features in %.1f s.',
                   ', '.join(f'{k}: {len(v)} of {self.counts[k]} images'
                             for k, v in labels.items()), time.perf_counter() - start)

  def gather(self, key: str, local: np.ndarray) -> np.ndarray:
    return distributed.gather_rows(local, self.counts[key])

  def _load(self, key: str) -> data.Dataset:
    if key not in self.splits:
      self.splits[key] = data.load_csaw_h5(self.paths[key], self.num_classes,
                                           rows=_share(self.paths[key], self.counts[key]))
      self.labels[key] = self.gather(key, self.splits[key].labels)
    return self.splits[key]

  def clean(self) -> base.Clean:
    """The clean validation split, as the defence sees it."""
    key = 'clean_valid'
    images = self._load(key).images if self.keep_images else None
    features = {self.layer: self.features[key]} if key in self.features else {}
    return base.Clean(self.labels[key], images, self.batch_size, self.precision, features,
                      functools.partial(self.gather, key), str(self.paths[key]))

  def scorer(self, model_path: str, started: float) -> Scorer:
    for key in self.paths:
      if self.keep_images:
        self._load(key)
    return Scorer(self.params, self.num_classes, self.labels, self.splits, self.features,
                  self.batch_size, self.precision, self.gather, model_path, started)

  def _observe(self):
    """This process's rows of each file: (data sets if kept, labels, features), by file key.

    Files are read by a thread while the device works: in chunks straight into
    the feature pass, or whole when the images are kept.
    """
    if not self.keep_images:
      labels, features = _stream_and_observe(self.paths, self.counts, self.params,
                                             self.num_classes, self.batch_size,
                                             self.precision, self.layer)
      return {}, labels, features
    splits, labels, features = {}, {}, {}
    loader = concurrent.futures.ThreadPoolExecutor(1)
    try:
      loading = {key: loader.submit(data.load_csaw_h5, path, self.num_classes,
                                    rows=_share(path, self.counts[key]))
                 for key, path in self.paths.items()}
      for key in list(loading):
        split = loading.pop(key).result()  # popped: no future keeps the images alive
        features[key] = sweep.features(self.params, split.images, self.batch_size,
                                       self.precision, self.layer)
        labels[key], splits[key] = split.labels, split
    finally:
      loader.shutdown(wait=False, cancel_futures=True)
    return splits, labels, features


def _share(path: pathlib.Path, count: int) -> tuple[int, int] | None:
  """This process's rows of a data file of ``count`` rows (None: all, on one process)."""
  if jax.process_count() == 1:
    return None
  if count < jax.process_count():
    raise DataError(f'{path}: {count} images, fewer than the {jax.process_count()} processes '
                    f'that share them')
  return distributed.row_range(count)


def _stream_and_observe(paths, counts, params, num_classes, batch_size, precision, layer):
  """Features of this process's rows of each file, computed chunk by chunk as a thread reads
  them: no file's images are held whole, only a few chunks in the queue."""
  params = evaluate.replicate(params)  # once, not for every chunk's map_batches
  chunks = queue.Queue(maxsize=4)
  stop = threading.Event()
  reader = threading.Thread(target=_read_chunks, daemon=True,
                            args=(paths, counts, num_classes, batch_size, chunks, stop))
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
          pieces.append(sweep.features(params, item, batch_size, precision, layer,
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

