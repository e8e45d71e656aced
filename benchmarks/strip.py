"""STRIP on the shipped nets: each blend's clean-data figures, its rates, and the time it takes.

    python benchmarks/strip.py [--nets=badnets,pruning_aware] [--blends=add,saturate,average] \
        [--overlays=100] [--frr=1] [--batch_size=100]

For each net, blend and N (``--overlays``, comma-separated for several), as
the strip job does: the threshold from half the clean validation split
(overlays from the other half), then every clean and poisoned test input
superimposed with N overlays. Prints, per row, first what needs clean data
only (the share of summed pixel values above 255, which 'saturate' clips, the clean
entropies' mean and standard deviation, the threshold and the rate it
rejects of the inputs it was fitted to), then the test split's false
rejection and false acceptance for the paper's normal threshold and for the
empirical percentile, and the seconds the test inputs took (the step is
compiled while fitting, so this is the steady rate) with blends per second.
The first line names the processor (``lscpu``).
"""

import argparse
import pathlib
import subprocess
import sys
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from badnet.benchmark import shipped  # noqa: E402  pylint: disable=g-import-not-at-top
from badnet.core import evaluate  # noqa: E402  pylint: disable=g-import-not-at-top
from badnet.defences import strip  # noqa: E402  pylint: disable=g-import-not-at-top
from badnet import inputs  # noqa: E402
from badnet.io import data, keras_io, tables  # noqa: E402  pylint: disable=g-import-not-at-top


def _processor() -> str:
  try:
    listing = subprocess.run(['lscpu'], capture_output=True, text=True, check=True).stdout
  except (OSError, subprocess.CalledProcessError):
    return 'unknown processor'
  names = [line.split(':', 1)[1].strip() for line in listing.splitlines()
           if line.startswith('Model name')]
  return names[0] if names else 'unknown processor'


def _saturated(images: np.ndarray, pool: np.ndarray, overlays: int, seed: int) -> float:
  """Percent of summed pixel values above 255, which 'saturate' clips (the first 200 inputs)."""
  draws = strip.draw_overlays(min(len(images), 200), len(pool), overlays, seed)
  total = images[:len(draws), None].astype(np.int32) + pool[draws]
  return 100.0 * float((total > 255).mean())


def _row(net: str, blend: str, overlays: int, frr: float, batch_size: int,
         clean_valid: data.Dataset, tests: dict[str, data.Dataset]) -> list:
  params = keras_io.read_params(shipped.SHIPPED_NETS[net])
  settings = strip.Blending(overlays, blend, 0, batch_size)
  pool_rows, fit_rows = strip.split(clean_valid.labels, 0.5, 0)
  pool = clean_valid.images[pool_rows]
  fitted = strip.entropies(params, clean_valid.images[fit_rows], pool, settings)
  cut, mean, std = strip.threshold(fitted, frr)
  quantile_cut, _, _ = strip.threshold(fitted, frr, 'quantile')
  start = time.perf_counter()
  scores = {key: strip.entropies(params, split.images, pool, settings)
            for key, split in tests.items()}
  seconds = time.perf_counter() - start
  count = sum(len(split) for split in tests.values())
  rates = lambda threshold: strip.rates(strip.flag(scores['clean_test'], threshold),
                                        strip.flag(scores['poisoned_test'], threshold))
  normal, quantile = rates(cut), rates(quantile_cut)
  fmt = lambda value: f'{value:.2f}'
  return [net, blend, overlays,
          fmt(_saturated(clean_valid.images[fit_rows], pool, overlays, 0)),
          f'{mean:.3f} / {std:.3f}', f'{cut:.3f}',
          fmt(evaluate.percent(strip.flag(fitted, cut))),
          fmt(normal['false_rejection_rate']), fmt(normal['false_acceptance_rate']),
          f'{quantile_cut:.3f}', fmt(quantile['false_rejection_rate']),
          fmt(quantile['false_acceptance_rate']),
          f'{seconds:.1f} ({count} inputs)', f'{count * overlays / seconds:.0f}']


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--nets', default='badnets,pruning_aware')
  parser.add_argument('--blends', default='add,saturate,average')
  parser.add_argument('--overlays', default='100', help='N, comma-separated for several')
  parser.add_argument('--frr', type=float, default=1.0)
  parser.add_argument('--batch_size', type=int, default=100)
  args = parser.parse_args()
  _, data_dir = inputs.shipped_benchmark(quiet=True)
  load = lambda key: data.load_csaw_h5(data_dir / inputs.CSAW_FILES[key])
  clean_valid = load('clean_valid')
  tests = {key: load(key) for key in ('clean_test', 'poisoned_test')}
  print(f'{_processor()}; shipped benchmark data in {data_dir}; FRR target {args.frr:g} %',
        flush=True)
  header = ['net', 'blend', 'N', 'sum > 255 %', 'clean valid mean / std (bits)',
            'normal threshold', 'its FRR on the fit %', 'test FRR %', 'test FAR %',
            'percentile threshold', 'test FRR %', 'test FAR %', 'test s', 'blends/s']
  rows = []
  for net in args.nets.split(','):
    for blend in args.blends.split(','):
      for overlays in (int(n) for n in args.overlays.split(',')):
        rows.append(_row(net, blend, overlays, args.frr, args.batch_size, clean_valid, tests))
        print(' | '.join(str(cell) for cell in rows[-1]), flush=True)
  print('\n'.join(['', *tables.markdown(header, rows, 'lll' + 'r' * 11)]))


if __name__ == '__main__':
  main()
