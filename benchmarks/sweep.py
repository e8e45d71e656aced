"""Times the pruning sweep three ways, side by side, in one run.

    python benchmarks/sweep.py [--images=2000] [--model=../shared/csaw/lab3_bd_weights.h5]

1. badnet's one-pass sweep (pool_3 once per image, then only the head per level,
   one compiled function);
2. the naive loop in Flax (zero conv_3's channel, full jitted predict each level);
3. the naive loop in Keras 3 (set conv_3's weights, ``model.predict`` each level),
   as the CSAW notebooks did; skipped if Keras is not installed.

All three must give the same clean accuracy at every level (checked). Each
method runs in its own subprocess so its peak resident memory is its own.
Prints one table: seconds (compile included, and a second, warm run for the
JAX methods) and peak RSS. Inputs are the real faces from ../shared/csaw,
shifted and noised to the requested count, or synthetic images if absent.
"""

import argparse
import json
import os
import pathlib
import resource
import subprocess
import sys
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = REPO.parent / 'shared' / 'csaw'


def _inputs(count: int) -> tuple[np.ndarray, np.ndarray | None]:
  faces = SHARED / 'samples' / 'mahatimadhira_recovered_test_pairs.npz'
  rng = np.random.default_rng(0)
  if faces.exists():
    pairs = np.load(faces)
    base, labels = pairs['clean'], pairs['clean_labels']
    picks = rng.integers(0, len(base), count)
    shifted = np.stack([np.roll(base[i], tuple(rng.integers(-2, 3, 2)), axis=(0, 1))
                        for i in picks]).astype(np.float64)
    images = np.clip(np.rint(shifted + rng.normal(0, 6, shifted.shape)), 0, 255)
    return images.astype(np.uint8), labels[picks]
  from tests import helpers  # pylint: disable=g-import-not-at-top
  return helpers.varied_images(count, 0), None


def _params(model_path: str):
  from badnet.core import model  # pylint: disable=g-import-not-at-top
  from badnet.io import keras_io  # pylint: disable=g-import-not-at-top
  if model_path and os.path.exists(model_path):
    return keras_io.read_params(model_path)
  return model.init_params(1283, seed=0)


def _peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_method(method: str, count: int, model_path: str) -> dict:
  """One method, in this process: returns seconds, per-level accuracy, peak RSS."""
  from badnet.core import evaluate, masks  # pylint: disable=g-import-not-at-top
  from badnet.defences import pruning  # pylint: disable=g-import-not-at-top
  images, labels = _inputs(count)
  params = _params(model_path)
  if labels is None:
    labels = evaluate.predict(params, images)
  order = pruning.pruning_order(pruning.mean_activations(params, images))
  level_masks = masks.prefix_masks(order)
  timings = []

  def once() -> np.ndarray:
    start = time.perf_counter()
    if method == 'sweep':
      classes = evaluate.sweep_predictions(params, level_masks, images)
    elif method == 'naive_flax':
      classes = np.stack([evaluate.predict(masks.prune(params, m), images)
                          for m in level_masks], 1)
    else:
      classes = _keras_loop(params, level_masks, images)
    timings.append(time.perf_counter() - start)
    return classes

  classes = once()
  if method != 'naive_keras':
    once()  # warm: compiled functions are reused
  return {'seconds': timings, 'peak_rss_mb': _peak_rss_mb(),
          'clean_acc': (100.0 * (classes == labels[:, None]).mean(0)).tolist()}


def _keras_loop(params, masks, images) -> np.ndarray:
  os.environ.setdefault('KERAS_BACKEND', 'jax')
  import keras  # pylint: disable=g-import-not-at-top
  from badnet.io import keras_io  # pylint: disable=g-import-not-at-top
  path = '/tmp/badnet_benchmark_model.h5'
  keras_io.write_keras(path, params, full_model=True)
  net = keras.models.load_model(path, compile=False)
  conv_3 = net.get_layer('conv_3')
  kernel, bias = (np.array(w) for w in conv_3.get_weights())
  columns = []
  for mask in masks:
    keep = mask.astype(bool)
    conv_3.set_weights([np.where(keep, kernel, 0), np.where(keep, bias, 0)])
    columns.append(net.predict(images.astype(np.float32), batch_size=512, verbose=0).argmax(1))
  return np.stack(columns, 1)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--images', type=int, default=2000)
  parser.add_argument('--model', default=str(SHARED / 'lab3_bd_weights.h5'))
  parser.add_argument('--method', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.method:
    print(json.dumps(run_method(args.method, args.images, args.model)))
    return
  import jax  # pylint: disable=g-import-not-at-top
  print(f'{args.images} images, model {args.model if os.path.exists(args.model) else "random"}, '
        f'devices: {jax.devices()}')
  rows = {}
  for method in ('sweep', 'naive_flax', 'naive_keras'):
    result = subprocess.run([sys.executable, __file__, f'--images={args.images}',
                             f'--model={args.model}', f'--method={method}'],
                            capture_output=True, text=True, check=False)
    if result.returncode:
      print(f'{method}: failed or unavailable: {result.stderr.strip().splitlines()[-1:]}')
      continue
    rows[method] = json.loads(result.stdout.strip().splitlines()[-1])
  print(f'{"method":<12} {"first run s":>12} {"warm run s":>11} {"peak RSS MB":>12}')
  for method, row in rows.items():
    warm = f'{row["seconds"][1]:.2f}' if len(row['seconds']) > 1 else '-'
    print(f'{method:<12} {row["seconds"][0]:>12.2f} {warm:>11} {row["peak_rss_mb"]:>12.0f}')
  accuracies = [row['clean_acc'] for row in rows.values()]
  same = all(a == accuracies[0] for a in accuracies)
  print(f'identical clean accuracy at all {len(accuracies[0])} levels: {same}')


if __name__ == '__main__':
  main()
