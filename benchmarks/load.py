"""Peak memory and time of loading a CSAW-sized float64 data file, badnet vs naive.

    python benchmarks/load.py [--images=11547] [--dir=/tmp] [--kinds=integer,blended,late]

Writes (once) files shaped like the real lab3 ``cl/valid.h5`` (float64,
N x 3 x 55 x 47, about 700 MB for 11547 images), one per kind of pixel values:

* ``integer``: raw integer pixels (like the clean CSAW files);
* ``blended``: a trigger blended into every face (0.25 * pixel + 0.75 * 18
  over the eye rows), so every image holds fractional values, like poisoned
  files made by blending;
* ``late``: integer pixels but one fractional value in the last image, the
  worst case for badnet (uint8 rows read before switching to float32).

Then it loads each file in fresh subprocesses: ``badnet.data.load_csaw_h5``
(chunked, validated; uint8 NHWC for integer files, float32 for fractional
ones) and the naive notebook way (``h5py`` read of the whole array, transpose
to NHWC, float32 for the model). Prints seconds and peak resident memory of
each, and of a process that only imports badnet (the baseline all include).
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

KINDS = ('integer', 'blended', 'late')


def _write(path: str, count: int, kind: str) -> None:
  rng = np.random.default_rng(0)
  with h5py.File(path, 'w') as handle:
    data = handle.create_dataset('data', (count, 3, 55, 47), np.float64)
    for start in range(0, count, 1000):
      rows = min(1000, count - start)
      pixels = rng.integers(0, 256, (rows, 3, 55, 47)).astype(np.float64)
      if kind == 'blended':
        pixels[:, :, 16:24, 6:41] = 0.25 * pixels[:, :, 16:24, 6:41] + 0.75 * 18
      if kind == 'late' and start + rows == count:
        pixels[-1, 0, 0, 0] = 100.5
      data[start:start + rows] = pixels
    handle['label'] = rng.integers(0, 1283, count).astype(np.float64)


def _measure(method: str, path: str) -> None:
  from badnet.io import data  # pylint: disable=g-import-not-at-top  # all pay the imports
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
  print(f'{method:<8} {seconds:>8.2f} {peak:>12.0f} {images.nbytes / 2**20:>14.0f} '
        f'{images.dtype}', flush=True)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--images', type=int, default=11547)
  parser.add_argument('--dir', default='/tmp')
  parser.add_argument('--kinds', default=','.join(KINDS))
  parser.add_argument('--file', help=argparse.SUPPRESS)
  parser.add_argument('--method', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.method:
    _measure(args.method, args.file)
    return
  print(f'{"method":<8} {"seconds":>8} {"peak RSS MB":>12} {"array held MB":>14} dtype')
  subprocess.run([sys.executable, __file__, '--file=', '--method=imports'], check=True)
  for kind in args.kinds.split(','):
    if kind not in KINDS:
      parser.error(f'unknown kind {kind!r}; expected some of {",".join(KINDS)}')
    path = os.path.join(args.dir, f'badnet_valid_f64_{kind}_{args.images}.h5')
    if not os.path.exists(path):
      _write(path, args.images, kind)
    print(f'{kind}: {path}, {os.path.getsize(path) / 2**20:.0f} MB on disk', flush=True)
    for method in ('badnet', 'naive'):
      subprocess.run([sys.executable, __file__, f'--file={path}', f'--method={method}'],
                     check=True)


if __name__ == '__main__':
  main()
