"""The STRIP job's plot: the entropy histograms of clean and poisoned inputs, and the threshold."""

import pathlib

import matplotlib.pyplot as plt  # on the Agg backend, which importing report selects
import numpy as np

from badnet.io import report

BINS = 60


def plot_entropies(path: pathlib.Path, fit: np.ndarray, clean: np.ndarray,
                   poisoned: np.ndarray, fixed: dict, rates: dict) -> None:
  """Histograms (% of each set per bin) of STRIP entropies, the fitted normal and the threshold.
  ``fit``: the clean validation entropies the threshold was fitted to; ``clean``, ``poisoned``:
  the test inputs'. ``fixed``, ``rates``: results.json's ``strip``, ``test``."""
  fit, clean, poisoned = (np.asarray(v, np.float64) for v in (fit, clean, poisoned))
  high = max(max(float(v.max()) for v in (fit, clean, poisoned) if len(v)), fixed['threshold'])
  edges = np.linspace(0.0, max(high * 1.02, 1e-3), BINS + 1)
  width = edges[1] - edges[0]
  figure, axes = plt.subplots(figsize=(7.5, 4.2))
  per_bin = lambda values: 100.0 * np.histogram(values, edges)[0] / max(len(values), 1)  # in %
  fit_bars, clean_bars, poisoned_bars = (per_bin(v) for v in (fit, clean, poisoned))
  axes.bar(edges[:-1], clean_bars, width, align='edge', color='tab:blue', alpha=0.55,
           label=f'clean test ({len(clean)})')
  axes.bar(edges[:-1], poisoned_bars, width, align='edge', color='tab:red', alpha=0.55,
           label=f'poisoned test ({len(poisoned)})')
  axes.stairs(fit_bars, edges, color='tab:blue', linewidth=1,
              label=f'clean valid, threshold fitted to these ({len(fit)})')
  mean, std = fixed['normal_fit']['mean'], fixed['normal_fit']['std']
  if std > 0:
    grid = np.linspace(edges[0], edges[-1], 400)
    density = np.exp(-0.5 * ((grid - mean) / std) ** 2) / (std * np.sqrt(2 * np.pi))
    axes.plot(grid, 100 * density * width, color='navy', linestyle=':', linewidth=1.2,
              label='normal fitted to clean valid')
  # A poisoned spike near 0 can be many times the clean peak: cap the axis so
  # the clean histogram stays readable, and print the clipped bar's height.
  top = 1.6 * max(float(clean_bars.max()), float(fit_bars.max()), 1.0)
  if poisoned_bars.max() > top:
    tallest = int(np.argmax(poisoned_bars))
    axes.annotate(f'{poisoned_bars[tallest]:.0f} %', (edges[tallest] + width / 2, top),
                  xytext=(4, -12), textcoords='offset points', color='tab:red', fontsize=8)
  axes.axvline(fixed['threshold'], color='black', linestyle='--', linewidth=1.2,
               label=f'threshold {fixed["threshold"]:.3f} bits '
                     f'(clean valid FRR target {fixed["frr_target"]:g} %)')
  axes.set(xlabel=f'mean entropy of the predictions over N = {fixed["overlays"]} blends (bits)',
           ylabel='% of the set, per bin', ylim=(0, top))
  frr, far = (rates['STRIP'][key] for key in ('false_rejection_rate', 'false_acceptance_rate'))
  axes.set_title(f'STRIP, blend {fixed["blend"]}: test FRR {frr:.2f} %, FAR {far:.2f} % '
                 f'(flagged: left of the threshold)', fontsize=10)
  axes.legend(loc='upper left', bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
  axes.grid(alpha=0.3)
  report.save_figure(figure, path)
