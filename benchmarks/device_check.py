"""Device check: the prune job, fine-tuning and stacked training on an accelerator, against the CPU.

    python benchmarks/device_check.py [--size=N] [--out=device_check.json]
        [--data_root=/tmp/badnet_device_check] [--model=../shared/csaw/lab3_bd_weights.h5]

On a GPU or TPU (jax's default backend), at the real lab3 size (11,547 clean
validation images) unless ``--size`` says otherwise:

1. builds, or reuses, CSAW-layout files as benchmarks/scale.py does (the lab3
   net, its 10 real faces shifted, lit and noised; the poisoned files carry
   the estimated sunglasses trigger);
2. runs the prune job on them in a fresh process (wall time);
3. computes in this process what the jobs compute, and the same again in a
   fresh process on the host CPU (``JAX_PLATFORMS=cpu``):
   - the conv_3 sweep: the class of every clean and poisoned validation image
     at every pruning level, and B and four pruned nets on both test files;
   - fine-tuning with configs/fine_prune.py's recipe (2 epochs on the clean
     validation images, a pruned net's channels held at zero): the step's
     images/s, and the tuned net's classes on the clean test file;
   - a stacked point: three pruned nets fine-tuned for an epoch in one
     vmapped step and one after another (``train.fit_many``), timed, and
     their classes;
4. writes one JSON: the backend, the timings on each, and for every array of
   classes how many entries differ between the accelerator and the CPU (and
   between stacked and in-turn training).

The sweep's classes should match exactly (float32 at 'highest' precision
everywhere); trained nets may differ in a few classes, since rounding in
training compounds (reported, not failed). On a CPU alone it says that no
accelerator is present and runs at ``--size`` 300 by default, CPU against
CPU: a check of the script itself, which tests/test_device_check.py runs.
"""

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import scale  # pylint: disable=g-import-not-at-top
from badnet import defend  # pylint: disable=g-import-not-at-top
from badnet.core import evaluate, masks, train  # pylint: disable=g-import-not-at-top
from badnet.defences import pruning, sweep  # pylint: disable=g-import-not-at-top
from badnet.io import data, keras_io  # pylint: disable=g-import-not-at-top
from configs import fine_prune  # pylint: disable=g-import-not-at-top

REAL_SIZE = 11547
CPU_SIZE = 300
PRUNED_LEVELS = (20, 40, 50, 55)  # B'_X at these many conv_3 channels pruned
STACKED_LEVELS = (20, 40, 50)
FILES = {'clean_valid': 'cl/valid.h5', 'poisoned_valid': 'bd/bd_valid.h5',
         'clean_test': 'cl/test.h5', 'poisoned_test': 'bd/bd_test.h5'}


def _seconds(fn):
  start = time.perf_counter()
  result = fn()
  return result, time.perf_counter() - start


def compute(folder: pathlib.Path, model_path: pathlib.Path) -> tuple[dict, dict]:
  """The jobs' classes on this process's default backend: (name -> int array, timings)."""
  params = keras_io.read_params(model_path)
  splits = {key: data.load_csaw_h5(folder / name) for key, name in FILES.items()}
  classes, timings = {}, {}

  def sweep_all():
    features = {key: sweep.features(params, splits[key].images)
                for key in ('clean_valid', 'poisoned_valid')}
    order = pruning.pruning_order(features['clean_valid'].mean_activations())
    return order, {key: sweep.prefix_classes(params, found, order)
                   for key, found in features.items()}

  sweep_all()  # compiles
  (order, swept), timings['sweep_s'] = _seconds(sweep_all)
  classes.update({f'sweep/{key}': value for key, value in swept.items()})
  level_masks = masks.prefix_masks(order)
  for level in (0, *PRUNED_LEVELS):
    for key in ('clean_test', 'poisoned_test'):
      classes[f'pruned_{level}/{key}'] = evaluate.predict(
          masks.prune(params, level_masks[level]), splits[key].images)

  clean, test = splits['clean_valid'], splits['clean_test'].images
  tuning = defend.settings_of(fine_prune.get_config()).finetune  # its recipe
  recipe = tuning.recipe(epochs=2)
  mask = level_masks[PRUNED_LEVELS[0]]
  (tuned, history), seconds = _seconds(lambda: train.fit(
      params, clean.images, clean.labels, recipe, channel_mask=mask, held={'conv_3': mask},
      name='device check'))
  steps = len(clean.labels) // recipe.batch_size
  timings['fine_tune_s'] = seconds
  timings['train_images_per_s'] = steps * recipe.batch_size / history[-1]['seconds']
  classes['fine_tuned/clean_test'] = evaluate.predict(tuned, test, channel_mask=mask)

  one_epoch = tuning.recipe(epochs=1)
  stacked_masks = [level_masks[level] for level in STACKED_LEVELS]
  for stacking in ('vmap', 'loop'):
    nets, timings[f'stacked_{stacking}_s'] = _seconds(lambda stacking=stacking: train.fit_many(
        [params] * len(stacked_masks), clean.images, clean.labels, one_epoch,
        channel_masks=stacked_masks, held=[{'conv_3': m} for m in stacked_masks],
        stacking=stacking))
    for level, (net, _), net_mask in zip(STACKED_LEVELS, nets, stacked_masks):
      classes[f'stacked_{stacking}_{level}/clean_test'] = evaluate.predict(
          net, test, channel_mask=net_mask)
  return classes, timings


def _differences(ours: dict, theirs: dict) -> dict[str, int]:
  return {key: int(np.sum(np.asarray(ours[key]) != np.asarray(theirs[key]))) for key in ours}


def _host_cpu(folder: pathlib.Path, model_path: pathlib.Path) -> tuple[dict, dict]:
  """``compute`` in a fresh process on the host CPU."""
  with tempfile.TemporaryDirectory(prefix='badnet_device_check_') as tmp:
    out = pathlib.Path(tmp) / 'cpu.npz'
    env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
    run = subprocess.run([sys.executable, __file__, '--worker', str(folder), str(model_path),
                          str(out)], env=env, capture_output=True, text=True, check=False)
    if run.returncode:
      sys.exit(f'the host CPU run failed:\n{run.stderr[-3000:]}')
    with np.load(out) as stored:
      arrays = dict(stored)
  timings = json.loads(str(arrays.pop('timings')))
  return arrays, timings


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--size', type=int, default=None)
  parser.add_argument('--out', default='device_check.json')
  parser.add_argument('--data_root', default='/tmp/badnet_device_check')
  parser.add_argument('--model', default=str(scale.SHARED / 'lab3_bd_weights.h5'))
  parser.add_argument('--skip_job', action='store_true', help='skip the timed prune job')
  args = parser.parse_args(argv)
  backend = jax.default_backend()
  accelerator = backend != 'cpu'
  size = args.size or (REAL_SIZE if accelerator else CPU_SIZE)
  if not accelerator:
    print(f'No GPU or TPU: jax runs on the CPU ({os.cpu_count()} cores). Running at size {size}, '
          f'CPU against CPU: this checks the script, not a device.', flush=True)
  model_path = pathlib.Path(args.model)
  params = keras_io.read_params(model_path)
  folder = scale.build_data(pathlib.Path(args.data_root), size, False, params)
  report = {'backend': backend, 'device': jax.devices()[0].device_kind,
            'accelerator': accelerator, 'size': size, 'counts': scale.counts_for(size),
            'model': str(model_path)}
  if not args.skip_job:
    job = scale.run_job(model_path, folder)
    report['prune_job'] = {'wall_s': job['wall'], 'sweep_s': job['sweep'],
                           'peak_rss_mb': job['rss_mb']}
    print(f'prune job on {backend}: {job["wall"]:.1f} s wall', flush=True)
  ours, report['timings'] = compute(folder, model_path)
  print(f'{backend}: {report["timings"]}', flush=True)
  cpu, report['cpu_timings'] = _host_cpu(folder, model_path)
  print(f'host cpu: {report["cpu_timings"]}', flush=True)
  report['mismatches'] = _differences(ours, cpu)
  report['entries'] = {key: int(np.asarray(value).size) for key, value in ours.items()}
  report['stacked_vs_in_turn'] = {
      str(level): int(np.sum(ours[f'stacked_vmap_{level}/clean_test']
                             != ours[f'stacked_loop_{level}/clean_test']))
      for level in STACKED_LEVELS}
  path = pathlib.Path(args.out)
  path.write_text(json.dumps(report, indent=1))
  print(json.dumps({key: report[key] for key in ('backend', 'device', 'size', 'mismatches',
                                                  'stacked_vs_in_turn')}, indent=1))
  print(f'wrote {path}')
  return report


def _worker(folder: str, model_path: str, out: str) -> None:
  classes, timings = compute(pathlib.Path(folder), pathlib.Path(model_path))
  np.savez(out, timings=json.dumps(timings), **classes)


if __name__ == '__main__':
  if len(sys.argv) == 5 and sys.argv[1] == '--worker':
    _worker(*sys.argv[2:])
  else:
    main()
