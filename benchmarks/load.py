"""Peak memory and time of loading a CSAW-sized float64 data file, badnet vs naive.

    python benchmarks/load.py [--images=11547] [--file=/tmp/badnet_valid_f64.h5]

Writes (once) a file shaped like the real lab3 ``cl/valid.h5`` (float64,
N x 3 x 55 x 47, about 700 MB for 11547 images), then loads it in two fresh
subprocesses: ``badnet.data.load_csaw_h5`` (chunked, validated, uint8 NHWC) and
the naive notebook way (``h5py`` read of the whole array, transpose to NHWC,
float32 for the model). Prints seconds and peak resident memory of each, and
of a process that only imports badnet (the baseline both include).
"""

import argparse
import os
import pathlib
import resource
import subprocess
import sys
import time

import h5py
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _write(path: str, count: int) -> None:
  rng = np.random.default_rng(0)
  with h5py.File(path, 'w') as handle:
    data = handle.create_dataset('data', (count, 3, 55, 47), np.float64)
    for start in range(0, count, 1000):
      rows = min(1000, count - start)
      data[start:start + rows] = rng.integers(0, 256, (rows, 3, 55, 47)).astype(np.float64)
    handle['label'] = rng.integers(0, 1283, count).astype(np.float64)


def _measure(method: str, path: str) -> None:
  from badnet import data  # pylint: disable=g-import-not-at-top  # both pay the imports
  start = time.perf_counter()
  if method == 'imports':
    images = np.zeros(0, np.uint8)
  elif method == 'badnet':
    images = data.load_csaw_h5(path, 1283).images
  else:
    with h5py.File(path, 'r') as handle:
      images = np.array(handle['data']).transpose(0, 2, 3, 1).astype(np.float32)
  seconds = time.perf_counter() - start
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  print(f'{method:<8} {seconds:>8.2f} {peak:>12.0f} {images.nbytes / 2**20:>14.0f}')


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--images', type=int, default=11547)
  parser.add_argument('--file', default='/tmp/badnet_valid_f64.h5')
  parser.add_argument('--method', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.method:
    _measure(args.method, args.file)
    return
  if not os.path.exists(args.file):
    _write(args.file, args.images)
  print(f'{args.file}: {os.path.getsize(args.file) / 2**20:.0f} MB on disk')
  print(f'{"method":<8} {"seconds":>8} {"peak RSS MB":>12} {"array held MB":>14}')
  for method in ('imports', 'badnet', 'naive'):
    subprocess.run([sys.executable, __file__, f'--file={args.file}', f'--method={method}'],
                   check=True)


if __name__ == '__main__':
  main()
