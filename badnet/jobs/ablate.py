"""Ablations: a grid of defences, one vmapped sweep per (model, layer), ANP and RNP per model.

The grid is a list of cells: each (model, layer) of the channel grid (every
order, seed, X and fine-tuning budget of it in one vmapped sweep), and each
(model, defence) of the other defences, run through the defence's own
``defend`` (``defences.get``) and scored by the one path's ``Scorer``. On
several processes (``--num_processes``, as for the prune job) each process
takes every P-th cell; the rows are gathered and process 0 writes them.
"""

import dataclasses
import pathlib
import time
from collections.abc import Callable

from absl import logging
import ml_collections
import jax
import numpy as np

from badnet import config as config_lib
from badnet import defences, defend, inputs
from badnet.core import distributed, masks, model, train
from badnet.defences import base, goodnet, sweep
from badnet.io import data, keras_io, report, tables, workdir

# The channel grid is the pruning and fine-pruning defences' (reached, as every
# defence is, through the registry).
pruning, fine_pruning = defences.get('pruning'), defences.get('fine_pruning')
ROW_FIELDS = ('defence', 'model', 'layer', 'order', 'seed', 'x', 'finetune_epochs',
              'channels_pruned', 'pruned_channels', 'clean_acc', 'asr', 'goodnet_clean_acc',
              'goodnet_asr', 'detection_rate', 'false_alarm_rate')
CURVE_FIELDS = ('model', 'layer', 'order', 'seed', *report.SWEEP_FIELDS)
KEY_FIELDS = ROW_FIELDS[:7]  # what identifies a grid point
# The grid's defences: 'pruning' is the channel grid (fine-pruning where
# finetune_epochs > 0); the others are learned-mask plug-ins, one row per model,
# with the settings of their blocks (config.anp, config.rnp).
LEARNED = ('anp', 'rnp')
DEFENCES = ('pruning', *LEARNED)


FIELDS = {
    **config_lib.BATCH_SIZE,
    'defences': config_lib.Each(config_lib.Choice(DEFENCES, 'defence')),
    'models': config_lib.Each(config_lib.Text()),  # .h5 files or shipped nets' names
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


def check(config: ml_collections.ConfigDict) -> None:
  """The fine-tuning and the blocks of the learned-mask defences the grid runs."""
  tuning(config)
  for name in dict.fromkeys(config_lib.values(config.defences)):
    if name in LEARNED:
      defend.settings_of(config, name)


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


def _row_figures(net: dict, good: dict) -> dict:
  """A row's figures from a net's and its GoodNet's."""
  return {**net, 'goodnet_clean_acc': good['clean_acc'], 'goodnet_asr': good['asr'],
          'detection_rate': good['detection_rate'], 'false_alarm_rate': good['false_alarm_rate']}


@dataclasses.dataclass
class _Grid:
  """What every cell of one run shares: the data, the grid's axes, the points already done."""
  config: ml_collections.ConfigDict
  splits: dict[str, data.Dataset]
  variants: list[Variant]
  thresholds: list[float]
  epochs_axis: list[int]
  tune: base.Tuning
  done: set
  record: Callable[[dict], None]
  # The clean validation rows to fine-tune on and to hold out: one split per run.
  rows: tuple[np.ndarray, np.ndarray] | None

  @property
  def labels(self) -> dict[str, np.ndarray]:
    return {key: split.labels for key, split in self.splits.items()}

  def scorer(self, params: model.Params) -> defend.Scorer:  # the one path's, on this run's files
    return defend.Scorer(params, model.num_classes_of(params), self.labels, self.splits, {},
                         self.config.batch_size, self.config.precision, lambda key, rows: rows)


@dataclasses.dataclass(frozen=True)
class Cell:
  """A unit of the grid that one process runs: a (model, layer) of the channel grid, or a
  (model, defence) of the learned-mask defences (layer empty)."""
  model: str
  defence: str
  layer: str = ''


def cells(config: ml_collections.ConfigDict, models: list[str]) -> list[Cell]:
  """Every cell of the grid, in the order a single process runs them."""
  defences_ = tuple(dict.fromkeys(config_lib.values(config.defences)))
  layers = dict.fromkeys(config_lib.values(config.layers)) if 'pruning' in defences_ else ()
  return [cell for name in models
          for cell in [*(Cell(name, 'pruning', layer) for layer in layers),
                       *(Cell(name, d) for d in defences_ if d in LEARNED)]]


def run(config: ml_collections.ConfigDict, out: pathlib.Path) -> list[dict]:
  """Runs the grid (this process's cells); writes ablation.csv, curves.csv, ablation.md, plots."""
  model_paths, data_paths, shipped = inputs.resolve_models(config)
  nets = {name: keras_io.read_params(path) for name, path in model_paths.items()}
  class_counts = {model.num_classes_of(params) for params in nets.values()}
  splits = {key: data.load_csaw_h5(path, min(class_counts)) for key, path in data_paths.items()}
  logging.info('Loaded %s; %s.', ', '.join(nets),
               ', '.join(f'{k}: {len(v)} images' for k, v in splits.items()))

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
  fine_tunes = any(epochs_axis) and any(cell.defence == 'pruning' for cell in mine)
  grid = _Grid(config, splits, _variants(config), pruning.thresholds(config), epochs_axis, tune,
               done, record, base.split_for_fine_tuning(
                   splits['clean_valid'].labels, config.holdout_fraction, tune.seed)
               if fine_tunes else None)
  start = time.perf_counter()
  for cell in mine:
    name, params, layer = cell.model, nets[cell.model], cell.layer
    if cell.defence in LEARNED:
      _learned_row(grid, cell.defence, name, params)
      continue
    wanted = [('pruning', name, layer, v.order, v.seed_text, pruning.label(x), str(e))
              for v in grid.variants for x in grid.thresholds for e in epochs_axis]
    if all(key in done for key in wanted):
      logging.info('%s / %s: every point already done.', name, layer)
      continue
    print(f'{name} / {layer}: {len(grid.variants)} orders x {len(grid.thresholds)} X x '
          f'{len(epochs_axis)} fine-tuning settings...', flush=True)
    new_curves = _model_layer(grid, name, params, layer)
    curves = [c for c in curves if (c['model'], c['layer']) != (name, layer)] + new_curves
    if processes == 1:
      tables.write_csv(out / 'curves.csv', CURVE_FIELDS, curves)
  logging.info('Grid done in %.1f s (%d of %d cells on this process).',
               time.perf_counter() - start, len(mine), len(every))
  if processes > 1:  # every process's rows and curves, merged by key, curves in cell order
    rows = list({_key(r): r for part in distributed.gather_objects(rows) for r in part}.values())
    curves = list({tuple(c[f] for f in CURVE_FIELDS[:5]): c
                   for part in distributed.gather_objects(curves) for c in part}.values())
    position = {(c.model, c.layer): i for i, c in enumerate(every)}
    curves.sort(key=lambda c: position.get((c['model'], c['layer']), -1))
    if not leader:
      return rows
    tables.write_csv(out / 'curves.csv', CURVE_FIELDS, curves)
  rows.sort(key=lambda r: (r['defence'], r['model'], r['layer'], r['order'], r['seed'],
                           tables.number_first(r['x']), int(r['finetune_epochs'])))
  tables.write_csv(out / 'ablation.csv', ROW_FIELDS, rows)
  markdown = _markdown(rows, shipped)
  workdir.write_text(out / 'ablation.md', markdown)
  workdir.write_json(out / 'results.json', {
      'models': {name: str(path.resolve()) for name, path in model_paths.items()},
      'synthetic_benchmark': shipped, 'data': inputs.recorded(data_paths),
      'points': len(rows), 'table': 'ablation.csv'})
  report.plot_ablation_tradeoff(out / 'plots' / 'tradeoff.png', rows)
  report.plot_ablation_curves(out / 'plots' / 'curves.png', curves)
  print(markdown, flush=True)
  return rows


def _model_layer(grid: _Grid, name: str, params: model.Params, layer: str) -> list[dict]:
  """Every point of one (model, layer) not yet done, each passed to ``grid.record``; its curves."""
  batch, precision, labels = grid.config.batch_size, grid.config.precision, grid.labels
  variants, thresholds = grid.variants, grid.thresholds
  # The layers before the pruned one: once per data file.
  start = time.perf_counter()
  features = {key: sweep.features(params, split.images, batch, precision, layer)
              for key, split in grid.splits.items()}
  logging.info('%s / %s: features of %d images in %.1f s.', name, layer,
               sum(len(split) for split in grid.splits.values()), time.perf_counter() - start)
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
      tuned.update(zip(group, _fine_pruned(grid, params, layer, epochs, b_test,
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
      grid.record({**row, **{field: '' for field in ROW_FIELDS[len(KEY_FIELDS):]}})
      continue
    row.update(channels_pruned=level,
               pruned_channels=' '.join(str(int(c)) for c in orders[index][:level]))
    if epochs == 0:
      net = {split: test[split][:, index, 1 + column] for split in test}
      figures = _row_figures(*goodnet.figures(b_test, net, labels, model.num_classes_of(params)))
    else:
      memo = (mask_of(index, column).tobytes(), epochs)
      if memo not in tuned:
        tuned[memo], = _fine_pruned(grid, params, layer, epochs, b_test,
                                    [mask_of(index, column)], [text_of(key)])
      figures = tuned[memo]
    grid.record({**row, **{k: _percent(v) for k, v in figures.items()}})
  return curves


def layers_text(layers: tuple[str, ...]) -> str:
  """A learned-mask row's layer: 'conv_1-conv_4' or 'conv_1-fc_2' for a run of layers from
  conv_1, else 'conv_3+fc_1'..."""
  layers = tuple(layers)
  runs = layers == model.NEURON_LAYERS[:len(layers)] and len(layers) > 1
  return f'{layers[0]}-{layers[-1]}' if runs else '+'.join(layers)


def _learned_row(grid: _Grid, defence_name: str, name: str, params: model.Params) -> None:
  """The row of a learned-mask defence on one model: its chosen net on the test split."""
  config = grid.config
  defence, settings = defences.get(defence_name), defend.settings_of(config, defence_name)
  layers = config_lib.values(settings.layers)
  budget = (f'mask<={settings.threshold:g}' if settings.selection == 'threshold' else
            pruning.label(settings.max_clean_drop))
  key = (defence.NAME, name, layers_text(layers), '', '', budget,
         str(settings.finetune.epochs))
  if key in grid.done:
    logging.info('%s / %s: already done.', name, defence.NAME)
    return
  print(f'{name} / {defence.NAME}: masks on clean data...', flush=True)
  start = time.perf_counter()
  # The defence sees the clean validation split only, as in its own job.
  clean = grid.splits['clean_valid']
  outcome = defence.defend(params, base.Clean(clean.labels, clean.images, config.batch_size,
                                              config.precision), settings)
  chosen = outcome.candidates[outcome.recommended]
  scorer = grid.scorer(params)
  net, good = scorer.figures(scorer.classes(chosen.params))
  logging.info('%s / %s (%s): %s chosen in %.1f s.', name, defence.NAME,
               outcome.figures['method'], outcome.recommended, time.perf_counter() - start)
  grid.record({**dict(zip(KEY_FIELDS, key)),
               'channels_pruned': str(chosen.figures['neurons_pruned']),
               'pruned_channels': ' '.join(f'{layer}:{int(i)}' for layer in layers
                                           for i in chosen.pruned.get(layer, ())),
               **{k: _percent(v) for k, v in _row_figures(net, good).items()}})


def _fine_pruned(grid: _Grid, params: model.Params, layer: str, epochs: int,
                 b_test: dict[str, np.ndarray], level_masks, names) -> list[dict]:
  """Each mask's net fine-pruned for ``epochs`` (stacked where the tuning stacks): row figures."""
  clean = grid.splits['clean_valid']
  tuned = fine_pruning.fine_prune_many(params, list(level_masks), clean.images, clean.labels,
                                       grid.tune.recipe(epochs), grid.rows, list(names), layer,
                                       grid.tune.stacking)
  scorer = grid.scorer(params)
  return [_row_figures(*goodnet.figures(b_test, scorer.classes(net), grid.labels,
                                        scorer.num_classes)) for net, _ in tuned]


def _markdown(rows: list[dict], shipped: bool) -> str:
  cells = []
  for row in rows:
    line = [row[f] or '—' for f in ROW_FIELDS if f != 'pruned_channels']
    if row['channels_pruned'] == '':  # no level of this order drops clean accuracy X points
      line[7] = 'not reached'
    cells.append([f'{float(c):.2f}' if i >= 8 and c != '—' else c for i, c in enumerate(line)])
  lines = ['# Ablation', '',
           'Shipped synthetic benchmark.' if shipped else '', '',
           'Test split, percent. G = GoodNet (B with the pruned or fine-pruned net). '
           'X: the clean-accuracy budget (pruning\'s X; ANP\'s and RNP\'s mask threshold, '
           'or their max_clean_drop where the depth is chosen on held-out clean data); channels '
           'pruned: neurons for ANP and RNP.', '',
           *tables.markdown(['defence', 'model', 'layer', 'order', 'seed', 'X',
                             'fine-tune epochs', 'channels pruned', 'clean', 'ASR', 'G clean',
                             'G ASR', 'detection', 'false alarm'], cells, 'llll' + 'r' * 10)]
  return '\n'.join(lines) + '\n'
