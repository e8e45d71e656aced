"""Scale benchmark: the whole prune job at the real CSAW lab3 data size, against the naive loops.

    python benchmarks/scale.py [--sizes=11547] [--keras_steps=3] [--jax_steps=3]
        [--model=../shared/csaw/lab3_bd_weights.h5] [--data_root=/tmp/badnet_scale]
        [--integer_poisoned]

For each size N (clean validation images; the other three files scale by the same
factor from the real 11547 / 12830 / 10264 / 12830):

1. builds, once (cached under --data_root, reused when its marker file exists), a
   CSAW-layout folder of float64 N x 3 x 55 x 47 files: the 10 real lab3 faces
   shifted, lit and noised; clean files labelled with the net's own predictions,
   poisoned files with the real sunglasses trigger blended in (non-integer pixels
   like the real bd files, unless --integer_poisoned), labelled 0. Build time is
   printed apart: it is not part of the job.
2. runs ``main.py --config=configs/prune.py`` on it in a fresh process, as a user
   would: wall time, peak RSS and the job's own "Sweep done in X s".
3. times the CSAW notebooks' naive loop (zero one more conv_3 channel, predict clean
   and poisoned valid) in Keras 3 + TensorFlow (batch 32; skipped if TensorFlow is
   not installed) and in JAX (badnet.core.masks.prune + badnet.core.evaluate.predict), a few
   steps each, scaled to 60.

Prints this machine's float32 matmul rate (jax.jit and numpy, GMAC/s), then one
table per size: the job's wall, sweep time and peak RSS, both naive estimates and
their ratios to the job, images x levels per second, and the arithmetic floor (the
multiply-adds the job must do / the jax matmul rate). Ends with the job's seconds
per 1000 clean validation images at each size, to read off linearity.

Run it in a venv with the `bench` extra (TensorFlow), kept apart from the project's:
``python3.11 -m venv /work/venv_bench && /work/venv_bench/bin/pip install -e '.[test,bench]'``.
"""

import argparse
import importlib.util
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import time

import h5py
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = pathlib.Path(os.environ.get('BADNET_CSAW_DIR', REPO.parent / 'shared' / 'csaw'))

# The real lab3 file sizes; every size scales all four by N / 11547.
REAL_COUNTS = {'cl/valid.h5': 11547, 'cl/test.h5': 12830,
               'bd/bd_valid.h5': 10264, 'bd/bd_test.h5': 12830}
VALID_FILES = ('cl/valid.h5', 'bd/bd_valid.h5')
LEVELS = 61          # the sweep: 0..60 channels pruned
TEST_LEVELS = 5      # B and B'_X for the 4 default thresholds
NAIVE_STEPS = 60     # the notebooks' loop: one channel per step
CHUNK = 1024         # images written per h5py write: ~64 MB of float64
MARKER = 'COMPLETE'

# Multiply-adds per image, from badnet/model.py (output positions x kernel volume x filters).
FEATURE_MACS = (52 * 44 * 20 * 4 * 4 * 3      # conv_1 on 55x47x3
                + 24 * 20 * 40 * 3 * 3 * 20   # conv_2 on pool_1 26x22x20
                + 10 * 8 * 60 * 3 * 3 * 40)   # conv_3 on pool_2 12x10x40


def head_macs(channels: int = 60) -> int:
  """The head's multiply-adds per row when it reads ``channels`` of pool_3's 60."""
  return (5 * 4 * channels * 160                # fc_1 on flattened pool_3 5x4xC
          + 4 * 3 * 80 * 2 * 2 * channels       # conv_4 on pool_3
          + 960 * 160                           # fc_2 on flattened conv_4 4x3x80
          + 160 * 1283)                         # output


HEAD_MACS = head_macs()


def counts_for(size: int) -> dict[str, int]:
  return {name: round(real * size / REAL_COUNTS['cl/valid.h5'])
          for name, real in REAL_COUNTS.items()}


def _faces(rng: np.random.Generator, base: np.ndarray, count: int) -> np.ndarray:
  """Real faces shifted up to 3 px, under a gain of 0.8..1.2, noised; integer float64 NHWC."""
  picks = rng.integers(0, len(base), count)
  shifts = rng.integers(-3, 4, (count, 2))
  faces = np.stack([np.roll(base[i], tuple(s), axis=(0, 1))
                    for i, s in zip(picks, shifts)]).astype(np.float64)
  faces *= rng.uniform(0.8, 1.2, (count, 1, 1, 1))
  return np.clip(np.rint(faces + rng.normal(0, 6, faces.shape)), 0, 255)


def _write_file(path: pathlib.Path, count: int, seed: int, poisoned: bool,
                integer_poisoned: bool, params) -> None:
  """One CSAW file, written CHUNK images at a time so no full float64 array is ever held."""
  from badnet.core import evaluate  # pylint: disable=g-import-not-at-top
  base = np.load(SHARED / 'samples' / 'mahatimadhira_recovered_test_pairs.npz')['clean']
  trigger = np.load(SHARED / 'samples' / 'sunglasses_trigger_estimate_from_mahatimadhira_pairs.npz')
  mask, alpha = trigger['mask'][..., None], trigger['alpha_face'][..., None]
  colour = trigger['trigger_rgb']
  rng = np.random.default_rng(seed)
  labels = np.zeros(count, np.float64)  # poisoned: all the target, 0
  path.parent.mkdir(parents=True, exist_ok=True)
  with h5py.File(path, 'w') as handle:
    data = handle.create_dataset('data', (count, 3, 55, 47), np.float64)
    for start in range(0, count, CHUNK):
      faces = _faces(rng, base, min(CHUNK, count - start))
      if poisoned:
        # The estimated blend reproduces the real poisoned faces to within 2 grey levels;
        # the estimate strays slightly outside 0..255, so clip.
        faces = np.clip(np.where(mask, alpha * faces + (1 - alpha) * colour, faces), 0, 255)
        if integer_poisoned:
          faces = np.rint(faces)
      else:
        # Labels are the net's own classes, so clean accuracy starts at 100 % and falls as
        # channels go; the faces are integers, so uint8 is exact.
        labels[start:start + len(faces)] = evaluate.predict(params, faces.astype(np.uint8))
      data[start:start + len(faces)] = faces.transpose(0, 3, 1, 2)
    handle['label'] = labels


def build_data(root: pathlib.Path, size: int, integer_poisoned: bool, params) -> pathlib.Path:
  """The CSAW folder for ``size``, built unless a complete one is cached."""
  folder = root / f'n{size}{"_int" if integer_poisoned else ""}'
  if (folder / MARKER).exists():
    print(f'data: reusing {folder}')
    return folder
  shutil.rmtree(folder, ignore_errors=True)  # a half-built folder from an interrupted run
  start = time.perf_counter()
  for index, (name, count) in enumerate(counts_for(size).items()):
    _write_file(folder / name, count, seed=size * 10 + index, poisoned=name.startswith('bd/'),
                integer_poisoned=integer_poisoned, params=params)
  (folder / MARKER).write_text(json.dumps(counts_for(size)))
  gigabytes = sum(f.stat().st_size for f in folder.rglob('*.h5')) / 1e9
  print(f'data: built {folder} ({gigabytes:.2f} GB) in {time.perf_counter() - start:.1f} s '
        f'(not part of the job)')
  return folder


def run_job(model: pathlib.Path, folder: pathlib.Path) -> dict:
  """The prune job in a fresh process: wall s, peak RSS MB, its "Sweep done" s (or None)."""
  with tempfile.TemporaryDirectory(prefix='badnet_scale_') as tmp, \
      tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
    command = [sys.executable, 'main.py', '--config=configs/prune.py', f'--config.model={model}',
               f'--config.data.dir={folder}', f'--workdir={tmp}/workdir',
               '--verbosity=1']  # the head's rows are debug lines
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=err)
    # wait4 reaps the child and returns its own rusage: ru_maxrss is its peak RSS in KB.
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    out.seek(0)
    err.seek(0)
    stdout, stderr = out.read().decode(), err.read().decode()
  if process.returncode:
    sys.exit(f'prune job failed (exit {process.returncode}): {" ".join(command)}\n'
             f'--- stderr tail ---\n{stderr[-3000:]}')
  sweep = re.search(r'Sweep done in ([\d.]+) s', stderr)
  # The job logs how many (image, level) pairs its head ran on, per file swept.
  head_rows = sum(int(n) for n in re.findall(r'Head on (\d+) \(image, level\) pairs', stderr))
  # ... and how many channels each of those rows read ("Head rows by channels read").
  head_macs_run = sum(
      int(rows) * head_macs(int(width))
      for line in re.findall(r'Head rows by channels read[^:]*: ([\d: ]+)', stderr)
      for width, rows in re.findall(r'(\d+):(\d+)', line))
  return {'wall': wall, 'rss_mb': usage.ru_maxrss / 1024, 'stdout': stdout,
          'load': (load_before, os.getloadavg()[0]), 'head_rows': head_rows or None,
          'head_macs': head_macs_run or None,
          'sweep': float(sweep.group(1)) if sweep else None}


def read_nhwc_f32(path: pathlib.Path) -> np.ndarray:
  """A CSAW file as the float32 NHWC array the notebooks fed the model, read in chunks."""
  with h5py.File(path, 'r') as handle:
    data = handle['data']
    images = np.empty((data.shape[0], 55, 47, 3), np.float32)
    for start in range(0, len(images), CHUNK):
      images[start:start + CHUNK] = data[start:start + CHUNK].transpose(0, 2, 3, 1)
  return images


def keras_loop(folder: pathlib.Path, model: pathlib.Path, steps: int) -> list[float]:
  """Seconds per step of the notebooks' loop in Keras (run with KERAS_BACKEND=tensorflow)."""
  import keras  # pylint: disable=g-import-not-at-top
  # keras_oracle sets KERAS_BACKEND=jax when imported, but keras is imported already.
  from tests import keras_oracle  # pylint: disable=g-import-not-at-top
  if keras.backend.backend() != 'tensorflow':
    sys.exit(f'Keras backend is {keras.backend.backend()}, expected tensorflow')
  net = keras_oracle.load_keras_net(model)
  clean, poisoned = (read_nhwc_f32(folder / name) for name in VALID_FILES)
  conv_3 = net.get_layer('conv_3')
  kernel, bias = (np.array(w) for w in conv_3.get_weights())  # writable copies
  net.predict(clean[:1024], batch_size=32, verbose=0)  # warm-up: traces the predict function
  seconds = []
  for channel in range(steps):
    start = time.perf_counter()
    kernel[..., channel], bias[channel] = 0, 0
    conv_3.set_weights([kernel, bias])
    for images in (clean, poisoned):
      net.predict(images, batch_size=32, verbose=0).argmax(1)
    seconds.append(time.perf_counter() - start)
  return seconds


def keras_estimate(folder: pathlib.Path, model: pathlib.Path, steps: int) -> float | None:
  """The Keras + TF loop's 60-step estimate, in a subprocess (TensorFlow backend), or None."""
  if importlib.util.find_spec('tensorflow') is None:
    print('naive Keras + TensorFlow: skipped, tensorflow is not installed '
          "(pip install -e '.[bench]' in a separate venv)")
    return None
  env = {**os.environ, 'KERAS_BACKEND': 'tensorflow', 'TF_CPP_MIN_LOG_LEVEL': '2'}
  result = subprocess.run([sys.executable, __file__, f'--keras_loop={folder}',
                           f'--model={model}', f'--keras_steps={steps}'],
                          env=env, capture_output=True, text=True, check=False)
  if result.returncode:
    print(f'naive Keras + TensorFlow: failed, stderr tail:\n{result.stderr[-2000:]}')
    return None
  seconds = json.loads(result.stdout.strip().splitlines()[-1])
  print(f'naive Keras + TF, s per step: {", ".join(f"{s:.2f}" for s in seconds)}')
  return float(np.mean(seconds)) * NAIVE_STEPS


def jax_estimate(params, folder: pathlib.Path, steps: int) -> float:
  """The naive loop in JAX (prune, then predict clean and poisoned valid), scaled to 60 steps."""
  from badnet.core import evaluate, masks  # pylint: disable=g-import-not-at-top
  clean, poisoned = (read_nhwc_f32(folder / name) for name in VALID_FILES)
  mask = np.ones(60, np.float32)

  def step(channel: int) -> float:
    start = time.perf_counter()
    mask[channel] = 0
    pruned = masks.prune(params, mask)
    for images in (clean, poisoned):
      evaluate.predict(pruned, images)
    return time.perf_counter() - start

  step(0)  # warm-up: compiles predict
  seconds = [step(channel) for channel in range(1, steps + 1)]
  print(f'naive JAX, s per step: {", ".join(f"{s:.2f}" for s in seconds)}')
  return float(np.mean(seconds)) * NAIVE_STEPS


def matmul_gmacs(n: int = 2048, repeats: int = 5) -> tuple[float, float]:
  """This machine's float32 n x n @ n x n rate, best of ``repeats``: (jax.jit, numpy) GMAC/s."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  a, b = (np.random.default_rng(i).standard_normal((n, n), np.float32) for i in range(2))
  matmul = jax.jit(jnp.matmul)
  ja, jb = jnp.asarray(a), jnp.asarray(b)
  matmul(ja, jb).block_until_ready()  # compile

  def best(fn) -> float:
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      fn()
      times.append(time.perf_counter() - start)
    return n ** 3 / min(times) / 1e9

  return best(lambda: matmul(ja, jb).block_until_ready()), best(lambda: a @ b)


def every_level_macs(counts: dict[str, int]) -> int:
  """Multiply-adds with features once per image and the head at every level asked for."""
  valid = counts['cl/valid.h5'] + counts['bd/bd_valid.h5']
  test = counts['cl/test.h5'] + counts['bd/bd_test.h5']
  return (FEATURE_MACS * sum(counts.values()) + HEAD_MACS * (LEVELS * valid + TEST_LEVELS * test))


def job_macs(counts: dict[str, int], job: dict) -> int:
  """Multiply-adds the job's method does: features once, the head on the pairs it logged.

  Each row's head at the width it logged, or at full width if the job logs no widths.
  """
  head = job['head_macs'] or HEAD_MACS * job['head_rows']
  return FEATURE_MACS * sum(counts.values()) + head


def print_table(size: int, counts: dict[str, int], job: dict, keras_s: float | None,
                jax_s: float, gmacs: float, keras_steps: int, jax_steps: int) -> None:
  valid = counts['cl/valid.h5'] + counts['bd/bd_valid.h5']
  full = every_level_macs(counts)
  sweep = f'{job["sweep"]:.1f} s' if job['sweep'] is not None else 'not logged'
  rows = [
      ('prune job, process wall', f'{job["wall"]:.1f} s'),
      ('prune job, "Sweep done in"', sweep),
      ('prune job, peak RSS', f'{job["rss_mb"]:.0f} MB'),
      (f'naive Keras 3 + TF, 60 steps (measured {keras_steps} steps, scaled to 60)',
       f'{keras_s:.0f} s' if keras_s else 'skipped'),
      (f'naive JAX, 60 steps (measured {jax_steps} steps, scaled to 60)', f'{jax_s:.0f} s'),
      ('Keras-TF / job', f'{keras_s / job["wall"]:.1f}x' if keras_s else '-'),
      ('JAX-naive / job', f'{jax_s / job["wall"]:.1f}x'),
      (f'job images x levels / s (({valid} valid) x {LEVELS} / wall)',
       f'{valid * LEVELS / job["wall"]:,.0f}'),
      ('multiply-adds, features once + head at all 61 valid / 5 test levels',
       f'{full / 1e9:,.0f} GMAC ({full / gmacs / 1e9:.1f} s at {gmacs:.1f} GMAC/s)'),
  ]
  if job['head_rows']:
    macs = job_macs(counts, job)
    rows += [
        (f'head rows the job ran (image, level pairs; all levels: '
         f'{LEVELS * valid + TEST_LEVELS * (sum(counts.values()) - valid):,})',
         f'{job["head_rows"]:,}'),
        ("multiply-adds of the job's method (features once + those head rows, each at "
         "the channels it read)",
         f'{macs / 1e9:,.0f} GMAC'),
        # What this machine's matmul rate allows for that work: compute only, no loading.
        (f'arithmetic floor, those at {gmacs:.1f} GMAC/s', f'{macs / gmacs / 1e9:.1f} s'),
    ]
  rows += [
      # 2 cores: a load above ~2 means something else ran and the timings above are inflated.
      ('1-min load average before / after the job', '{:.2f} / {:.2f}'.format(*job['load'])),
  ]
  print(f'\nN = {size}: ' + ', '.join(f'{name} {count}' for name, count in counts.items()))
  print('| measure | value |\n|---|---:|')
  for name, value in rows:
    print(f'| {name} | {value} |')


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--sizes', default='11547', help='clean validation counts, comma-separated')
  parser.add_argument('--keras_steps', type=int, default=3)
  parser.add_argument('--jax_steps', type=int, default=3)
  parser.add_argument('--model', default=str(SHARED / 'lab3_bd_weights.h5'))
  parser.add_argument('--data_root', default='/tmp/badnet_scale')
  parser.add_argument('--integer_poisoned', action='store_true',
                      help='round the poisoned pixels (to time code that refuses fractional ones)')
  parser.add_argument('--keras_loop', help=argparse.SUPPRESS)  # the Keras subprocess
  args = parser.parse_args()
  model = pathlib.Path(args.model).resolve()
  if args.keras_loop:
    print(json.dumps(keras_loop(pathlib.Path(args.keras_loop), model, args.keras_steps)))
    return

  import jax  # pylint: disable=g-import-not-at-top
  from badnet.io import keras_io  # pylint: disable=g-import-not-at-top
  params = keras_io.read_params(model)
  jax_rate, numpy_rate = matmul_gmacs()
  print(f'model {model}; devices {jax.devices()}; float32 2048^3 matmul: '
        f'{jax_rate:.1f} GMAC/s (jax.jit), {numpy_rate:.1f} GMAC/s (numpy)')
  print(f'multiply-adds per image: features {FEATURE_MACS:,}, head {HEAD_MACS:,} per level')
  walls = {}
  for size in (int(s) for s in args.sizes.split(',')):
    print(f'\n== N = {size} ==')
    folder = build_data(pathlib.Path(args.data_root), size, args.integer_poisoned, params)
    job = run_job(model, folder)
    print(job['stdout'].rstrip())
    keras_s = keras_estimate(folder, model, args.keras_steps)
    jax_s = jax_estimate(params, folder, args.jax_steps)
    print_table(size, counts_for(size), job, keras_s, jax_s, jax_rate,
                args.keras_steps, args.jax_steps)
    walls[size] = job['wall']
  print('\nprune job wall per 1000 clean validation images: ' +
        ', '.join(f'N={n}: {w / n * 1000:.2f} s' for n, w in walls.items()))
  if len(walls) > 1:
    slope, intercept = np.polyfit(list(walls), list(walls.values()), 1)
    print(f'least-squares fit: wall = {intercept:.1f} s + {slope * 1000:.2f} s per 1000 images')


if __name__ == '__main__':
  main()
