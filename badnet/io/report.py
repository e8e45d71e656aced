"""Reports of the pruning defences: sweep.csv, results.json, results.md and plots."""

import pathlib

import matplotlib

matplotlib.use('Agg')  # files only; no display is needed or assumed
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np

from badnet.io import tables
from badnet.io.tables import fmt
from badnet.io import workdir as workdir_lib


def write_sweep_csv(path: pathlib.Path, order: np.ndarray, clean_acc: np.ndarray,
                    asr: np.ndarray) -> None:
  """One row per level 0..C: step, channel pruned at that step, fraction, accuracies (%)."""
  tables.write_csv(path, SWEEP_FIELDS, sweep_rows(order, clean_acc, asr))


SWEEP_FIELDS = ('step', 'channel', 'fraction_pruned', 'clean_acc', 'asr')


def sweep_rows(order: np.ndarray, clean_acc: np.ndarray, asr: np.ndarray) -> list[dict]:
  """sweep.csv's rows (levels 0..C), as the ablation's curves.csv also holds them."""
  num_channels = len(order)
  return [{'step': step, 'channel': '' if step == 0 else int(order[step - 1]),
           'fraction_pruned': f'{step / num_channels:.6f}', 'clean_acc': f'{clean_acc[step]:.4f}',
           'asr': f'{asr[step]:.4f}'} for step in range(num_channels + 1)]


def _goodnet_cells(good: dict) -> list[str]:
  return [fmt(good[key]) for key in ('clean_acc', 'asr', 'detection_rate', 'false_alarm_rate')]


def markdown(results: dict) -> str:
  """results.json as readable tables."""
  base = results['base']
  lines = [
      '# Pruning defence results', '',
      f'Model: `{results["model"]}`' + (' (shipped synthetic benchmark)'
                                        if results.get('synthetic_benchmark') else ''),
      f'Order: {results["order"]} mean activation; drop X in '
      f'{"percent of the base accuracy" if results["relative"] else "percentage points"}.', '',
      *tables.markdown(['net', 'split', 'clean acc %', 'ASR %'],
                       [['B', split, fmt(base[split]['clean_acc']), fmt(base[split]['asr'])]
                        for split in ('valid', 'test')], 'llrr'), '',
      'On the test split:', '',
  ]
  rows = []
  for x, entry in results['thresholds'].items():
    if not entry['reached']:
      rows.append([x, 'not reached', *['—'] * 6])
      continue
    repaired, good = entry['repaired'], entry['goodnet']
    rows.append([x, entry['channels_pruned'], fmt(repaired['clean_acc']), fmt(repaired['asr']),
                 *_goodnet_cells(good)])
  lines += tables.markdown(['X', 'channels pruned', "B' clean %", "B' ASR %", 'G clean %',
                            'G ASR %', 'G detection %', 'G false alarm %'], rows, 'r' * 8)
  if 'fine_tuned_only' in results:
    lines += ['', *_fine_pruning_lines(results)]
  return '\n'.join(lines) + '\n'


def _fine_pruning_lines(results: dict) -> list[str]:
  """The fine-pruning table: each fine-tuned net and its GoodNet (with B) on the test split."""
  tune = results['finetune']
  lines = [
      f'Fine-pruning: {tune["optimizer"]}, learning rate {tune["learning_rate"]:g} '
      f'({tune["schedule"]}), {tune["epochs"]} epochs of batch {tune["batch_size"]}, weight '
      f'decay {tune["weight_decay"]:g}, on {tune["train_images"]} clean validation images; '
      f'the epoch chosen on {tune["holdout_images"]} held-out clean images. Test split:', '',
  ]
  only = results['fine_tuned_only']
  rows = [['B fine-tuned alone', 0, fmt(only['clean_acc']), fmt(only['asr']), *['—'] * 4,
           only['chosen_epoch']]]
  for x, entry in results['thresholds'].items():
    tuned, good = entry.get('fine_pruned'), entry.get('goodnet_fine_pruned')
    if tuned is None:
      rows.append([f'X={x} fine-pruned', 'not reached', *['—'] * 7])
      continue
    rows.append([f'X={x} fine-pruned', entry['channels_pruned'], fmt(tuned['clean_acc']),
                 fmt(tuned['asr']), *_goodnet_cells(good), tuned['chosen_epoch']])
  lines += tables.markdown(['net', 'channels pruned', 'clean %', 'ASR %', 'G clean %', 'G ASR %',
                            'G detection %', 'G false alarm %', 'epoch'], rows, 'l' + 'r' * 8)
  chosen = results.get('recommended')
  if chosen:
    lines += ['', f'Recommended on clean data alone: X={chosen["x"]} ({chosen["channels_pruned"]} '
                  f'channels), the deepest X whose fine-pruned net keeps held-out clean accuracy '
                  f'({fmt(chosen["holdout_acc"])} %) within {chosen["max_clean_drop"]:g} points '
                  f'of B\'s ({fmt(chosen["b_holdout_acc"])} %).']
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
  by_level: dict[int, list[str]] = {}  # thresholds that select the same level share a label
  for x, level in levels.items():
    if level is not None:
      by_level.setdefault(level, []).append(f'{x:g}')
  for index, (level, names) in enumerate(sorted(by_level.items())):
    axes.axvline(fraction[level], color='grey', linestyle=':', linewidth=1)
    # Staggered heights keep the labels of neighbouring levels apart.
    axes.annotate(f'X={",".join(names)}', (fraction[level], 3 + 22 * (index % 3)), rotation=90,
                  fontsize=8, ha='right', va='bottom', color='dimgrey')
  axes.set_xlabel('fraction of conv_3 channels pruned')
  axes.set_ylabel('%')
  axes.set_ylim(-2, 102)
  axes.set_title('Pruning sweep')
  axes.legend(loc='center left')
  axes.grid(alpha=0.3)
  save_figure(figure, path)


def plot_thresholds(path: pathlib.Path, results: dict) -> None:
  """B, B'_X and G_X on the test split; for G its detection and its false alarms side by side."""
  names = ['B']
  bars = {'clean accuracy': [results['base']['test']['clean_acc']],
          'attack success rate': [results['base']['test']['asr']],
          'poisoned inputs flagged N (detection, G)': [np.nan],
          'clean inputs flagged N (false alarms, G)': [np.nan]}
  for x, entry in results['thresholds'].items():
    if not entry['reached']:
      continue
    names += [f"B'  X={x}", f'G  X={x}']
    repaired, good = entry['repaired'], entry['goodnet']
    bars['clean accuracy'] += [repaired['clean_acc'], good['clean_acc']]
    bars['attack success rate'] += [repaired['asr'], good['asr']]
    bars['poisoned inputs flagged N (detection, G)'] += [np.nan, good['detection_rate']]
    bars['clean inputs flagged N (false alarms, G)'] += [np.nan, good['false_alarm_rate']]
  positions = np.arange(len(names))
  figure, axes = plt.subplots(figsize=(max(6, 1.2 * len(names)), 4.4))
  colours = ('tab:blue', 'tab:red', 'tab:green', 'tab:orange')
  hatches = ('', '', '', '//')
  width = 0.2
  for index, ((label, values), colour, hatch) in enumerate(zip(bars.items(), colours, hatches)):
    axes.bar(positions + (index - 1.5) * width, values, width, label=label, color=colour,
             hatch=hatch, edgecolor='white' if hatch else None)
  axes.set_xticks(positions, names, rotation=30, ha='right')
  axes.set_ylabel('% of test inputs')
  axes.set_ylim(0, 105)
  axes.set_title('Test split: backdoored net B, pruned B\'_X and GoodNet G_X')
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
  for panel, metric, title in zip(panels, ('clean_acc', 'asr'),
                                  ('clean accuracy', 'attack success rate')):
    for index, (name, key, colour) in enumerate(nets):
      panel.bar(positions + 0.27 * (index - 1), [e[key][metric] for _, e in reached], 0.27,
                label=name, color=colour)
    panel.axhline(results['base']['test'][metric], color='tab:red', linestyle='--',
                  linewidth=1, label='B')
    panel.axhline(results['fine_tuned_only'][metric], color='tab:orange', linestyle=':',
                  linewidth=1.5, label='B fine-tuned alone')
    panel.set_xticks(positions, [f'X={x}' for x, _ in reached])
    panel.set_title(f'{title} (test)')
    panel.set_ylim(0, 105)
    panel.grid(axis='y', alpha=0.3)
  panels[0].set_ylabel('%')
  panels[1].legend(loc='upper center', bbox_to_anchor=(-0.05, -0.1), ncol=5, fontsize=8)
  save_figure(figure, path)


def _panels(keys: list[tuple[str, str]], width: float = 4.2, height: float = 3.4):
  """A grid of small multiples: one row per model, one column per layer."""
  models = list(dict.fromkeys(model for model, _ in keys))
  layers = list(dict.fromkeys(layer for _, layer in keys))
  figure, axes = plt.subplots(len(models), len(layers), squeeze=False, sharex=True, sharey=True,
                              figsize=(width * len(layers) + 1, height * len(models) + 1))
  return figure, {(model, layer): axes[row, column] for row, model in enumerate(models)
                  for column, layer in enumerate(layers)}


def _variant(row: dict) -> str:
  """A point's colour key: the pruning order (and seed), or the learned-mask defence."""
  if not row['order']:  # ANP, RNP
    return row['defence'].upper()
  return row['order'] + (f' (seed {row["seed"]})' if row['seed'] else '')


def plot_ablation_tradeoff(path: pathlib.Path, rows: list[dict]) -> None:
  """The ablation's trade-off, one panel per (model, layer): ASR against clean accuracy (test).

  Colour: the order (and seed); marker: X; hollow: pruned only, filled: fine-tuned.
  """
  done = [row for row in rows if row['clean_acc']]
  if not done:
    return
  figure, panels = _panels(sorted({(row['model'], row['layer']) for row in rows}))
  variants = sorted({_variant(row) for row in done})
  xs = sorted({row['x'] for row in done}, key=float)
  colours = dict(zip(variants, plt.get_cmap('tab10').colors))
  markers = dict(zip(xs, 'os^DvP*Xph'))
  for row in done:
    colour, tuned = colours[_variant(row)], row['finetune_epochs'] != '0'
    panels[row['model'], row['layer']].scatter(
        float(row['clean_acc']), float(row['asr']), marker=markers[row['x']], s=46,
        facecolors=colour if tuned else 'none', edgecolors=colour, linewidths=1.4)
  for (model, layer), axes in panels.items():
    axes.set_title(f'{model} / {layer}', fontsize=10)
    axes.grid(alpha=0.3)
  for axes in list(panels.values())[-len({k[1] for k in panels}):]:
    axes.set_xlabel('clean accuracy % (test)')
  first_layer = next(iter(panels))[1]
  for (model, layer), axes in panels.items():
    if layer == first_layer:
      axes.set_ylabel('attack success rate % (test)')
    missed = sorted({row['x'] for row in rows if not row['clean_acc']
                     and (row['model'], row['layer']) == (model, layer)}, key=float)
    if missed:  # rows whose X no pruning level reaches have no point to draw
      axes.text(0.02, 0.03, 'not reached: ' + ', '.join(f'X={x}' for x in missed),
                transform=axes.transAxes,
                fontsize=8, color='dimgrey')
  handles = [plt.Line2D([], [], color=c, marker='o', linestyle='', label=v)
             for v, c in colours.items()]
  handles += [plt.Line2D([], [], color='grey', marker=m, linestyle='', markerfacecolor='none',
                         label=f'X={x}') for x, m in markers.items()]
  epochs = sorted({int(row['finetune_epochs']) for row in done} - {0})
  handles += [plt.Line2D([], [], color='grey', marker='o', linestyle='', markerfacecolor='none',
                         label='pruned only')]
  if epochs:
    handles += [plt.Line2D([], [], color='grey', marker='o', linestyle='',
                           label=f'fine-tuned ({"/".join(map(str, epochs))} epoch'
                                 f'{"" if epochs == [1] else "s"})')]
  figure.suptitle('Pruning defences: backdoor left (ASR) against accuracy kept')
  figure.legend(handles=handles, loc='center left', bbox_to_anchor=(1.0, 0.5), fontsize=8,
                frameon=False)
  figure.tight_layout()
  save_figure(figure, path)


def plot_ablation_curves(path: pathlib.Path, curves: list[dict]) -> None:
  """The ablation's sweeps (valid) per (model, layer): clean accuracy solid, ASR dashed."""
  if not curves:
    return
  figure, panels = _panels(sorted({(row['model'], row['layer']) for row in curves}))
  series = {}
  for row in curves:
    series.setdefault((row['model'], row['layer'], _variant(row)), []).append(
        (float(row['fraction_pruned']), float(row['clean_acc']), float(row['asr'])))
  variants = sorted({key[2] for key in series})
  colours = dict(zip(variants, plt.get_cmap('tab10').colors))
  for (model, layer, variant), points in sorted(series.items()):
    fraction, clean, asr = zip(*sorted(points))
    axes = panels[model, layer]
    axes.plot(fraction, clean, color=colours[variant], linewidth=1.3)
    axes.plot(fraction, asr, color=colours[variant], linewidth=1.3, linestyle='--')
  first_layer = next(iter(panels))[1]
  for (model, layer), axes in panels.items():
    axes.set_title(f'{model} / {layer}', fontsize=10)
    axes.set_ylim(-2, 102)
    axes.grid(alpha=0.3)
    if layer == first_layer:
      axes.set_ylabel('% (validation)')
  for axes in list(panels.values())[-len({k[1] for k in panels}):]:
    axes.set_xlabel('fraction of the layer\'s channels pruned')
  handles = [plt.Line2D([], [], color=c, label=v) for v, c in colours.items()]
  handles += [plt.Line2D([], [], color='grey', label='clean accuracy'),
              plt.Line2D([], [], color='grey', linestyle='--', label='attack success rate')]
  figure.suptitle('Pruning sweeps: clean accuracy and ASR as channels are pruned')
  figure.legend(handles=handles, loc='center left', bbox_to_anchor=(1.0, 0.5), fontsize=8,
                frameon=False)
  figure.tight_layout()
  save_figure(figure, path)


# --- learned-mask defences (ANP, RNP) ------------------------------------------


def write_masks(path: pathlib.Path, variant_masks: dict[str, dict[str, np.ndarray]],
                variant_means: dict[str, dict[str, np.ndarray]]) -> None:
  """masks.npz: the final [C] masks by layer ('conv_3') and their means ('mean/conv_3').

  The means break pruning-order ties; a grid prefixes names ('eps=0.4 alpha=0.2 seed=0/conv_3').
  """
  prefix = lambda variant: f'{variant.rstrip(": ")}/' if variant else ''
  arrays = {f'{prefix(variant)}{kind}{layer}': np.asarray(values)
            for kind, by_variant in (('', variant_masks), ('mean/', variant_means))
            for variant, layer_masks in by_variant.items()
            for layer, values in layer_masks.items()}
  with workdir_lib.atomic_path(path) as tmp, open(tmp, 'wb') as handle:
    np.savez(handle, **arrays)


def learned_mask_markdown(results: dict) -> str:
  """results.json of a learned-mask defence as readable tables."""
  base, name = results['base'], results['defence'].upper()
  lines = [f'# {name} results', '',
           f'Model: `{results["model"]}`' + (' (shipped synthetic benchmark)'
                                             if results.get('synthetic_benchmark') else ''), '',
           *tables.markdown(['net', 'split', 'clean acc %', 'ASR %'],
                            [['B', split, fmt(base[split]['clean_acc']),
                              fmt(base[split]['asr'])] for split in ('valid', 'test')],
                            'llrr'), '']
  defended = results.get('defended')
  if defended:
    lines += [f'Chosen on {results["holdout_images"]} held-out clean images: '
              f'{defended["candidate"]} pruned, the deepest candidate whose held-out clean '
              f'accuracy ({fmt(defended["valid"]["clean_acc"])} %) stays within '
              f'{results["max_clean_drop"]:g} points of B\'s ({fmt(results["b_holdout_acc"])} %).',
              '', 'On the test split:', '',
              *tables.markdown(
                  ['net', 'clean %', 'ASR %', 'detection %', 'false alarm %'],
                  [[f'{name}-pruned', fmt(defended['test']['clean_acc']),
                    fmt(defended['test']['asr']), '—', '—'],
                   [f'GoodNet (B, {name}-pruned)', fmt(results['goodnet']['test']['clean_acc']),
                    fmt(results['goodnet']['test']['asr']),
                    fmt(results['goodnet']['test']['detection_rate']),
                    fmt(results['goodnet']['test']['false_alarm_rate'])]], 'lrrrr'), '']
  tuned = lambda row: fmt(row['fine_tuned']['holdout_clean_acc']) if 'fine_tuned' in row else '—'
  lines += ['Every candidate (neurons pruned, smallest masks first; test figures of the net as '
            'offered, fine-tuned where it was; ASR for reporting only):', '',
            *tables.markdown(['candidate', 'mask at most', 'held-out clean %, pruned',
                              'held-out clean %, fine-tuned', 'test clean %', 'test ASR %',
                              'valid ASR %'],
                             [[row['candidate'],
                               '—' if row['mask_at_most'] is None else f'{row["mask_at_most"]:.3f}',
                               fmt(row['holdout_clean_acc']), tuned(row),
                               fmt(row['test_clean_acc']), fmt(row['test_asr']),
                               fmt(row['valid_asr'])]
                              for row in results['tradeoff']], 'lrrrrrr')]
  return '\n'.join(lines) + '\n'


def plot_mask_tradeoff(path: pathlib.Path, results: dict) -> None:
  """Clean accuracy (held-out, test) and ASR (test) against neurons pruned; the choice marked."""
  figure, axes = plt.subplots(figsize=(7.5, 4.4))
  rows = results['tradeoff']
  variants = list(dict.fromkeys(row['candidate'].rsplit(': ', 1)[0] if ': ' in row['candidate']
                                else '' for row in rows))
  chosen = results.get('defended')
  for index, variant in enumerate(variants):
    mine = [row for row in rows if (row['candidate'].rsplit(': ', 1)[0]
                                    if ': ' in row['candidate'] else '') == variant]
    depth = [row['neurons_pruned'] for row in mine]
    suffix = f' ({variant})' if variant else ''
    alpha = 1.0 if not chosen or chosen['candidate'].startswith(variant) else 0.35
    style = dict(marker='o', markersize=3, alpha=alpha, linewidth=1.2)
    axes.plot(depth, [r['holdout_clean_acc'] for r in mine], color='tab:blue', linestyle=':',
              label=f'clean, held-out valid, pruned{suffix}' if index == 0 else None, **style)
    tuned = [(r['neurons_pruned'], r['fine_tuned']['holdout_clean_acc']) for r in mine
             if 'fine_tuned' in r]
    if tuned:  # what the choice is made on when candidates are fine-tuned
      axes.plot(*zip(*tuned), color='tab:cyan', linestyle='--',
                label=f'clean, held-out valid, fine-tuned{suffix}' if index == 0 else None,
                **style)
    axes.plot(depth, [r['test_clean_acc'] for r in mine], color='tab:blue',
              label=f'clean, test (the net offered){suffix}' if index == 0 else None, **style)
    axes.plot(depth, [r['test_asr'] for r in mine], color='tab:red',
              label=f'attack success, test{suffix}' if index == 0 else None, **style)
  axes.axhline(results['b_holdout_acc'] - results['max_clean_drop'], color='grey',
               linestyle='--', linewidth=1,
               label=f'B\'s held-out clean accuracy - {results["max_clean_drop"]:g}')
  if chosen:
    axes.axvline(chosen['neurons_pruned'], color='black', linewidth=1)
    axes.annotate(f'chosen: {chosen["neurons_pruned"]} neurons', (chosen['neurons_pruned'], 50),
                  rotation=90, ha='right', va='center', fontsize=8)
  axes.set_xlabel('neurons pruned (smallest masks first)')
  axes.set_ylabel('%')
  axes.set_ylim(-2, 102)
  axes.set_title(f'{results["defence"].upper()}: pruning by learned masks '
                 f'(depth chosen on held-out clean data)')
  axes.legend(loc='upper left', bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
  axes.grid(alpha=0.3)
  save_figure(figure, path)


def plot_masks(path: pathlib.Path, variant_masks: dict[str, dict[str, np.ndarray]],
               name: str) -> None:
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
    axes.set_title(f'{layer}: {int((values < 0.2).sum())} of {len(values)} below 0.2',
                   fontsize=9)
    axes.set_ylim(0, 1.02)
    axes.set_xlabel('neurons, sorted')
  for axes in panels.ravel()[len(layers):]:
    axes.axis('off')
  for axes in panels[:, 0]:
    axes.set_ylabel('mask')
  figure.suptitle(f'{name} masks' + (f' ({variant.rstrip(": ")})' if variant else ''))
  figure.tight_layout()
  save_figure(figure, path)
