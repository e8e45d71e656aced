"""Reports of the pruning defences: sweep.csv, results.json, results.md and plots."""

import itertools
import pathlib

import matplotlib

matplotlib.use('Agg')  # files only; no display is needed or assumed
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np

from badnet.io import tables
from badnet.io.tables import fmt
from badnet.io import workdir as workdir_lib

SWEEP_FIELDS = ('step', 'channel', 'fraction_pruned', 'clean_acc', 'asr')
_NET = ('clean_acc', 'asr')  # a net's figures in results.json
_GOODNET = (*_NET, 'detection_rate', 'false_alarm_rate')  # a GoodNet's


def write_sweep_csv(path: pathlib.Path, order: np.ndarray, clean_acc: np.ndarray,
                    asr: np.ndarray) -> None:
  """One row per level 0..C: step, channel pruned at that step, fraction, accuracies (%)."""
  tables.write_csv(path, SWEEP_FIELDS, sweep_rows(order, clean_acc, asr))


def sweep_rows(order: np.ndarray, clean_acc: np.ndarray, asr: np.ndarray) -> list[dict]:
  """sweep.csv's rows (levels 0..C), as the ablation's curves.csv also holds them."""
  num_channels = len(order)
  return [{'step': step, 'channel': '' if step == 0 else int(order[step - 1]),
           'fraction_pruned': f'{step / num_channels:.6f}', 'clean_acc': f'{clean_acc[step]:.4f}',
           'asr': f'{asr[step]:.4f}'} for step in range(num_channels + 1)]


def _cells(figures: dict, keys: tuple[str, ...] = _NET) -> list[str]:
  return [fmt(figures[key]) for key in keys]


def _head(title: str, results: dict, *notes: str) -> list[str]:
  """A report's title, model (and ``notes``) and B's figures on both splits."""
  synthetic = ' (shipped synthetic benchmark)' if results.get('synthetic_benchmark') else ''
  return [f'# {title}', '', f'Model: `{results["model"]}`{synthetic}', *notes, '',
          *tables.markdown(['net', 'split', 'clean acc %', 'ASR %'],
                           [['B', split, *_cells(results['base'][split])]
                            for split in ('valid', 'test')], 'llrr'), '']


def markdown(results: dict) -> str:
  """results.json as readable tables."""
  drop = 'percent of the base accuracy' if results['relative'] else 'percentage points'
  lines = _head('Pruning defence results', results,
                f'Order: {results["order"]} mean activation; drop X in {drop}.')
  rows = [[x, entry['channels_pruned'], *_cells(entry['repaired']),
           *_cells(entry['goodnet'], _GOODNET)] if entry['reached']
          else [x, 'not reached', *['—'] * 6] for x, entry in results['thresholds'].items()]
  lines += ['On the test split:', '',
            *tables.markdown(['X', 'channels pruned', "B' clean %", "B' ASR %", 'G clean %',
                              'G ASR %', 'G detection %', 'G false alarm %'], rows, 'r' * 8)]
  if 'fine_tuned_only' in results:
    lines += ['', *_fine_pruning_lines(results)]
  return '\n'.join(lines) + '\n'


def _fine_pruning_lines(results: dict) -> list[str]:
  """The fine-pruning table: each fine-tuned net and its GoodNet (with B) on the test split."""
  tune = results['finetune']
  lines = [f'Fine-pruning: {tune["optimizer"]}, learning rate {tune["learning_rate"]:g} '
           f'({tune["schedule"]}), {tune["epochs"]} epochs of batch {tune["batch_size"]}, weight '
           f'decay {tune["weight_decay"]:g}, on {tune["train_images"]} clean validation images, '
           f'the last epoch kept; {tune["holdout_images"]} clean images held out. Test split:', '']
  only = results['fine_tuned_only']
  rows = [['B fine-tuned alone', 0, *_cells(only), *['—'] * 4, fmt(only['holdout_acc'])]]
  rows += [[f'X={x} fine-pruned', entry['channels_pruned'], *_cells(entry['fine_pruned']),
            *_cells(entry['goodnet_fine_pruned'], _GOODNET),
            fmt(entry['fine_pruned']['holdout_acc'])]
           if entry.get('fine_pruned') is not None
           else [f'X={x} fine-pruned', 'not reached', *['—'] * 7]
           for x, entry in results['thresholds'].items()]
  lines += tables.markdown(['net', 'channels pruned', 'clean %', 'ASR %', 'G clean %', 'G ASR %',
                            'G detection %', 'G false alarm %', 'held-out clean %'], rows,
                          'l' + 'r' * 8)
  if chosen := results.get('recommended'):
    lines += ['', f'Recommended on clean data alone: X={chosen["x"]} ({chosen["channels_pruned"]} '
                  f'channels), the deepest X whose fine-pruned net keeps held-out clean accuracy '
                  f'({fmt(chosen["holdout_acc"])} %) within {chosen["max_clean_drop"]:g} points '
                  f'of B\'s ({fmt(chosen["b_holdout_acc"])} %), counted in whole images of the '
                  f'{tune["holdout_images"]} held out.']
  else:
    lines += ['', 'No fine-pruned net keeps held-out clean accuracy within '
                  f'{results["finetune"]["max_clean_drop"]:g} points of B\'s.']
  return lines


def save_figure(figure: plt.Figure, path: pathlib.Path) -> None:
  with workdir_lib.atomic_path(path) as tmp:
    figure.savefig(tmp, format='png', dpi=120, bbox_inches='tight')
  plt.close(figure)


def plot_sweep(path: pathlib.Path, clean_acc: np.ndarray, asr: np.ndarray,
               levels: dict[float, int | None]) -> None:
  """Clean accuracy and ASR against the fraction of channels pruned, thresholds marked."""
  fraction = np.arange(len(clean_acc)) / (len(clean_acc) - 1)
  figure, axes = plt.subplots(figsize=(7, 4.2))
  axes.plot(fraction, clean_acc, label='clean accuracy (valid)', color='tab:blue')
  axes.plot(fraction, asr, label='attack success rate (valid)', color='tab:red')
  for index, level in enumerate(sorted(set(levels.values()) - {None})):
    names = ','.join(f'{x:g}' for x, at in levels.items() if at == level)  # they share a label
    axes.axvline(fraction[level], color='grey', linestyle=':', linewidth=1)
    # Staggered heights keep the labels of neighbouring levels apart.
    axes.annotate(f'X={names}', (fraction[level], 3 + 22 * (index % 3)), rotation=90,
                  fontsize=8, ha='right', va='bottom', color='dimgrey')
  axes.set(xlabel='fraction of conv_3 channels pruned', ylabel='%', ylim=(-2, 102),
           title='Pruning sweep')
  axes.legend(loc='center left')
  axes.grid(alpha=0.3)
  save_figure(figure, path)


def plot_thresholds(path: pathlib.Path, results: dict) -> None:
  """B, B'_X and G_X on the test split; for G its detection and its false alarms side by side."""
  bars = (('clean accuracy', 'tab:blue', ''), ('attack success rate', 'tab:red', ''),
          ('poisoned inputs flagged N (detection, G)', 'tab:green', ''),
          ('clean inputs flagged N (false alarms, G)', 'tab:orange', '//'))
  net_bars = lambda net: [net[key] for key in _NET] + [np.nan] * 2  # a net alone flags nothing
  names, columns = ['B'], [net_bars(results['base']['test'])]
  for x, entry in results['thresholds'].items():
    if entry['reached']:
      names += [f"B'  X={x}", f'G  X={x}']
      columns += [net_bars(entry['repaired']), [entry['goodnet'][key] for key in _GOODNET]]
  positions = np.arange(len(names))
  figure, axes = plt.subplots(figsize=(max(6, 1.2 * len(names)), 4.4))
  for index, ((label, colour, hatch), values) in enumerate(zip(bars, zip(*columns))):
    axes.bar(positions + (index - 1.5) * 0.2, values, 0.2, label=label, color=colour,
             hatch=hatch, edgecolor='white' if hatch else None)
  axes.set_xticks(positions, names, rotation=30, ha='right')
  axes.set(ylabel='% of test inputs', ylim=(0, 105),
           title='Test split: backdoored net B, pruned B\'_X and GoodNet G_X')
  axes.legend(loc='upper center', bbox_to_anchor=(0.5, -0.22), ncol=2, fontsize=8)
  axes.grid(axis='y', alpha=0.3)
  save_figure(figure, path)


def plot_fine_pruning(path: pathlib.Path, results: dict) -> None:
  """Per X: B'_X, the fine-pruned net and its GoodNet; B and B fine-tuned alone as lines."""
  reached = [(x, e) for x, e in results['thresholds'].items() if e.get('fine_pruned')]
  figure, panels = plt.subplots(1, 2, figsize=(max(8, 2.2 * len(reached) + 3), 4.2), sharey=True)
  positions = np.arange(len(reached))
  nets = (("B'_X (pruned)", 'repaired', 'tab:grey'), ('fine-pruned', 'fine_pruned', 'tab:blue'),
          ('GoodNet (B, fine-pruned)', 'goodnet_fine_pruned', 'tab:purple'))
  for panel, metric, title in zip(panels, _NET, ('clean accuracy', 'attack success rate')):
    for index, (name, key, colour) in enumerate(nets):
      panel.bar(positions + 0.27 * (index - 1), [e[key][metric] for _, e in reached], 0.27,
                label=name, color=colour)
    panel.axhline(results['base']['test'][metric], color='tab:red', linestyle='--',
                  linewidth=1, label='B')
    panel.axhline(results['fine_tuned_only'][metric], color='tab:orange', linestyle=':',
                  linewidth=1.5, label='B fine-tuned alone')
    panel.set_xticks(positions, [f'X={x}' for x, _ in reached])
    panel.set(title=f'{title} (test)', ylim=(0, 105))
    panel.grid(axis='y', alpha=0.3)
  panels[0].set_ylabel('%')
  panels[1].legend(loc='upper center', bbox_to_anchor=(-0.05, -0.1), ncol=5, fontsize=8)
  save_figure(figure, path)


def _panels(rows: list[dict]):
  """A grid of small multiples: one row per model, one column per layer; one layer's many
  models wrap into rows of three."""
  keys = sorted({(row['model'], row['layer']) for row in rows})
  models = list(dict.fromkeys(model for model, _ in keys))
  layers = list(dict.fromkeys(layer for _, layer in keys))
  if len(layers) == 1 and len(models) > 3:
    columns, places = 3, {key: divmod(i, 3) for i, key in enumerate(keys)}
  else:
    columns = len(layers)
    places = {(model, layer): (models.index(model), layers.index(layer)) for model, layer in keys}
  grid_rows = max(row for row, _ in places.values()) + 1
  figure, axes = plt.subplots(grid_rows, columns, squeeze=False, sharex=True, sharey=True,
                              figsize=(4.2 * columns + 1, 3.4 * grid_rows + 1))
  for row, column in set(np.ndindex(grid_rows, columns)) - set(places.values()):
    axes[row, column].set_visible(False)
  return figure, {key: axes[place] for key, place in places.items()}


def _finish_panels(path: pathlib.Path, figure: plt.Figure, panels: dict, title: str,
                   xlabel: str, ylabel: str, handles: list) -> None:
  """Titles the panels, labels the outer axes, adds the legend on the right and saves."""
  bottom = {}  # column -> the lowest panel in it
  for (model, layer), axes in panels.items():
    axes.set_title(f'{model} / {layer}', fontsize=10)
    axes.grid(alpha=0.3)
    spec = axes.get_subplotspec()
    if spec.colspan.start == 0:
      axes.set_ylabel(ylabel)
    if spec.rowspan.start >= bottom.get(spec.colspan.start, (-1, None))[0]:
      bottom[spec.colspan.start] = (spec.rowspan.start, axes)
  for _, axes in bottom.values():
    axes.set_xlabel(xlabel)
    axes.xaxis.set_tick_params(labelbottom=True)  # shared x: a wrapped grid's last row may be short
  figure.suptitle(title)
  figure.legend(handles=handles, loc='center left', bbox_to_anchor=(1.0, 0.5), fontsize=8,
                frameon=False)
  figure.tight_layout(rect=(0, 0, 1, 1 - 0.45 / figure.get_figheight()))  # room for the title
  save_figure(figure, path)


def _variant(row: dict) -> str:
  """A point's colour key: the pruning order (and seed), or the learned-mask defence."""
  if not row['order']:  # a defence entry: 'ANP', 'ANP selection=holdout'
    name, _, overrides = row['defence'].partition(':')
    return f'{name.upper()} {overrides}'.strip()
  return row['order'] + (f' (seed {row["seed"]})' if row['seed'] else '')


def plot_ablation_tradeoff(path: pathlib.Path, rows: list[dict]) -> None:
  """The ablation's trade-off, one panel per (model, layer): ASR against clean accuracy (test).
  Colour: the order (and seed); marker: X; hollow: pruned only, filled: fine-tuned. Rows of
  defences that prune no layer (Neural Cleanse) and input detectors' rows have no panel."""
  rows = [row for row in rows if row['layer'] and row['x'] != 'detector']
  done = [row for row in rows if row['clean_acc']]
  if not done:
    return
  figure, panels = _panels(rows)
  colours = dict(zip(sorted({_variant(row) for row in done}), plt.get_cmap('tab10').colors))
  markers = dict(zip(sorted({row['x'] for row in done}, key=tables.number_first),
                     itertools.cycle('os^DvP*Xph')))
  for row in done:
    colour, tuned = colours[_variant(row)], row['finetune_epochs'] not in ('0', '')
    panels[row['model'], row['layer']].scatter(
        float(row['clean_acc']), float(row['asr']), marker=markers[row['x']], s=46,
        facecolors=colour if tuned else 'none', edgecolors=colour, linewidths=1.4)
  for (model, layer), axes in panels.items():
    missed = sorted({row['x'] for row in rows if not row['clean_acc']
                     and (row['model'], row['layer']) == (model, layer)},
                    key=tables.number_first)
    if missed:  # rows whose X no pruning level reaches have no point to draw
      axes.text(0.02, 0.03, 'not reached: ' + ', '.join(f'X={x}' for x in missed),
                transform=axes.transAxes, fontsize=8, color='dimgrey')
  legend_key = lambda label, **style: plt.Line2D(
      [], [], **{'color': 'grey', 'marker': 'o', 'linestyle': '', **style}, label=label)
  handles = [legend_key(v, color=c) for v, c in colours.items()]
  handles += [legend_key(f'X={x}' if tables.number_first(x)[0] == 0 else x.replace('<=', ' <= '),
                         marker=m, markerfacecolor='none') for x, m in markers.items()]
  handles.append(legend_key('pruned only', markerfacecolor='none'))
  epochs = sorted({int(row['finetune_epochs'] or 0) for row in done} - {0})  # '': none
  if epochs:
    handles.append(legend_key(f'fine-tuned ({"/".join(map(str, epochs))} epoch'
                              f'{"" if epochs == [1] else "s"})'))
  _finish_panels(path, figure, panels,
                 'Pruning defences: backdoor left (ASR) against accuracy kept',
                 'clean accuracy % (test)', 'attack success rate % (test)', handles)


def plot_ablation_curves(path: pathlib.Path, curves: list[dict]) -> None:
  """The ablation's sweeps (valid) per (model, layer): clean accuracy solid, ASR dashed."""
  if not curves:
    return
  figure, panels = _panels(curves)
  series = {}
  for row in curves:
    series.setdefault((row['model'], row['layer'], _variant(row)), []).append(
        (float(row['fraction_pruned']), float(row['clean_acc']), float(row['asr'])))
  colours = dict(zip(sorted({key[2] for key in series}), plt.get_cmap('tab10').colors))
  for (model, layer, variant), points in sorted(series.items()):
    fraction, clean, asr = zip(*sorted(points))
    axes = panels[model, layer]
    axes.plot(fraction, clean, color=colours[variant], linewidth=1.3)
    axes.plot(fraction, asr, color=colours[variant], linewidth=1.3, linestyle='--')
  for axes in panels.values():
    axes.set_ylim(-2, 102)
  handles = [plt.Line2D([], [], color=c, label=v) for v, c in colours.items()]
  handles += [plt.Line2D([], [], color='grey', label='clean accuracy'),
              plt.Line2D([], [], color='grey', linestyle='--', label='attack success rate')]
  _finish_panels(path, figure, panels,
                 'Pruning sweeps: clean accuracy and ASR as channels are pruned',
                 'fraction of the layer\'s channels pruned', '% (validation)', handles)


# --- learned-mask defences (ANP, RNP) ------------------------------------------


def write_masks(path: pathlib.Path, variant_masks: dict[str, dict[str, np.ndarray]],
                variant_means: dict[str, dict[str, np.ndarray]]) -> None:
  """masks.npz: the final [C] masks by layer ('conv_3') and their means ('mean/conv_3'), which
  break pruning-order ties; a grid prefixes names ('eps=0.4 alpha=0.2 seed=0/conv_3')."""
  prefix = lambda variant: f'{variant.rstrip(": ")}/' if variant else ''
  arrays = {f'{prefix(variant)}{kind}{layer}': np.asarray(values)
            for kind, by_variant in (('', variant_masks), ('mean/', variant_means))
            for variant, layer_masks in by_variant.items()
            for layer, values in layer_masks.items()}
  with workdir_lib.atomic_path(path) as tmp, open(tmp, 'wb') as handle:
    np.savez(handle, **arrays)


def _learned_choice(results: dict, defended: dict) -> str:
  """How a learned-mask defence chose its net, in a sentence."""
  if results['selection'] == 'threshold':
    return (f'Chosen by the published rule: every neuron whose mask is at most '
            f'{results["threshold"]:g} pruned ({defended["candidate"]}); held-out clean accuracy '
            f'{fmt(defended["valid"]["clean_acc"])} % (B: {fmt(results["b_holdout_acc"])} %).')
  return (f'Chosen on {results["holdout_images"]} held-out clean images: {defended["candidate"]} '
          f'pruned, the deepest candidate that loses at most {results["allowed_images_lost"]} '
          f'of them ({results["max_clean_drop"]:g} points; one image is '
          f'{fmt(100 / results["holdout_images"])} points): held-out clean accuracy '
          f'{fmt(defended["valid"]["clean_acc"])} % (B: {fmt(results["b_holdout_acc"])} %).')


def learned_mask_markdown(results: dict) -> str:
  """results.json of a learned-mask defence as readable tables."""
  name = results['defence'].upper()
  lines = _head(f'{name} results', results, f'Method: {results["method"]}.')
  if defended := results.get('defended'):
    lines += [_learned_choice(results, defended), '', 'On the test split:', '',
              *tables.markdown(['net', 'clean %', 'ASR %', 'detection %', 'false alarm %'],
                               [[f'{name}-pruned', *_cells(defended['test']), '—', '—'],
                                [f'GoodNet (B, {name}-pruned)',
                                 *_cells(results['goodnet']['test'], _GOODNET)]], 'lrrrr'), '']
  tuned = lambda row: fmt(row['fine_tuned']['holdout_clean_acc']) if 'fine_tuned' in row else '—'
  rows = [[row['candidate'], row['neurons_pruned'], fmt(row['mask_at_most'], 3),
           fmt(row['holdout_clean_acc']), tuned(row),
           *_cells(row, ('test_clean_acc', 'test_asr', 'valid_asr'))]
          for row in results['tradeoff']]
  lines += ['Every candidate (smallest masks pruned first; held-out clean images are never seen '
            'by the masks; test figures of the net as offered, fine-tuned where it was; ASR for '
            'reporting only):', '',
            *tables.markdown(['candidate', 'neurons', 'mask at most', 'held-out clean %, pruned',
                              'held-out clean %, fine-tuned', 'test clean %', 'test ASR %',
                              'valid ASR %'], rows, 'lrrrrrrr')]
  return '\n'.join(lines) + '\n'


def plot_mask_tradeoff(path: pathlib.Path, results: dict) -> None:
  """Clean accuracy (held-out, test) and ASR (test) against the mask threshold (the published
  rule) or the neurons pruned ('holdout'); B's held-out accuracy and the choice marked."""
  figure, axes = plt.subplots(figsize=(7.5, 4.4))
  by_threshold = results['selection'] == 'threshold'
  x_key = 'mask_at_most' if by_threshold else 'neurons_pruned'
  by_variant: dict[str, list[dict]] = {}  # a grid's candidates: 'eps=0.4 seed=0: 12 neurons'
  for row in results['tradeoff']:
    if row[x_key] is not None:  # depth 0 has no mask value
      by_variant.setdefault(row['candidate'].rpartition(': ')[0], []).append(row)
  chosen = results.get('defended')
  # The legend names the chosen variant (else the first); the others are drawn faded.
  shown = chosen['candidate'].rpartition(': ')[0] if chosen else next(iter(by_variant), '')
  for variant, mine in by_variant.items():
    x = [row[x_key] for row in mine]
    label = lambda text: text + (f' ({variant})' if variant else '') if variant == shown else None
    alpha = 1.0 if not chosen or variant == shown else 0.35
    style = dict(marker='o', markersize=3, alpha=alpha, linewidth=1.2)
    axes.plot(x, [r['holdout_clean_acc'] for r in mine], color='tab:blue', linestyle=':',
              label=label('clean, held-out valid, pruned'), **style)
    tuned = [(r[x_key], r['fine_tuned']['holdout_clean_acc']) for r in mine if 'fine_tuned' in r]
    if tuned:
      axes.plot(*zip(*tuned), color='tab:cyan', linestyle='--',
                label=label('clean, held-out valid, fine-tuned'), **style)
    axes.plot(x, [r['test_clean_acc'] for r in mine], color='tab:blue',
              label=label('clean, test (the net offered)'), **style)
    axes.plot(x, [r['test_asr'] for r in mine], color='tab:red',
              label=label('attack success, test'), **style)
  axes.axhline(results['b_holdout_acc'], color='grey', linestyle=':', linewidth=1,
               label='B\'s held-out clean accuracy')
  if not by_threshold:  # the budget the depth is chosen against
    axes.axhline(results['b_holdout_acc'] - results['max_clean_drop'], color='grey',
                 linestyle='--', linewidth=1,
                 label=f'B\'s held-out clean accuracy - {results["max_clean_drop"]:g}')
  if chosen:
    row = next(r for r in results['tradeoff'] if r['candidate'] == chosen['candidate'])
    axes.axvline(row[x_key] or 0, color='black', linewidth=1)
    axes.annotate(f'chosen: {chosen["neurons_pruned"]} neurons', (row[x_key] or 0, 50),
                  rotation=90, ha='right', va='center', fontsize=8)
  axes.set(xlabel='mask threshold (every neuron with a mask at most it pruned)' if by_threshold
           else 'neurons pruned (smallest masks first)', ylabel='%', ylim=(-2, 102),
           title=results['method'])
  axes.legend(loc='upper left', bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
  axes.grid(alpha=0.3)
  save_figure(figure, path)


def plot_masks(path: pathlib.Path, variant_masks: dict[str, dict[str, np.ndarray]],
               name: str, threshold: float) -> None:
  """The learned masks, one panel per layer: each neuron's mask, sorted (a grid's first variant)."""
  variant, layer_masks = next(iter(variant_masks.items()))
  layers = list(layer_masks)
  columns = min(3, len(layers))
  rows = -(-len(layers) // columns)
  figure, panels = plt.subplots(rows, columns, figsize=(3.6 * columns, 2.8 * rows),
                                squeeze=False, sharey=True)
  for axes, layer in zip(panels.ravel(), layers):
    values = np.sort(np.asarray(layer_masks[layer]))
    axes.bar(np.arange(len(values)), values, width=1.0, color='tab:purple')
    axes.set_title(f'{layer}: {int((values <= threshold).sum())} of {len(values)} at most '
                   f'{threshold:g}', fontsize=9)
    axes.axhline(threshold, color='grey', linestyle=':', linewidth=1)
    axes.set(ylim=(0, 1.02), xlabel='neurons, sorted')
  for axes in panels.ravel()[len(layers):]:
    axes.axis('off')
  for axes in panels[:, 0]:
    axes.set_ylabel('mask')
  figure.suptitle(f'{name} masks' + (f' ({variant.rstrip(": ")})' if variant else ''))
  figure.tight_layout()
  save_figure(figure, path)
