"""Ablations: a grid of pruning defences, one vmapped sweep per (model, layer)."""

import csv
import dataclasses
import io
import pathlib
import time

from absl import logging
import jax
import ml_collections
import numpy as np

from badnet import data, evaluate, fineprune, goodnet, keras_io, model, prune, report, sweep
from badnet import workdir as workdir_lib
from badnet.errors import ConfigError
from badnet.jobs import common
from badnet.jobs import fine_prune as fine_prune_job
from badnet.jobs import prune as prune_job

ROW_FIELDS = ('model', 'layer', 'order', 'seed', 'x', 'finetune_epochs', 'channels_pruned',
              'pruned_channels', 'clean_acc', 'asr', 'goodnet_clean_acc', 'goodnet_asr',
              'detection_rate', 'false_alarm_rate')
CURVE_FIELDS = ('model', 'layer', 'order', 'seed', 'step', 'channel', 'fraction_pruned',
                'clean_acc', 'asr')
KEY_FIELDS = ROW_FIELDS[:6]  # what identifies a grid point


@dataclasses.dataclass(frozen=True)
class Variant:
  """One pruning order: 'increasing' and 'decreasing' have no seed, 'random' one per seed."""
  order: str
  seed: int | None

  @property
  def seed_text(self) -> str:
    return '' if self.seed is None else str(self.seed)


def _axis(config: ml_collections.ConfigDict, name: str) -> tuple:
  values = config[name]
  values = tuple(values) if isinstance(values, (tuple, list)) else (values,)
  if not values:
    raise ConfigError(f'config.{name} is empty; give at least one value')
  return values


def check_config(config: ml_collections.ConfigDict) -> None:
  """Rejects a bad grid before any work: empty axes, unknown names, X or epochs out of range."""
  common.check_batch_size(config)
  for name in ('models', 'layers', 'orders', 'seeds', 'thresholds', 'finetune_epochs'):
    _axis(config, name)
  for layer in _axis(config, 'layers'):
    if layer not in model.PRUNABLE_LAYERS:
      raise ConfigError(f'config.layers: unknown layer {layer!r}; expected some of '
                        f'{", ".join(model.PRUNABLE_LAYERS)}')
  for order in _axis(config, 'orders'):
    if order not in prune.ORDERS:
      raise ConfigError(f'config.orders: unknown order {order!r}; expected some of '
                        f'{", ".join(prune.ORDERS)}')
  for seed in _axis(config, 'seeds'):
    if isinstance(seed, bool) or not isinstance(seed, int):
      raise ConfigError(f'config.seeds: {seed!r} is not an integer')
  for x in _axis(config, 'thresholds'):
    common.check_threshold(x)
  for epochs in _axis(config, 'finetune_epochs'):
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
      raise ConfigError(f'config.finetune_epochs: {epochs!r} is not a whole number >= 0')
  common.check_precision(config)
  if jax.process_count() > 1:
    raise ConfigError('the ablate job runs on one process')
  _check_finetune(config)


def _check_finetune(config: ml_collections.ConfigDict) -> None:
  tuned = [epochs for epochs in _axis(config, 'finetune_epochs') if epochs > 0]
  fine_prune_job.check_recipe(config, min(tuned, default=0))


def _variants(config: ml_collections.ConfigDict) -> list[Variant]:
  variants = []
  for order in dict.fromkeys(_axis(config, 'orders')):
    seeds = dict.fromkeys(_axis(config, 'seeds')) if order == 'random' else (None,)
    variants += [Variant(order, seed) for seed in seeds]
  return variants


def _resolve(config: ml_collections.ConfigDict, out: pathlib.Path
             ) -> tuple[dict[str, pathlib.Path], dict[str, pathlib.Path], bool]:
  """Model name -> file, data key -> file, and whether it is the shipped benchmark's data."""
  models, shipped_only = {}, True
  for name in dict.fromkeys(_axis(config, 'models')):
    if name in common.synthetic.SHIPPED_NETS:
      models[name] = pathlib.Path(common.synthetic.SHIPPED_NETS[name])
    else:
      models[name], shipped_only = pathlib.Path(name), False
  overrides = {key: config.data[key] for key in common.CSAW_FILES}
  if not config.data.dir and not any(overrides.values()):
    if not shipped_only:
      raise ConfigError('config.data is empty but config.models names a file: give the data '
                        '(config.data.dir), or use only the shipped nets')
    print(f'Running on the shipped synthetic benchmark (nets: {", ".join(models)}; no data '
          f'given); its data is regenerated under {out / "data"}.', flush=True)
    _, data_dir = common.shipped_benchmark(out, quiet=True)
    return models, {k: data_dir / v for k, v in common.CSAW_FILES.items()}, True
  paths = {}
  for key, relative in common.CSAW_FILES.items():
    if overrides[key]:
      paths[key] = pathlib.Path(overrides[key])
    elif config.data.dir:
      paths[key] = pathlib.Path(config.data.dir) / relative
    else:
      raise ConfigError(f'no path for the {key.replace("_", " ")} file: set config.data.dir '
                        f'or config.data.{key}')
  return models, paths, False


def _read_rows(path: pathlib.Path) -> list[dict]:
  if not path.is_file():
    return []
  with path.open(newline='') as handle:
    return list(csv.DictReader(handle))


def _write_rows(path: pathlib.Path, fields: tuple[str, ...], rows: list[dict]) -> None:
  buffer = io.StringIO()
  writer = csv.DictWriter(buffer, fields, lineterminator='\n')
  writer.writeheader()
  writer.writerows(rows)
  workdir_lib.write_text(path, buffer.getvalue())


def _key(row: dict) -> tuple[str, ...]:
  return tuple(str(row[field]) for field in KEY_FIELDS)


def _percent(value: float | None) -> str:
  return '' if value is None else f'{value:.4f}'


def _metrics(clean: np.ndarray, poisoned: np.ndarray, b_clean: np.ndarray,
             b_poisoned: np.ndarray, labels: dict[str, np.ndarray], num_classes: int) -> dict:
  """The row's figures (test split) from the net's and B's classes."""
  g_clean = np.asarray(goodnet.combine(b_clean, clean, num_classes))
  g_poisoned = np.asarray(goodnet.combine(b_poisoned, poisoned, num_classes))
  good = goodnet.metrics(g_clean, labels['clean_test'], g_poisoned, labels['poisoned_test'],
                         num_classes)
  return {'clean_acc': evaluate.percent(clean == labels['clean_test']),
          'asr': evaluate.percent(poisoned == labels['poisoned_test']),
          'goodnet_clean_acc': good['clean_acc'], 'goodnet_asr': good['asr'],
          'detection_rate': good['detection_rate'],
          'false_alarm_rate': good['false_alarm_rate']}


def run(config: ml_collections.ConfigDict, workdir: str) -> list[dict]:
  """Runs the grid; writes ablation.csv, curves.csv, ablation.md and plots (resuming)."""
  check_config(config)
  out = workdir_lib.prepare(workdir)
  workdir_lib.write_config(out, config, 'ablate')
  model_paths, data_paths, shipped = _resolve(config, out)
  nets = {name: keras_io.read_params(path) for name, path in model_paths.items()}
  class_counts = {model.num_classes_of(params) for params in nets.values()}
  splits = {key: data.load_csaw_h5(path, min(class_counts)) for key, path in data_paths.items()}
  labels = {key: split.labels for key, split in splits.items()}
  logging.info('Loaded %s; %s.', ', '.join(nets),
               ', '.join(f'{k}: {len(v)} images' for k, v in splits.items()))

  rows = [r for r in _read_rows(out / 'ablation.csv') if set(r) >= set(ROW_FIELDS)]
  curves = _read_rows(out / 'curves.csv')
  done = {_key(row) for row in rows}
  if done:
    print(f'Resuming: {len(done)} grid points already in {out / "ablation.csv"}.', flush=True)
  variants = _variants(config)
  thresholds = sorted({float(x) for x in _axis(config, 'thresholds')})
  epochs_axis = sorted(set(_axis(config, 'finetune_epochs')))
  recipe = fine_prune_job.recipe(config, epochs=1)  # each fine-tuning sets its own epochs
  start = time.perf_counter()
  for name, params in nets.items():
    for layer in dict.fromkeys(_axis(config, 'layers')):
      wanted = [(name, layer, v.order, v.seed_text, prune_job.label(x), str(e))
                for v in variants for x in thresholds for e in epochs_axis]
      if all(key in done for key in wanted):
        logging.info('%s / %s: every point already done.', name, layer)
        continue
      print(f'{name} / {layer}: {len(variants)} orders x {len(thresholds)} X x '
            f'{len(epochs_axis)} fine-tuning settings...', flush=True)
      def record(row: dict) -> None:
        # Written at once, atomically: an interrupted run keeps every finished point.
        rows.append(row)
        done.add(_key(row))
        _write_rows(out / 'ablation.csv', ROW_FIELDS, rows)

      new_curves = _model_layer(name, params, layer, variants, thresholds, epochs_axis, splits,
                                labels, set(done), config, recipe, record)
      curves = [c for c in curves if (c['model'], c['layer']) != (name, layer)] + new_curves
      _write_rows(out / 'curves.csv', CURVE_FIELDS, curves)
  logging.info('Grid done in %.1f s.', time.perf_counter() - start)
  rows.sort(key=lambda r: (r['model'], r['layer'], r['order'], r['seed'], float(r['x']),
                           int(r['finetune_epochs'])))
  _write_rows(out / 'ablation.csv', ROW_FIELDS, rows)
  markdown = _markdown(rows, shipped)
  workdir_lib.write_text(out / 'ablation.md', markdown)
  _plot_tradeoff(out / 'plots' / 'tradeoff.png', rows)
  _plot_curves(out / 'plots' / 'curves.png', curves)
  print(markdown, flush=True)
  return rows


def _model_layer(name, params, layer, variants, thresholds, epochs_axis, splits, labels, done,
                 config, recipe, record) -> list[dict]:
  """Every point of one (model, layer) not yet done, each passed to ``record``; its curves."""
  batch, precision = config.batch_size, config.precision
  num_classes = model.num_classes_of(params)
  # The layers before the pruned one: once per data file.
  start = time.perf_counter()
  features = {key: sweep.features(params, split.images, batch, precision, layer)
              for key, split in splits.items()}
  logging.info('%s / %s: features of %d images in %.1f s.', name, layer,
               sum(len(split) for split in splits.values()), time.perf_counter() - start)
  means = features['clean_valid'].mean_activations()
  orders = [prune.pruning_order(means, v.order, v.seed or 0) for v in variants]
  masks = np.stack([prune.prefix_masks(order) for order in orders])  # [V, C + 1, C]
  channels = masks.shape[-1]
  # Every level of every order and seed in one vmapped pass over each validation file.
  swept = {key: sweep.stacked_classes(params, features[key], masks.reshape(-1, channels),
                                      batch, precision).reshape(-1, *masks.shape[:2])
           for key in ('clean_valid', 'poisoned_valid')}
  curves_of = [tuple(100 * (swept[key][:, index] == labels[key][:, None]).mean(0)
                     for key in ('clean_valid', 'poisoned_valid'))
               for index in range(len(variants))]
  levels = [[prune.select_level(clean_acc, x, config.relative) for x in thresholds]
            for clean_acc, _ in curves_of]
  # The test files at level 0 and the levels chosen: V x (1 + thresholds) masks, a
  # shape fixed by the grid (unreached levels pad with level 0).
  test_levels = np.array([[0] + [level or 0 for level in row] for row in levels])
  test_masks = masks[np.arange(len(variants))[:, None], test_levels]
  test = {key: sweep.stacked_classes(params, features[key], test_masks.reshape(-1, channels),
                                     batch, precision).reshape(-1, *test_levels.shape)
          for key in ('clean_test', 'poisoned_test')}
  b_test = {key: test[key][:, 0, 0] for key in test}
  logging.info('%s / %s: %d orders x %d levels swept, and the test split scored, in %.1f s.',
               name, layer, len(variants), masks.shape[1], time.perf_counter() - start)
  curves, tuned = [], {}
  for index, (variant, order) in enumerate(zip(variants, orders)):
    clean_acc, asr = curves_of[index]
    for step in range(channels + 1):
      curves.append({'model': name, 'layer': layer, 'order': variant.order,
                     'seed': variant.seed_text, 'step': step,
                     'channel': '' if step == 0 else int(order[step - 1]),
                     'fraction_pruned': f'{step / channels:.6f}',
                     'clean_acc': f'{clean_acc[step]:.4f}', 'asr': f'{asr[step]:.4f}'})
    for column, x in enumerate(thresholds):
      level = levels[index][column]
      for epochs in epochs_axis:
        key = (name, layer, variant.order, variant.seed_text, prune_job.label(x), str(epochs))
        if key in done:
          continue
        row = dict(zip(KEY_FIELDS, key))
        if level is None:
          record({**row, **{field: '' for field in ROW_FIELDS[len(KEY_FIELDS):]}})
          continue
        row.update(channels_pruned=level,
                   pruned_channels=' '.join(str(int(c)) for c in order[:level]))
        if epochs == 0:
          figures = _metrics(test['clean_test'][:, index, 1 + column],
                             test['poisoned_test'][:, index, 1 + column], b_test['clean_test'],
                             b_test['poisoned_test'], labels, num_classes)
        else:
          # X values (or orders) that land on the same mask share one fine-tuning.
          memo = (masks[index, level].tobytes(), epochs)
          if memo not in tuned:
            tuned[memo] = _fine_pruned(
                params, masks[index, level], layer, epochs, splits, b_test, labels,
                num_classes, config, recipe,
                f'{name}/{layer}/{variant.order}{variant.seed_text} X={x:g}')
          figures = tuned[memo]
        record({**row, **{k: _percent(v) for k, v in figures.items()}})
  return curves


def _fine_pruned(params, mask, layer, epochs, splits, b_test, labels, num_classes, config,
                 recipe, name) -> dict:
  clean = splits['clean_valid']
  tuned, _ = fineprune.fine_prune(params, mask, clean.images, clean.labels,
                                  dataclasses.replace(recipe, epochs=epochs),
                                  config.finetune.holdout_fraction, name=name, layer=layer)
  classes = {key: evaluate.predict(tuned, splits[key].images, config.batch_size,
                                   precision=config.precision)
             for key in ('clean_test', 'poisoned_test')}
  return _metrics(classes['clean_test'], classes['poisoned_test'], b_test['clean_test'],
                  b_test['poisoned_test'], labels, num_classes)


def _markdown(rows: list[dict], shipped: bool) -> str:
  lines = ['# Ablation', '',
           'Shipped synthetic benchmark.' if shipped else '', '',
           'Test split, percent. G = GoodNet (B with the pruned or fine-pruned net).', '',
           '| model | layer | order | seed | X | fine-tune epochs | channels pruned | '
           'clean | ASR | G clean | G ASR | detection | false alarm |',
           '|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|']
  for row in rows:
    cells = [row[f] or '—' for f in ROW_FIELDS if f != 'pruned_channels']
    cells = [f'{float(c):.2f}' if i >= 7 and c != '—' else c for i, c in enumerate(cells)]
    lines.append('| ' + ' | '.join(str(c) for c in cells) + ' |')
  return '\n'.join(lines) + '\n'


def _plot_tradeoff(path: pathlib.Path, rows: list[dict]) -> None:
  figure, axes = report.plt.subplots(figsize=(7, 5))
  groups = {}
  for row in rows:
    if row['clean_acc']:
      label = f'{row["model"]} {row["layer"]} {row["order"]}'
      label += ' fine-pruned' if row['finetune_epochs'] != '0' else ''
      groups.setdefault(label, []).append((float(row['clean_acc']), float(row['asr'])))
  markers = 'os^vD<>pXh*'
  for index, (label, points) in enumerate(sorted(groups.items())):
    clean, asr = zip(*points)
    axes.scatter(clean, asr, marker=markers[index % len(markers)], label=label, alpha=0.8)
  axes.set_xlabel('clean accuracy % (test)')
  axes.set_ylabel('attack success rate % (test)')
  axes.set_title('Pruning defences: backdoor left against accuracy kept')
  axes.legend(fontsize=6, loc='best')
  report._save(figure, path)  # pylint: disable=protected-access


def _plot_curves(path: pathlib.Path, curves: list[dict]) -> None:
  figure, (top, bottom) = report.plt.subplots(2, 1, figsize=(7, 7), sharex=True)
  series = {}
  for row in curves:
    key = (row['model'], row['layer'], row['order'], row['seed'])
    series.setdefault(key, []).append(
        (float(row['fraction_pruned']), float(row['clean_acc']), float(row['asr'])))
  for key, points in sorted(series.items()):
    fraction, clean, asr = zip(*points)
    label = ' '.join(part for part in key if part)
    top.plot(fraction, clean, label=label, linewidth=1)
    bottom.plot(fraction, asr, linewidth=1)
  top.set_ylabel('clean accuracy % (valid)')
  bottom.set_ylabel('ASR % (valid)')
  bottom.set_xlabel('fraction of the layer\'s channels pruned')
  top.legend(fontsize=5, loc='lower left')
  report._save(figure, path)  # pylint: disable=protected-access
