"""Reports of the pruning defences: sweep.csv, results.json, results.md and plots."""

import pathlib

import matplotlib

matplotlib.use('Agg')  # files only; no display is needed or assumed
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np

from badnet.io import tables
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


def _fmt(value: float | None) -> str:
  return '—' if value is None else f'{value:.2f}'


def _goodnet_cells(good: dict) -> list[str]:
  return [_fmt(good[key]) for key in ('clean_acc', 'asr', 'detection_rate', 'false_alarm_rate')]


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
                       [['B', split, _fmt(base[split]['clean_acc']), _fmt(base[split]['asr'])]
                        for split in ('valid', 'test')], 'llrr'), '',
      'On the test split:', '',
  ]
  rows = []
  for x, entry in results['thresholds'].items():
    if not entry['reached']:
      rows.append([x, 'not reached', *['—'] * 6])
      continue
    repaired, good = entry['repaired'], entry['goodnet']
    rows.append([x, entry['channels_pruned'], _fmt(repaired['clean_acc']), _fmt(repaired['asr']),
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
  rows = [['B fine-tuned alone', 0, _fmt(only['clean_acc']), _fmt(only['asr']), *['—'] * 4,
           only['chosen_epoch']]]
  for x, entry in results['thresholds'].items():
    tuned, good = entry.get('fine_pruned'), entry.get('goodnet_fine_pruned')
    if tuned is None:
      rows.append([f'X={x} fine-pruned', 'not reached', *['—'] * 7])
      continue
    rows.append([f'X={x} fine-pruned', entry['channels_pruned'], _fmt(tuned['clean_acc']),
                 _fmt(tuned['asr']), *_goodnet_cells(good), tuned['chosen_epoch']])
  lines += tables.markdown(['net', 'channels pruned', 'clean %', 'ASR %', 'G clean %', 'G ASR %',
                            'G detection %', 'G false alarm %', 'epoch'], rows, 'l' + 'r' * 8)
  chosen = results.get('recommended')
  if chosen:
    lines += ['', f'Recommended on clean data alone: X={chosen["x"]} ({chosen["channels_pruned"]} '
                  f'channels), the deepest X whose fine-pruned net keeps held-out clean accuracy '
                  f'({_fmt(chosen["holdout_acc"])} %) within {chosen["max_clean_drop"]:g} points '
                  f'of B\'s ({_fmt(chosen["b_holdout_acc"])} %).']
  else:
    lines += ['', 'No fine-pruned net keeps held-out clean accuracy within '
                  f'{results["finetune"]["max_clean_drop"]:g} points of B\'s.']
  return lines


def summary(results: dict) -> str:
  """The short table the prune job prints."""
  return markdown(results)


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
  """B, B'_X and G_X side by side on the test split."""
  names = ['B']
  clean = [results['base']['test']['clean_acc']]
  attack = [results['base']['test']['asr']]
  detected = [0.0]
  for x, entry in results['thresholds'].items():
    if entry['reached']:
      names += [f"B'  X={x}", f'G  X={x}']
      clean += [entry['repaired']['clean_acc'], entry['goodnet']['clean_acc']]
      attack += [entry['repaired']['asr'], entry['goodnet']['asr']]
      detected += [0.0, entry['goodnet']['detection_rate']]
  positions = np.arange(len(names))
  figure, axes = plt.subplots(figsize=(max(6, 1.1 * len(names)), 4.2))
  axes.bar(positions - 0.27, clean, 0.27, label='clean accuracy', color='tab:blue')
  axes.bar(positions, attack, 0.27, label='attack success rate', color='tab:red')
  axes.bar(positions + 0.27, detected, 0.27, label='poisoned inputs flagged N (G only)',
           color='tab:green')
  axes.set_xticks(positions, names, rotation=30, ha='right')
  axes.set_ylabel('%')
  axes.set_ylim(0, 105)
  axes.set_title('Test split: backdoored net B, pruned B\'_X and GoodNet G_X')
  axes.legend(loc='upper center', bbox_to_anchor=(0.5, -0.22), ncol=3, fontsize=8)
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


def write_results(out: pathlib.Path, results: dict, clean_acc: np.ndarray,
                  asr: np.ndarray, levels: dict[float, int | None]) -> None:
  """results.json, results.md, plots/sweep.png and plots/thresholds.png."""
  workdir_lib.write_json(out / 'results.json', results)
  workdir_lib.write_text(out / 'results.md', markdown(results))
  plot_sweep(out / 'plots' / 'sweep.png', clean_acc, asr, levels)
  plot_thresholds(out / 'plots' / 'thresholds.png', results)
  if 'fine_tuned_only' in results:
    plot_fine_pruning(out / 'plots' / 'fine_prune.png', results)


def plot_ablation_tradeoff(path: pathlib.Path, rows: list[dict]) -> None:
  """The ablation: ASR against clean accuracy (test split), one marker per variant."""
  figure, axes = plt.subplots(figsize=(7, 5))
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
  save_figure(figure, path)


def plot_ablation_curves(path: pathlib.Path, curves: list[dict]) -> None:
  """The ablation's sweeps (validation split) overlaid: clean accuracy above, ASR below."""
  figure, (top, bottom) = plt.subplots(2, 1, figsize=(7, 7), sharex=True)
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
  save_figure(figure, path)
