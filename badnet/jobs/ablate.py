"""Ablations and the leaderboard: a grid of defences over nets, through one path.

The grid is a list of cells: each (model, layer) of the channel grid (every
order, seed, X and fine-tuning budget of it in one vmapped sweep), and each
(model, defence entry) of the other defences, run through the defence's own
``defend`` (``defences.get``) on the clean validation split and scored by the
one path's ``Scorer``. An entry is a defence's name, or a named variant of it:
``'anp:selection=holdout'`` overrides fields of its block ``config.anp``.
Each net is scored on its own data (a shipped net on its own trigger's).
With ``config.board`` the rows are also summarised by kind of net (clean,
BadNets, blended, pruning-aware) as mean and 95 % interval over the nets of a
kind: the leaderboard (``badnet.io.board``). On several processes
(``--num_processes``, as for the prune job) each process takes every P-th
cell; the rows are gathered and process 0 writes them.
"""

import ast
import dataclasses
import pathlib
import time
from collections.abc import Callable
from typing import Any

from absl import logging
import ml_collections
import jax
import numpy as np

from badnet import config as config_lib
from badnet import defences, defend, inputs
from badnet.benchmark import shipped as shipped_lib
from badnet.core import distributed, evaluate, masks, model, train
from badnet.defences import base, goodnet, sweep
from badnet.errors import ConfigError
from badnet.io import board, data, keras_io, report, tables, workdir

# The channel grid is the pruning and fine-pruning defences' (reached, as every
# defence is, through the registry).
pruning, fine_pruning = defences.get('pruning'), defences.get('fine_pruning')
KEY_FIELDS = ('defence', 'model', 'layer', 'order', 'seed', 'x', 'finetune_epochs')
ROW_FIELDS = board.ROW_FIELDS
CURVE_FIELDS = ('model', 'layer', 'order', 'seed', *report.SWEEP_FIELDS)
# The grid's defences: 'pruning' is the channel grid (fine-pruning where
# finetune_epochs > 0); every other entry is a defence of the registry, one cell
# per model, with the settings of its block (config.<name>) and the entry's overrides.
CHANNEL_GRID = 'pruning'


FIELDS = {
    **config_lib.BATCH_SIZE,
    'defences': config_lib.Each(config_lib.Text()),  # checked by ``entries``
    'models': config_lib.Each(config_lib.Text()),  # .h5 files or shipped nets' names
    'board': config_lib.Boolean(),
    'layers': config_lib.Each(config_lib.Choice(model.PRUNABLE_LAYERS, 'layer')),
    'orders': config_lib.Each(config_lib.Choice(pruning.ORDERS, 'order')),
    'seeds': config_lib.Each(config_lib.Integer()),
    'thresholds': config_lib.Each(pruning.THRESHOLD,
                                  note=' (X is a drop in clean accuracy, in percentage points)'),
    'finetune_epochs': config_lib.Each(config_lib.Integer(0)),
    'relative': config_lib.Boolean(),
    'precision': config_lib.Choice(model.PRECISIONS, 'precision'),
    'holdout_fraction': config_lib.Number(0, 1, low_open=True, high_open=True),
}


def tuning(config: ml_collections.ConfigDict) -> base.Tuning:
  """The fine-tuning settings (config.finetune); each fine-tuning sets its own epochs."""
  # The block's epochs bound the warm-up: the fewest fine-tuning epochs > 0 in the grid (0: none).
  shortest = min((e for e in config_lib.values(config.finetune_epochs) if e > 0), default=0)
  block = ml_collections.ConfigDict({**config.finetune.to_dict(), 'epochs': shortest})
  return config_lib.build(base.Tuning, block, 'finetune.')


def multi_process(config: ml_collections.ConfigDict) -> bool:
  return True  # each process takes its share of the cells


@dataclasses.dataclass(frozen=True)
class Entry:
  """A defence of the grid: ``text`` as config.defences gives it, e.g. 'anp:selection=holdout'."""
  text: str
  name: str
  overrides: tuple[tuple[str, Any], ...] = ()


def parse_entry(text: str) -> Entry:
  """'<defence>' or '<defence>:<field>=<value>,...' (values as Python literals, else strings)."""
  name, _, rest = text.partition(':')
  if name not in (CHANNEL_GRID, *defences.names()):
    raise ConfigError(f'config.defences: unknown defence {name!r}; expected some of '
                      f'{", ".join(defences.names())}, each optionally with '
                      f'":<field>=<value>,..."')
  overrides = []
  for item in filter(None, tables.split_top_level(rest)):
    field, equals, value = item.partition('=')
    if not equals or not field.strip():
      raise ConfigError(f'config.defences: {text!r}: {item!r} is not <field>=<value>')
    try:
      value = ast.literal_eval(value.strip())
    except (ValueError, SyntaxError):
      value = value.strip()
    overrides.append((field.strip(), value))
  if overrides and name == CHANNEL_GRID:
    raise ConfigError(f'config.defences: {text!r}: the channel grid takes its settings from '
                      f'config.layers, orders, thresholds and finetune_epochs')
  return Entry(text, name, tuple(overrides))


def entries(config: ml_collections.ConfigDict) -> list[Entry]:
  return [parse_entry(text) for text in dict.fromkeys(config_lib.values(config.defences))]


def settings_of(config: ml_collections.ConfigDict, entry: Entry) -> Any:
  """Entry's settings: its defence's block with the entry's overrides, checked."""
  if not entry.overrides:
    return defend.settings_of(config, entry.name)
  block = ml_collections.ConfigDict(config[entry.name].to_dict())
  for field, value in entry.overrides:
    *parents, last = field.split('.')
    node = block
    try:
      for part in parents:
        node = node[part]
      if last not in node:
        raise KeyError(last)
      node[last] = value
    except (KeyError, TypeError, AttributeError):
      raise ConfigError(f'config.defences: {entry.text!r}: config.{entry.name} has no field '
                        f'{field!r}') from None
  try:
    return config_lib.build(defences.get(entry.name).Settings, block, f'{entry.name}.')
  except (ConfigError, TypeError, ValueError) as error:
    raise ConfigError(f'config.defences: {entry.text!r}: {error}') from None


def check(config: ml_collections.ConfigDict) -> None:
  """The fine-tuning, every entry, its settings and its defence's own checks on each net, before
  any work (a label a net lacks stops the grid now, not hours in, at its cell)."""
  tuning(config)
  model_files = {name: shipped_lib.SHIPPED_NETS.get(name, name)
                 for name in dict.fromkeys(config_lib.values(config.models))}
  for entry in entries(config):
    if entry.name == CHANNEL_GRID:
      continue
    settings = settings_of(config, entry)
    own_check = getattr(defences.get(entry.name), 'check', None)
    for name, path in (model_files.items() if own_check else ()):
      try:  # a defence's check sees one net, as in its own job
        own_check(settings, ml_collections.ConfigDict({'model': str(path), 'benchmark': None}))
      except ConfigError as error:
        raise ConfigError(f'config.defences: {entry.text!r} on {name}: {error}') from None


@dataclasses.dataclass(frozen=True)
class Variant:
  """One pruning order: 'increasing' and 'decreasing' have no seed, 'random' one per seed."""
  order: str
  seed: int | None

  @property
  def seed_text(self) -> str:
    return '' if self.seed is None else str(self.seed)


def _variants(config: ml_collections.ConfigDict) -> list[Variant]:
  variants = []
  for order in dict.fromkeys(config_lib.values(config.orders)):
    seeds = dict.fromkeys(config_lib.values(config.seeds)) if order == 'random' else (None,)
    variants += [Variant(order, seed) for seed in seeds]
  return variants


def _key(row: dict) -> tuple[str, ...]:
  return tuple(str(row[field]) for field in KEY_FIELDS)


def _percent(value: float | None) -> str:
  return '' if value is None else f'{value:.4f}'


def _row_figures(net: dict, good: dict, b: dict) -> dict:
  """A row's figures (percent, as text) from a net's, its GoodNet's and B's on the test split."""
  figures = {**net, 'goodnet_clean_acc': good['clean_acc'], 'goodnet_asr': good['asr'],
             'detection_rate': good['detection_rate'],
             'false_alarm_rate': good['false_alarm_rate'], 'b_clean_acc': b['clean_acc'],
             'b_asr': b['asr'], 'der': board.der(b, net)}
  return {key: _percent(value) for key, value in figures.items()}


def _b_figures(b_test: dict[str, np.ndarray], labels: dict[str, np.ndarray]) -> dict:
  """B's {clean_acc, asr} on the test split from its classes."""
  return {'clean_acc': evaluate.percent(b_test['clean_test'] == labels['clean_test']),
          'asr': evaluate.percent(b_test['poisoned_test'] == labels['poisoned_test'])}


@dataclasses.dataclass
class _Grid:
  """What every cell of one run shares: each net's data, the grid's axes, the points done."""
  config: ml_collections.ConfigDict
  data_of: dict[str, dict[str, data.Dataset]]  # model name -> its four files
  kinds: dict[str, str]  # model name -> kind of net ('clean', 'badnets', ...; 'given')
  variants: list[Variant]
  thresholds: list[float]
  epochs_axis: list[int]
  tune: base.Tuning
  done: set
  record: Callable[[dict], None]
  cell_started: float = 0.0  # time.perf_counter() when the running cell began
  # The clean validation rows to fine-tune on and to hold out, by clean file (one split each).
  _rows: dict[int, tuple[np.ndarray, np.ndarray]] = dataclasses.field(default_factory=dict)

  def add(self, row: dict) -> None:
    """Records a point: its kind of net, and the time its cell had taken when it was done."""
    self.record({**{field: '' for field in ROW_FIELDS}, **row,
                 'kind': self.kinds[row['model']],
                 'seconds': f'{time.perf_counter() - self.cell_started:.1f}'})

  def splits(self, name: str) -> dict[str, data.Dataset]:
    return self.data_of[name]

  def labels(self, name: str) -> dict[str, np.ndarray]:
    return {key: split.labels for key, split in self.data_of[name].items()}

  def rows(self, name: str) -> tuple[np.ndarray, np.ndarray]:
    clean = self.data_of[name]['clean_valid']
    if id(clean) not in self._rows:
      self._rows[id(clean)] = base.split_for_fine_tuning(
          clean.labels, self.config.holdout_fraction, self.tune.seed)
    return self._rows[id(clean)]

  def scorer(self, params: model.Params, name: str) -> defend.Scorer:
    """The one path's scorer, on net ``name``'s files."""
    return defend.Scorer(params, model.num_classes_of(params), self.labels(name),
                         self.data_of[name], {}, self.config.batch_size, self.config.precision,
                         lambda key, rows: rows)


@dataclasses.dataclass(frozen=True)
class Cell:
  """A unit of the grid that one process runs: a (model, layer) of the channel grid, or a
  (model, defence entry) of the other defences (layer empty)."""
  model: str
  defence: str
  layer: str = ''


def cells(config: ml_collections.ConfigDict, models: list[str]) -> list[Cell]:
  """Every cell of the grid, in the order a single process runs them: defence by defence
  (as config.defences lists them), net by net, so that each defence's rows are whole early."""
  layers = dict.fromkeys(config_lib.values(config.layers))
  every = []
  for entry in entries(config):
    if entry.name == CHANNEL_GRID:
      every += [Cell(name, CHANNEL_GRID, layer) for name in models for layer in layers]
    else:
      every += [Cell(name, entry.text) for name in models]
  return every


def _load(model_paths: dict[str, pathlib.Path], data_paths: dict[str, dict[str, pathlib.Path]],
          nets: dict[str, model.Params]) -> dict[str, dict[str, data.Dataset]]:
  """Each net's four files, each distinct file read once."""
  read: dict[pathlib.Path, data.Dataset] = {}
  data_of = {}
  for name in model_paths:
    classes = min(model.num_classes_of(nets[other]) for other in model_paths
                  if data_paths[other] == data_paths[name])
    data_of[name] = {}
    for key, path in data_paths[name].items():
      if path not in read:
        read[path] = data.load_csaw_h5(path, classes)
      data_of[name][key] = read[path]
  return data_of


def run(config: ml_collections.ConfigDict, out: pathlib.Path) -> list[dict]:
  """Runs the grid (this process's cells); writes ablation.csv, curves.csv, ablation.md, plots
  (and with config.board the leaderboard's files)."""
  model_paths, data_paths, shipped = inputs.resolve_models(config)
  nets = {name: keras_io.read_params(path) for name, path in model_paths.items()}
  data_of = _load(model_paths, data_paths, nets)
  kinds = {name: shipped_lib.kind_of(name) if shipped else 'given' for name in nets}
  logging.info('Loaded %s; %d distinct data files.', ', '.join(nets),
               len({id(split) for files in data_of.values() for split in files.values()}))

  rows = [r for r in tables.read_csv(out / 'ablation.csv') if set(r) >= set(ROW_FIELDS)]
  curves = tables.read_csv(out / 'curves.csv')
  done = {_key(row) for row in rows}
  if done:
    print(f'Resuming: {len(done)} grid points already in {out / "ablation.csv"}.', flush=True)
  leader, processes = distributed.is_leader(), jax.process_count()

  def record(row: dict) -> None:
    rows.append(row)
    done.add(_key(row))
    if processes == 1:  # written at once, atomically: an interrupted run keeps every point
      tables.write_csv(out / 'ablation.csv', ROW_FIELDS, rows)

  every = cells(config, list(nets))
  mine = every[jax.process_index()::processes]
  epochs_axis = sorted(set(config_lib.values(config.finetune_epochs)))
  tune = tuning(config)  # each fine-tuning sets its own epochs
  grid = _Grid(config, data_of, kinds, _variants(config), pruning.thresholds(config),
               epochs_axis, tune, done, record)
  progress = board.Progress(len(mine))
  progress.plan(cell.defence for cell in mine)
  for cell in mine:
    name, params, layer = cell.model, nets[cell.model], cell.layer
    start = grid.cell_started = time.perf_counter()
    if cell.defence != CHANNEL_GRID:
      ran = _defence_cell(grid, parse_entry(cell.defence), name, params)
    else:
      ran = _channel_cell(grid, name, params, layer)
      if ran is not None:
        curves = [c for c in curves if (c['model'], c['layer']) != (name, layer)] + ran
        if processes == 1:
          tables.write_csv(out / 'curves.csv', CURVE_FIELDS, curves)
    progress.step(cell.defence, f'{name} / {layer or cell.defence}',
                  time.perf_counter() - start if ran is not None else None)
  logging.info('Grid done in %.1f s (%d of %d cells on this process).', progress.elapsed(),
               len(mine), len(every))
  if processes > 1:  # every process's rows and curves, merged by key, curves in cell order
    rows = list({_key(r): r for part in distributed.gather_objects(rows) for r in part}.values())
    curves = list({tuple(c[f] for f in CURVE_FIELDS[:5]): c
                   for part in distributed.gather_objects(curves) for c in part}.values())
    position = {(c.model, c.layer): i for i, c in enumerate(every)}
    curves.sort(key=lambda c: position.get((c['model'], c['layer']), -1))
    if not leader:
      return rows
    tables.write_csv(out / 'curves.csv', CURVE_FIELDS, curves)
  order = {entry.text: i for i, entry in enumerate(entries(config))}
  rows.sort(key=lambda r: (order.get(r['defence'], len(order)), r['defence'], r['model'],
                           r['layer'], r['order'], r['seed'], tables.number_first(r['x']),
                           tables.number_first(r['finetune_epochs'])))
  tables.write_csv(out / 'ablation.csv', ROW_FIELDS, rows)
  markdown = _markdown(rows, shipped)
  workdir.write_text(out / 'ablation.md', markdown)
  results = {'models': {name: str(path.resolve()) for name, path in model_paths.items()},
             'kinds': kinds, 'synthetic_benchmark': shipped,
             'data': {name: inputs.recorded(paths) for name, paths in data_paths.items()},
             'points': len(rows), 'table': 'ablation.csv'}
  if not config.board:  # (a board's nets are too many for a panel each: leaderboard.png)
    report.plot_ablation_tradeoff(out / 'plots' / 'tradeoff.png', rows)
  report.plot_ablation_curves(out / 'plots' / 'curves.png', curves)
  if config.board:
    results['leaderboard'] = board.write(out, rows, [e.text for e in entries(config)], kinds)
    print(board.markdown_of(out), flush=True)
  else:
    print(markdown, flush=True)
  workdir.write_json(out / 'results.json', results)
  return rows


def _channel_cell(grid: _Grid, name: str, params: model.Params, layer: str
                  ) -> list[dict] | None:
  """One (model, layer) of the channel grid: its curves, or None where every point was done."""
  wanted = [(CHANNEL_GRID, name, layer, v.order, v.seed_text, pruning.label(x), str(e))
            for v in grid.variants for x in grid.thresholds for e in grid.epochs_axis]
  if all(key in grid.done for key in wanted):
    logging.info('%s / %s: every point already done.', name, layer)
    return None
  print(f'{name} / {layer}: {len(grid.variants)} orders x {len(grid.thresholds)} X x '
        f'{len(grid.epochs_axis)} fine-tuning settings...', flush=True)
  return _model_layer(grid, name, params, layer)


def _model_layer(grid: _Grid, name: str, params: model.Params, layer: str) -> list[dict]:
  """Every point of one (model, layer) not yet done, each passed to ``grid.record``; its curves."""
  batch, precision, labels = grid.config.batch_size, grid.config.precision, grid.labels(name)
  variants, thresholds, splits = grid.variants, grid.thresholds, grid.splits(name)
  # The layers before the pruned one: once per data file.
  start = time.perf_counter()
  features = {key: sweep.features(params, split.images, batch, precision, layer)
              for key, split in splits.items()}
  logging.info('%s / %s: features of %d images in %.1f s.', name, layer,
               sum(len(split) for split in splits.values()), time.perf_counter() - start)
  means = features['clean_valid'].mean_activations()
  orders = [pruning.pruning_order(means, v.order, v.seed or 0) for v in variants]
  stacked = np.stack([masks.prefix_masks(order) for order in orders])  # [V, C + 1, C]
  channels = stacked.shape[-1]
  # Every level of every order and seed in one vmapped pass over each validation file.
  swept = {key: sweep.stacked_classes(params, features[key], stacked.reshape(-1, channels),
                                      batch, precision).reshape(-1, *stacked.shape[:2])
           for key in ('clean_valid', 'poisoned_valid')}
  curves_of = [tuple(pruning.level_accuracy(swept[key][:, index], labels[key])
                     for key in ('clean_valid', 'poisoned_valid'))
               for index in range(len(variants))]
  levels = [[pruning.select_level(clean_acc, x, grid.config.relative) for x in thresholds]
            for clean_acc, _ in curves_of]
  # The test files at level 0 and the levels chosen: V x (1 + thresholds) masks, a
  # shape fixed by the grid (unreached levels pad with level 0).
  test_levels = np.array([[0] + [level or 0 for level in row] for row in levels])
  test_masks = stacked[np.arange(len(variants))[:, None], test_levels]
  test = {key: sweep.stacked_classes(params, features[key], test_masks.reshape(-1, channels),
                                     batch, precision).reshape(-1, *test_levels.shape)
          for key in ('clean_test', 'poisoned_test')}
  b_test = {key: test[key][:, 0, 0] for key in test}
  logging.info('%s / %s: %d orders x %d levels swept, and the test split scored, in %.1f s.',
               name, layer, len(variants), stacked.shape[1], time.perf_counter() - start)
  points = [(('pruning', name, layer, variant.order, variant.seed_text, pruning.label(x),
              str(epochs)), index, column, epochs)
            for index, variant in enumerate(variants) for column, x in enumerate(thresholds)
            for epochs in grid.epochs_axis]
  mask_of = lambda index, column: stacked[index, levels[index][column]]
  text_of = lambda key: f'{name}/{layer}/{key[3]}{key[4]} X={key[5]}'
  # X values (or orders) that land on the same mask share one fine-tuning.
  tuned = {}  # (mask bytes, epochs) -> figures
  if train.stacks(grid.tune.stacking):  # every pending fine-tuning of an epochs at once
    pending = {}  # epochs -> {memo: (mask, name)}, what the loop below would fine-tune
    for key, index, column, epochs in points:
      if key not in grid.done and levels[index][column] is not None and epochs:
        mask = mask_of(index, column)
        pending.setdefault(epochs, {}).setdefault((mask.tobytes(), epochs), (mask, text_of(key)))
    for epochs, group in pending.items():
      tuned.update(zip(group, _fine_pruned(grid, name, params, layer, epochs, b_test,
                                           *zip(*group.values()))))
  curves = [{'model': name, 'layer': layer, 'order': variant.order, 'seed': variant.seed_text,
             **row}
            for variant, order, (clean_acc, asr) in zip(variants, orders, curves_of)
            for row in report.sweep_rows(order, clean_acc, asr)]
  for key, index, column, epochs in points:
    level = levels[index][column]
    if key in grid.done:
      continue
    row = dict(zip(KEY_FIELDS, key))
    if level is None:
      grid.add(row)
      continue
    row.update(channels_pruned=level,
               pruned_channels=' '.join(str(int(c)) for c in orders[index][:level]))
    if epochs == 0:
      net = {split: test[split][:, index, 1 + column] for split in test}
      figures = _row_figures(*goodnet.figures(b_test, net, labels, model.num_classes_of(params)),
                             _b_figures(b_test, labels))
    else:
      memo = (mask_of(index, column).tobytes(), epochs)
      if memo not in tuned:
        tuned[memo], = _fine_pruned(grid, name, params, layer, epochs, b_test,
                                    [mask_of(index, column)], [text_of(key)])
      figures = tuned[memo]
    grid.add({**row, **figures})
  return curves


def layers_text(layers: tuple[str, ...]) -> str:
  """A learned-mask row's layer: 'conv_1-conv_4' or 'conv_1-fc_2' for a run of layers from
  conv_1, else 'conv_3+fc_1'..."""
  layers = tuple(layers)
  runs = layers == model.NEURON_LAYERS[:len(layers)] and len(layers) > 1
  return f'{layers[0]}-{layers[-1]}' if runs else '+'.join(layers)


def _settings_layer(settings: Any) -> str:
  """A defence row's layer: the masked layers ('conv_1-conv_4'), the pruned one, or ''."""
  if getattr(settings, 'layers', None):
    return layers_text(config_lib.values(settings.layers))
  return getattr(settings, 'layer', '') or ''


def _defence_cell(grid: _Grid, entry: Entry, name: str, params: model.Params) -> bool | None:
  """One defence entry on one net, through the one path: defend on the clean validation split,
  then score on the test files. Its rows: the recommended net (or each net offered, where the
  defence recommends none; B itself where it offers none), and its detector's. None: done before.
  """
  if any(key[:2] == (entry.text, name) for key in grid.done):
    logging.info('%s / %s: already done.', name, entry.text)
    return None
  config = grid.config
  defence, settings = defences.get(entry.name), settings_of(config, entry)
  print(f'{name} / {entry.text}: defending on clean data...', flush=True)
  # The defence sees the clean validation split only, as in its own job.
  clean = grid.splits(name)['clean_valid']
  outcome = defence.defend(params, base.Clean(clean.labels, clean.images, config.batch_size,
                                              config.precision), settings)
  scorer = grid.scorer(params, name)
  b_test = {key: scorer.b_classes(key) for key in defend.TEST_FILES}
  b = _b_figures(b_test, scorer.labels)
  finetune = getattr(getattr(settings, 'finetune', None), 'epochs', '')
  common = {'defence': entry.text, 'model': name, 'layer': _settings_layer(settings),
            'order': '', 'seed': '', 'finetune_epochs': str(finetune),
            **_flagged(outcome.figures, scorer.labels['poisoned_test'])}
  if outcome.detector is not None:  # an input detector: its rates, not a net's
    flags = {key: scorer.gather(key, np.asarray(outcome.detector(scorer.splits[key].images)))
             for key in defend.TEST_FILES}
    grid.add({**common, 'x': 'detector', 'b_clean_acc': _percent(b['clean_acc']),
              'b_asr': _percent(b['asr']),
              'frr': _percent(evaluate.percent(flags['clean_test'])),
              'far': _percent(evaluate.percent(~flags['poisoned_test']))})
    return True
  offered = ([outcome.recommended] if outcome.recommended is not None
             else list(outcome.candidates))
  for candidate_name in offered or ['']:  # '': nothing offered, B stands
    candidate = outcome.candidates.get(candidate_name)
    net_params = params if candidate is None else candidate.params
    net, good = scorer.figures(scorer.classes(net_params))
    pruned = {} if candidate is None else candidate.pruned
    grid.add({**common, 'x': candidate_name,
              'channels_pruned': str(sum(len(v) for v in pruned.values())),
              'pruned_channels': ' '.join(f'{layer}:{int(i)}' for layer, found in pruned.items()
                                          for i in found),
              **_row_figures(net, good, b)})
  logging.info('%s / %s (%s): %s.', name, entry.text, outcome.figures.get('method', entry.name),
               ', '.join(offered) or 'nothing offered')
  return True


def _flagged(figures: dict, poisoned_labels: np.ndarray) -> dict:
  """A detector of labels (Neural Cleanse): the labels it flagged and whether the attacker's target
  (the poisoned files' label) is among them."""
  if 'flagged' not in figures:
    return {}
  flagged = [int(label) for label in figures['flagged']]
  targets = set(np.unique(poisoned_labels).tolist())
  return {'labels_flagged': ' '.join(map(str, flagged)) or 'none',
          'target_flagged': str(int(bool(targets & set(flagged))))}


def _fine_pruned(grid: _Grid, name: str, params: model.Params, layer: str, epochs: int,
                 b_test: dict[str, np.ndarray], level_masks, names) -> list[dict]:
  """Each mask's net fine-pruned for ``epochs`` (stacked where the tuning stacks): row figures."""
  clean = grid.splits(name)['clean_valid']
  tuned = fine_pruning.fine_prune_many(params, list(level_masks), clean.images, clean.labels,
                                       grid.tune.recipe(epochs), grid.rows(name), list(names),
                                       layer, grid.tune.stacking)
  scorer, labels = grid.scorer(params, name), grid.labels(name)
  return [_row_figures(*goodnet.figures(b_test, scorer.classes(net), labels,
                                        scorer.num_classes), _b_figures(b_test, labels))
          for net, _ in tuned]


# ablation.md's columns: (heading, row field); figures shown to 2 decimals.
_COLUMNS = (('defence', 'defence'), ('model', 'model'), ('layer', 'layer'), ('order', 'order'),
            ('seed', 'seed'), ('X', 'x'), ('fine-tune epochs', 'finetune_epochs'),
            ('channels pruned', 'channels_pruned'), ('clean', 'clean_acc'), ('ASR', 'asr'),
            ('DER', 'der'), ('G clean', 'goodnet_clean_acc'), ('G ASR', 'goodnet_asr'),
            ('detection', 'detection_rate'), ('false alarm', 'false_alarm_rate'),
            ('labels flagged', 'labels_flagged'), ('FRR', 'frr'), ('FAR', 'far'),
            ('seconds', 'seconds'))
_FIGURES = frozenset(('clean_acc', 'asr', 'der', 'goodnet_clean_acc', 'goodnet_asr',
                      'detection_rate', 'false_alarm_rate', 'frr', 'far'))


def _markdown(rows: list[dict], shipped: bool) -> str:
  # Columns no row fills (a grid without detectors) are left out.
  columns = [(heading, field) for heading, field in _COLUMNS
             if field in KEY_FIELDS or any(row[field] for row in rows)]
  cells = []
  for row in rows:
    line = []
    for _, field in columns:
      value = row[field]
      if field == 'channels_pruned' and value == '' and row['x'] != 'detector' and (
          row['defence'] == CHANNEL_GRID):
        value = 'not reached'  # no level of this order drops clean accuracy X points
      line.append(f'{float(value):.2f}' if value and field in _FIGURES else value or '—')
    cells.append(line)
  lines = ['# Ablation', '',
           'Shipped synthetic benchmark.' if shipped else '', '',
           'Test split, percent. G = GoodNet (B with the pruned or fine-pruned net). '
           'X: the clean-accuracy budget (pruning\'s X; ANP\'s and RNP\'s mask threshold, '
           'or their max_clean_drop where the depth is chosen on held-out clean data), or the '
           'net a defence chose; channels pruned: neurons for ANP and RNP. DER: BackdoorBench\'s '
           'defence effectiveness rating against B. FRR/FAR: an input detector\'s clean inputs '
           'flagged / poisoned inputs passed. seconds: the time the row\'s cell had taken.', '',
           *tables.markdown([heading for heading, _ in columns], cells,
                            ''.join('r' if field in _FIGURES or field == 'seconds' else 'l'
                                    for _, field in columns))]
  return '\n'.join(lines) + '\n'
