"""The leaderboard: a grid's per-net rows summarised by kind of net, with 95 % intervals.

Repairing defences get clean accuracy, ASR and BackdoorBench's DER as a mean
and a 95 % t-interval over the nets of a kind; detectors get, per kind, how
many nets had the attacker's target flagged and how many had any label flagged
(on clean nets: false positives), and an input detector's FRR and FAR. Each
row carries the time its cell took; the board says when, at which commit and
on which machine it was made.
"""

import collections
import datetime
import math
import os
import pathlib
import platform
import statistics
import subprocess
import time
from collections.abc import Iterable, Sequence

import jax
import matplotlib.pyplot as plt

from badnet.io import report, tables, workdir

ROW_FIELDS = ('defence', 'model', 'kind', 'layer', 'order', 'seed', 'x', 'finetune_epochs',
              'channels_pruned', 'pruned_channels', 'clean_acc', 'asr', 'der',
              'goodnet_clean_acc', 'goodnet_asr', 'detection_rate', 'false_alarm_rate',
              'b_clean_acc', 'b_asr', 'labels_flagged', 'target_flagged', 'frr', 'far',
              'seconds')
# What makes a board row: a defence's variant and the kind of net (the nets are averaged).
GROUP_FIELDS = ('defence', 'layer', 'order', 'seed', 'x', 'finetune_epochs', 'kind')
MEANS = ('clean_acc', 'asr', 'der', 'frr', 'far', 'seconds')
BOARD_FIELDS = (*GROUP_FIELDS, 'nets', 'model',
                *(f'{field}{suffix}' for field in MEANS for suffix in ('', '_ci95')),
                'target_flagged', 'any_flagged')
KIND_ORDER = ('clean', 'badnets', 'blended', 'pruning_aware', 'given')

# Student's t, 0.975 quantile, by degrees of freedom (the 95 % two-sided interval).
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
         9: 2.262, 10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120,
         17: 2.110, 18: 2.101, 19: 2.093, 20: 2.086, 25: 2.060, 30: 2.042, 40: 2.021, 60: 2.000,
         120: 1.980}


def t975(degrees: int) -> float:
  """Student's t 0.975 quantile: the table's entry, else the next smaller tabled one's (wider)."""
  if degrees < 1:
    raise ValueError(f'degrees of freedom must be >= 1, got {degrees}')
  return _T975[max(d for d in _T975 if d <= degrees)] if degrees <= 120 else 1.960


def interval(values: Sequence[float]) -> tuple[float, float | None]:
  """Mean and the half-width of its 95 % t-interval (None for a single value)."""
  mean = statistics.fmean(values)
  if len(values) < 2:
    return mean, None
  return mean, t975(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))


def der(before: dict, after: dict) -> float:
  """BackdoorBench's defence effectiveness rating, in percent (50: no change):
  (max(0, ASR drop) - max(0, clean accuracy drop) + 1) / 2, the drops as fractions."""
  asr_drop = (before['asr'] - after['asr']) / 100
  acc_drop = (before['clean_acc'] - after['clean_acc']) / 100
  return 100 * (max(0.0, asr_drop) - max(0.0, acc_drop) + 1) / 2


class Progress:
  """Prints each finished cell with an estimate of the time left (from the cells of the same
  defence done so far, else from every cell's mean)."""

  def __init__(self, cells: int):
    self.cells, self.done, self.started = cells, 0, time.perf_counter()
    self.seconds: dict[str, list[float]] = collections.defaultdict(list)
    self.pending: collections.Counter = collections.Counter()

  def plan(self, defences: Iterable[str]) -> None:
    self.pending.update(defences)

  def elapsed(self) -> float:
    return time.perf_counter() - self.started

  def step(self, defence: str, what: str, seconds: float | None) -> None:
    """One cell finished (``seconds`` None: it was done before, nothing ran)."""
    self.done += 1
    self.pending[defence] -= 1
    if seconds is not None:
      self.seconds[defence].append(seconds)
    every = [s for values in self.seconds.values() for s in values]
    if seconds is None:
      print(f'[{self.done}/{self.cells}] {what}: done before', flush=True)
      return
    guess = statistics.fmean(every)
    left = sum(count * statistics.fmean(self.seconds.get(name) or [guess])
               for name, count in self.pending.items() if count > 0)
    print(f'[{self.done}/{self.cells}] {what}: {seconds:.0f} s; about {_duration(left)} left',
          flush=True)


def _duration(seconds: float) -> str:
  minutes = round(seconds / 60)
  return f'{seconds:.0f} s' if seconds < 90 else (
      f'{minutes} min' if minutes < 90 else f'{minutes / 60:.1f} h')


def _groups(rows: list[dict]) -> dict[tuple, list[dict]]:
  """Rows by board row. A defence that reports one net per model (its recommended one, or B
  where it offered none) is one row per kind, whatever that net's name; one that reports each
  of its nets (pruning's X) is one row per net offered."""
  per_model = collections.Counter((row['defence'], row['model']) for row in rows)
  every = {defence for (defence, _), count in per_model.items() if count > 1}
  groups: dict[tuple, list[dict]] = collections.defaultdict(list)
  for row in rows:
    key = dict(row)
    if row['defence'] not in every:
      key['x'] = 'detector' if row['x'] == 'detector' else 'chosen'
    groups[tuple(key[field] for field in GROUP_FIELDS)].append(row)
  return groups


def summarise(rows: list[dict]) -> list[dict]:
  """The board's rows: per group, each net's row (model = its name) and then the summary
  (model 'mean'): means with their 95 % half-widths, and counts of nets flagged."""
  board = []
  for key, members in _groups(rows).items():
    group = dict(zip(GROUP_FIELDS, key))
    for row in sorted(members, key=lambda r: r['model']):
      board.append({**group, 'nets': 1, 'model': row['model'],
                    **{field: row[field] for field in MEANS},
                    'target_flagged': row['target_flagged'],
                    'any_flagged': _any_flagged(row)})
    summary = {**group, 'nets': len(members), 'model': 'mean'}
    for field in MEANS:
      values = [float(row[field]) for row in members if row[field] != '']
      if values:
        mean, half = interval(values)
        summary[field] = f'{mean:.4f}'
        summary[f'{field}_ci95'] = '' if half is None else f'{half:.4f}'
    for field, count in (('target_flagged', lambda r: r['target_flagged'] == '1'),
                         ('any_flagged', lambda r: _any_flagged(r) == '1')):
      if any(row['labels_flagged'] for row in members):
        summary[field] = f'{sum(map(count, members))}/{len(members)}'
    board.append(summary)
  return [{field: row.get(field, '') for field in BOARD_FIELDS} for row in board]


def _any_flagged(row: dict) -> str:
  return '' if not row['labels_flagged'] else str(int(row['labels_flagged'] != 'none'))


def _made() -> str:
  """When, at which commit and on which machine the board was made."""
  try:
    commit = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], capture_output=True,
                            text=True, timeout=10, check=True,
                            cwd=pathlib.Path(__file__).resolve().parent).stdout.strip()
    dirty = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no'],
                           capture_output=True, text=True, timeout=10, check=True,
                           cwd=pathlib.Path(__file__).resolve().parent).stdout.strip()
    commit += ' (with uncommitted changes)' if dirty else ''
  except (OSError, subprocess.SubprocessError):
    commit = 'unknown (not a git checkout)'
  device = jax.devices()[0]
  accelerator = ('' if device.platform == 'cpu' else
                 f', {jax.device_count()} x {device.device_kind}')
  return (f'Made {datetime.date.today().isoformat()} at commit {commit} on {_cpu()}'
          f'{accelerator} (JAX {jax.__version__}, {device.platform.upper()}).')


def _cpu() -> str:
  try:
    for line in pathlib.Path('/proc/cpuinfo').read_text().splitlines():
      if line.startswith('model name'):
        return f'{line.split(":", 1)[1].strip()}, {os.cpu_count()} cores'
  except OSError:
    pass
  return platform.processor() or platform.machine()


def _cell(summary: dict, field: str, interval: bool = True) -> str:
  if not summary.get(field):
    return '—'
  half = summary.get(f'{field}_ci95') if interval else None
  return f'{float(summary[field]):.1f}' + (f' ± {float(half):.1f}' if half else '')


def _defence(row: dict) -> str:
  return row['defence'].partition(':')[0]


def _variant(row: dict) -> str:
  """A board row's variant: the entry's overrides, and X (or the order, fine-tuning) of a grid."""
  parts = [part for part in tables.split_top_level(row['defence'].partition(':')[2])
           if part]
  if row['x'] not in ('chosen', 'detector', ''):
    parts.append(f'X={row["x"]}' if tables.number_first(row['x'])[0] == 0 else row['x'])
  if row['order'] and row['order'] != 'increasing':
    parts.append(f'{row["order"]}{row["seed"]}')
  if row['order'] and row['finetune_epochs'] not in ('', '0'):  # the channel grid's axis
    parts.append(f'fine-tuned {row["finetune_epochs"]} epochs')
  return ', '.join(parts) or 'default'


def markdown(board: list[dict], made: str, entries: Sequence[str] = ()) -> str:
  """leaderboard.md: the means of ``board`` (``summarise``'s), defences in ``entries``' order."""
  summaries = sorted((row for row in board if row['model'] == 'mean'),
                     key=lambda row: _order(row, entries))
  repairs = [row for row in summaries if row['x'] != 'detector' and row['clean_acc']]
  detectors = [row for row in summaries if row['x'] == 'detector' or row['any_flagged']]
  lines = ['# Leaderboard', '', made, '',
           'Test split, percent: mean ± the half-width of its 95 % t-interval over the nets of '
           'a kind (n). DER: BackdoorBench\'s defence effectiveness rating (50: no change; 100: '
           'ASR to 0 at no cost in clean accuracy). Each net\'s own row is in leaderboard.csv '
           '(a net where an X is not reached counts in n, not in the mean); seconds: the mean '
           'time of a cell (one defence on one net).', '',
           '## Repairing defences', '',
           *tables.markdown(['defence', 'variant', 'layer', 'kind', 'n', 'clean acc', 'ASR',
                             'DER', 'seconds'],
                            [[_defence(r), _variant(r), r['layer'] or '—', r['kind'], r['nets'],
                              _cell(r, 'clean_acc'), _cell(r, 'asr'), _cell(r, 'der'),
                              _cell(r, 'seconds', False)] for r in repairs], 'llllrrrrr')]
  if detectors:
    lines += ['', '## Detectors', '',
              'Labels flagged (Neural Cleanse): nets whose target label was flagged, and nets '
              'with any label flagged (on clean nets every flag is a false positive). Input '
              'detectors (STRIP): FRR, clean test inputs flagged; FAR, poisoned test inputs '
              'passed.', '',
              *tables.markdown(['defence', 'variant', 'kind', 'n', 'target flagged',
                                'any label flagged', 'FRR', 'FAR', 'seconds'],
                               [[_defence(r), _variant(r), r['kind'], r['nets'],
                                 r['target_flagged'] or '—', r['any_flagged'] or '—',
                                 _cell(r, 'frr'), _cell(r, 'far'), _cell(r, 'seconds', False)]
                                for r in detectors], 'llllrrrrr')]
  return '\n'.join(lines) + '\n'


def _order(row: dict, entries: Sequence[str] = ()) -> tuple:
  """Defences as the config lists them (else by name), then X, order, seed, epochs, kind."""
  kind = KIND_ORDER.index(row['kind']) if row['kind'] in KIND_ORDER else len(KIND_ORDER)
  listed = list(entries).index(row['defence']) if row['defence'] in entries else len(entries)
  return (listed, row['defence'], tables.number_first(row['x']), row['order'], row['seed'],
          tables.number_first(row['finetune_epochs']), kind)


_MARKERS = ('o', 's', '^', 'D', 'v', 'P')


def plot(path: pathlib.Path, board: list[dict], entries: Sequence[str] = ()) -> None:
  """One panel per kind of net: each repairing defence's mean ASR against mean clean accuracy,
  with its 95 % intervals as error bars."""
  summaries = [row for row in board if row['model'] == 'mean' and row['x'] != 'detector'
               and row['clean_acc'] and row['asr']]
  if not summaries:
    return
  kinds = sorted({row['kind'] for row in summaries},
                 key=lambda k: KIND_ORDER.index(k) if k in KIND_ORDER else len(KIND_ORDER))
  label_of = lambda row: f'{_defence(row)} ({_variant(row)})'
  ordered = sorted(summaries, key=lambda row: _order(row, entries))  # the config's order
  # A colour a defence, a marker a variant of it: pruning's X values read as one family.
  defence_colours = dict(zip(dict.fromkeys(_defence(row) for row in ordered),
                             plt.get_cmap('tab10').colors * 3))
  variants_seen = collections.Counter()
  styles = {}
  for row in ordered:
    if label_of(row) not in styles:
      styles[label_of(row)] = (defence_colours[_defence(row)],
                               _MARKERS[variants_seen[_defence(row)] % len(_MARKERS)])
      variants_seen[_defence(row)] += 1
  columns = min(2, len(kinds))
  rows = math.ceil(len(kinds) / columns)
  width = 4.6 * columns + 3.2  # the legend's column on the right
  figure, axes = plt.subplots(rows, columns, figsize=(width, 4.2 * rows), squeeze=False)
  for panel in axes.flat[len(kinds):]:
    panel.set_visible(False)
  for panel, kind in zip(axes.flat, kinds):
    for row in (r for r in summaries if r['kind'] == kind):
      label = label_of(row)
      half = lambda field, row=row: float(row[f'{field}_ci95'] or 0)
      colour, marker = styles[label]
      panel.errorbar(float(row['clean_acc']), float(row['asr']), xerr=half('clean_acc'),
                     yerr=half('asr'), fmt=marker, color=colour, capsize=3, ms=6, label=label,
                     alpha=0.85)
    nets = max(int(r['nets']) for r in summaries if r['kind'] == kind)
    panel.set_title(f'{kind} nets (n = {nets})')
    panel.set_xlabel('clean accuracy % (test)')
    panel.set_xlim(-3, 103)  # an interval of few nets may pass 0 or 100: cut at the axes
    panel.set_ylim(-3, 103)
    panel.set_ylabel('attack success rate % (test)')
    panel.grid(alpha=0.3)
  handles = {label: plt.Line2D([], [], color=colour, marker=marker, linestyle='', label=label)
             for label, (colour, marker) in styles.items()}
  panels_right = 1 - 3.2 / width
  figure.suptitle('Leaderboard: mean over the nets of a kind, 95 % intervals')
  figure.tight_layout(rect=(0, 0, panels_right, 0.96))
  # Beside the panels, in the column kept for it (not at the figure's far edge).
  figure.legend(handles=list(handles.values()), loc='center left', fontsize=8, frameon=False,
                bbox_to_anchor=(panels_right, 0.5))
  report.save_figure(figure, path)


def write(out: pathlib.Path, rows: list[dict], entries: Sequence[str], kinds: dict[str, str]
          ) -> dict:
  """leaderboard.csv (each net's rows and the means), leaderboard.md, plots/leaderboard.png;
  what results.json records of it."""
  board = summarise(rows)
  made = _made()
  tables.write_csv(out / 'leaderboard.csv', BOARD_FIELDS, board)
  workdir.write_text(out / 'leaderboard.md', markdown(board, made, entries))
  plot(out / 'plots' / 'leaderboard.png', board, entries)
  nets = collections.Counter(kinds.values())
  return {'table': 'leaderboard.md', 'csv': 'leaderboard.csv', 'made': made,
          'defences': list(entries), 'nets_by_kind': dict(nets)}


def markdown_of(out: pathlib.Path) -> str:
  return (out / 'leaderboard.md').read_text()
