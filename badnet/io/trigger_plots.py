"""The Neural Cleanse job's plots: the labels' mask norms, and the reversed triggers."""

import pathlib

import matplotlib

matplotlib.use('Agg')  # files only; no display is needed or assumed
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np

from badnet.io import report

MAX_FLAGGED_SHOWN = 6
GREY = 128.0  # the background the triggers are shown on


def plot_norms(path: pathlib.Path, labels: np.ndarray, norms: np.ndarray, flagged: np.ndarray,
               index: np.ndarray, median: float, mad: float, threshold: float, title: str) -> None:
  """Each label's mask norm (left) and their histogram (right); flagged labels, median, cut.

  ``index``: the labels' anomaly index; ``mad`` is already x 1.4826; ``threshold`` flags."""
  labels, norms = np.asarray(labels), np.asarray(norms, np.float64)
  flagged = np.asarray(flagged, bool)
  cut = median - threshold * mad  # the norm below which a label is flagged
  figure, (axes, side) = plt.subplots(1, 2, figsize=(10.5, 4.4), sharey=True,
                                      gridspec_kw={'width_ratios': [4, 1], 'wspace': 0.04})
  axes.scatter(labels[~flagged], norms[~flagged], s=14 if len(labels) <= 200 else 4,
               color='tab:blue', label=f'not flagged ({int((~flagged).sum())})')
  axes.scatter(labels[flagged], norms[flagged], s=60, color='tab:red', marker='v', zorder=3,
               label=f'flagged ({int(flagged.sum())})')
  for label, norm, value in zip(labels[flagged], norms[flagged], np.asarray(index)[flagged]):
    axes.annotate(f'{label} (index {value:.1f})', (label, norm), textcoords='offset points',
                  xytext=(6, -4), fontsize=8, color='tab:red')
  for where in (axes, side):
    where.axhline(median, color='black', linewidth=1,
                  label=f'median {median:.0f}' if where is axes else None)
    where.axhline(cut, color='tab:red', linestyle='--', linewidth=1,
                  label=(f'median - {threshold:g} MAD = {cut:.0f}: flagged below'
                         if where is axes else None))
  side.hist(norms, bins=min(40, max(5, len(norms) // 3)), orientation='horizontal',
            color='tab:blue', alpha=0.6)
  side.set_xlabel('labels')
  axes.set_ylim(min(0.0, cut * 1.08), max(float(norms.max()), median) * 1.08)
  axes.set_xlabel('label')
  axes.set_ylabel('L1 norm of the reversed mask (pixels)')
  figure.suptitle(f'Neural Cleanse: the smallest trigger per label ({title})', fontsize=10, y=1.04)
  axes.legend(loc='lower left', bbox_to_anchor=(0.0, 1.07), ncol=4, fontsize=8, frameon=False)
  axes.grid(alpha=0.3)
  report.save_figure(figure, path)


def shown_labels(norms: np.ndarray, flagged: np.ndarray) -> list[int]:
  """Rows to show: the flagged (smallest norm first), then unflagged at norm quantiles 0 to .75."""
  norms, flagged = np.asarray(norms), np.asarray(flagged, bool)
  order = np.argsort(norms, kind='stable')
  chosen = [int(i) for i in order if flagged[i]][:MAX_FLAGGED_SHOWN]
  others = [int(i) for i in order if not flagged[i]]
  picks = dict.fromkeys(int(round(q * (len(others) - 1))) for q in (0, 0.25, 0.5, 0.75))
  return chosen + [others[p] for p in picks] if others else chosen


def plot_triggers(path: pathlib.Path, labels: np.ndarray, masks: np.ndarray,
                  patterns: np.ndarray, norms: np.ndarray, index: np.ndarray,
                  flagged: np.ndarray, example: np.ndarray | None, title: str) -> None:
  """A column per shown label: the trigger on grey, its mask, and a clean face with it.

  ``patterns`` are in 0..255; ``example``: a clean image to stamp (None: no such row)."""
  columns = shown_labels(norms, flagged)
  rows = 3 if example is not None else 2
  figsize = (1.55 * len(columns) + 0.9, 1.95 * rows + 0.7)
  figure, panels = plt.subplots(rows, len(columns), figsize=figsize, squeeze=False)
  for column, i in enumerate(columns):
    mask, pattern = np.asarray(masks[i], np.float32), np.asarray(patterns[i], np.float32)
    stamped_on = lambda background: np.clip(np.rint(
        (1 - mask[..., None]) * background + mask[..., None] * pattern), 0, 255).astype(np.uint8)
    # On grey, so that a dark trigger (sunglasses) shows as well as a bright one.
    images = [stamped_on(GREY), mask]
    if example is not None:
      images.append(stamped_on(np.asarray(example, np.float32)))
    for row, image in enumerate(images):
      gray = dict(cmap='gray', vmin=0, vmax=1) if image.ndim == 2 else {}
      panels[row, column].imshow(image, interpolation='nearest', **gray)
      panels[row, column].set(xticks=[], yticks=[])
    state = 'FLAGGED' if flagged[i] else 'not flagged'
    value = '' if not np.isfinite(index[i]) else f'\nindex {index[i]:.1f}'
    panels[0, column].set_title(f'label {labels[i]}\n{state}\nL1 {norms[i]:.0f}{value}',
                                fontsize=8, color='tab:red' if flagged[i] else 'black')
  for row, name in enumerate(['trigger on grey', 'mask (white = 1)', 'on a clean face'][:rows]):
    panels[row, 0].set_ylabel(name, fontsize=8)
  figure.suptitle(f'Reversed triggers: flagged labels, then unflagged ones from the smallest '
                  f'norm to the 75th percentile ({title})', fontsize=9)
  figure.tight_layout()
  report.save_figure(figure, path)
