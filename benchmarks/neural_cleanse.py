"""Neural Cleanse: labels reverse engineered together (vmapped) against one label at a time.

    python benchmarks/neural_cleanse.py [--loop_labels=10] [--lab3_labels=40] [--lab3_steps=20]
        [--slots=10] [--skip_all]

Both ways run the same jitted ``tick`` of badnet/defences/neural_cleanse.py
(one batch's update and the paper's bookkeeping): vmapped over ``--slots``
labels, or over one (the loop over labels). Compilation is done first and
timed on its own. Settings are configs/neural_cleanse.py's defaults.

1. The shipped BadNets net (100 labels) on the job's optimisation images (the
   clean validation split less the held-out 20 %): every label vmapped, as the
   job runs it (wall time of the optimisation), then the first
   ``loop_labels`` labels one at a time and the same labels vmapped. Early
   stopping is on, so labels run different numbers of steps; both ways give
   the same steps per label.
2. The real lab3 net (1283 labels, ../shared/csaw or $BADNET_CSAW_DIR) with
   its 10 real faces as the clean data (enough to time a step): the first
   ``lab3_labels`` labels vmapped, then one at a time, early stopping off and
   ``lab3_steps`` steps each; the time per label at the default
   ``neural_cleanse.steps``
   and for all 1283 labels is extrapolated from the time per label-step.
"""

import argparse
import dataclasses
import os
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from badnet.core import model  # pylint: disable=g-import-not-at-top
from badnet.defences import base  # pylint: disable=g-import-not-at-top
from badnet.defences import neural_cleanse as nc  # pylint: disable=g-import-not-at-top
from badnet import defend, inputs  # noqa: E402
from badnet.io import data, keras_io  # pylint: disable=g-import-not-at-top
from configs import neural_cleanse as nc_config  # pylint: disable=g-import-not-at-top

CSAW = pathlib.Path(os.environ.get('BADNET_CSAW_DIR') or
                    pathlib.Path(__file__).resolve().parents[2] / 'shared' / 'csaw')


def _load() -> str:
  return '/'.join(f'{value:.1f}' for value in os.getloadavg())


def _compile(params, images, settings: nc.Reversal, slots: int) -> float:
  """Compiles the jitted tick for ``slots`` labels (what the timed runs reuse); seconds."""
  start = time.perf_counter()
  ticks, inits, finished, results = nc._compiled(settings, model.DEFAULT_PRECISION)  # pylint: disable=protected-access
  labels = jnp.arange(slots)
  state = ticks(inits(labels, 0), params, images, labels, 0)
  jax.block_until_ready(results(state))
  jax.block_until_ready(finished(state))
  return time.perf_counter() - start


def _timed(params, images, labels, settings, slots) -> tuple[float, dict]:
  start = time.perf_counter()
  found = nc.reverse_engineer_labels(params, images, labels, 0, settings, slots)
  return time.perf_counter() - start, found


def _compare(name, params, images, labels, settings, slots, per_label_steps=None):
  """The labels vmapped (``slots`` together) and one at a time: seconds per label each."""
  params, images = jax.device_put(params), jax.device_put(images)
  compiled = {n: _compile(params, images, settings, n) for n in (slots, 1)}
  print(f'{name}: compiled in {compiled[slots]:.1f} s ({slots} slots), '
        f'{compiled[1]:.1f} s (1)', flush=True)
  rows = {}
  for way, n in (('vmapped', slots), ('one at a time', 1)):
    before = _load()
    seconds, found = _timed(params, images, labels, settings, n)
    steps = int(found['steps'].sum())
    rows[way] = (seconds, found)
    note = '' if per_label_steps is None else (
        f'; {seconds / steps * per_label_steps:.2f} s a label at {per_label_steps} steps')
    print(f'  {way:>13}: {len(labels)} labels, {steps} label-steps in {seconds:.1f} s: '
          f'{seconds / len(labels):.2f} s a label, {1e3 * seconds / steps:.1f} ms a '
          f'label-step{note} (load {before} -> {_load()})', flush=True)
  (vmapped, together), (loop, alone) = rows['vmapped'], rows['one at a time']
  same = bool(np.array_equal(together['steps'], alone['steps']))
  diff = float(np.abs(together['l1'] - alone['l1']).max())
  print(f'  vmapped / one at a time: {loop / vmapped:.2f}x faster; same steps per label: '
        f'{same}; largest L1 norm difference {diff:.3g}', flush=True)
  return rows


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--loop_labels', type=int, default=10)
  parser.add_argument('--lab3_labels', type=int, default=40)
  parser.add_argument('--lab3_steps', type=int, default=20)
  parser.add_argument('--slots', type=int, default=10, help='labels vmapped together')
  parser.add_argument('--skip_all', action='store_true',
                      help='skip the run of all 100 labels (the job times it too)')
  args = parser.parse_args()
  defence = defend.settings_of(nc_config.get_config())
  settings = defence.reversal()
  slots = args.slots
  print(f'{jax.devices()[0].platform}, {os.cpu_count()} CPUs; settings {settings}', flush=True)

  model_path, data_dir = inputs.shipped_benchmark('badnets', quiet=True)
  params = keras_io.read_params(model_path)
  clean = data.load_csaw_h5(data_dir / 'cl' / 'valid.h5')
  fit_rows, _ = base.split_for_fine_tuning(clean.labels, defence.holdout_fraction,
                                           defence.seed)
  images = clean.images[fit_rows]
  if not args.skip_all:
    device_params, device_images = jax.device_put(params), jax.device_put(images)
    compiled = _compile(device_params, device_images, settings, slots)
    before = _load()
    seconds, found = _timed(device_params, device_images, np.arange(100), settings, slots)
    index, _, _ = nc.anomaly_index(found['l1'])
    print(f'Shipped BadNets net, all 100 labels vmapped ({slots} slots, {len(images)} images): '
          f'{seconds:.1f} s after {compiled:.1f} s compiling; {int(found["steps"].sum())} '
          f'label-steps (load {before} -> {_load()}); flagged: '
          f'{np.flatnonzero(nc.flag(index)).tolist()}', flush=True)
  _compare('Shipped BadNets net, the first labels', params, images,
           np.arange(args.loop_labels), settings, slots)

  lab3 = CSAW / 'lab3_bd_weights.h5'
  faces = CSAW / 'samples' / 'mahatimadhira_recovered_test_pairs.npz'
  if not (lab3.is_file() and faces.is_file()):
    print(f'No lab3 net or faces under {CSAW}: skipping the lab3 measurement.')
    return
  with np.load(faces) as pairs:
    face_images = pairs['clean']
  fixed = dataclasses.replace(settings, steps=args.lab3_steps, early_stop_patience=0)
  lab3_params = keras_io.read_params(lab3)
  labels = np.arange(args.lab3_labels)
  rows = _compare(f'lab3 net (1283 labels), 10 real faces, {args.lab3_steps} steps a label',
                  lab3_params, face_images, labels, fixed, slots, settings.steps)
  for way, (seconds, found) in rows.items():
    per_step = seconds / int(found['steps'].sum())
    print(f'  {way}: all 1283 labels at {settings.steps} steps: '
          f'{per_step * settings.steps * 1283 / 60:.0f} min', flush=True)


if __name__ == '__main__':
  main()
