"""Training speed: badnet's fine-tuning step and forward pass, beside the same net in PyTorch.

    python benchmarks/training.py [--epochs=4] [--variants=badnet,flax_pool,jaxlib_defaults]
        [--torch_python=/work/venv_torch/bin/python] [--torch_steps=30]

The net is the real lab3 DeepID (1283 classes; ../shared/csaw or
$BADNET_CSAW_DIR), or the shipped BadNets net (100 classes) where it is
absent. The images are the shipped benchmark's 2,000 clean validation faces,
labelled with the net's own classes; a third of conv_3's channels are pruned.

badnet's step is timed exactly as the fine-prune job runs it: ``train.fit``
with configs/fine_prune.py's recipe (Adam 1e-3, cosine, batch 64), the
pruned channels held at zero, batches of shuffled host images placed on the
data mesh each step. Epoch 1 compiles; the train rate is the best later epoch
(no held-out scoring in the timed epochs). The forward rate is
``evaluate.predict`` over the 2,000 images, best of 3.

Variants, each compiled afresh in this process:
  badnet           the code as it is (first-max pool; YNNPACK off on a CPU)
  flax_pool        ``nn.max_pool`` in place of ``model.max_pool``
  jaxlib_defaults  ``nn.max_pool`` and jax's default CPU compile options
                   (YNNPACK on): the step before the training-speed work

Then the PyTorch peer (benchmarks/training_torch.py) runs in its own venv
(``--torch_python``; skipped with a line where it is missing) on the same
weights, images, mask and batch, and its classes of 64 probe images are
compared with badnet's. Prints ``train images/s: N`` and
``forward images/s: N`` for badnet, then one table of every variant with its
ratio to PyTorch. Install the peer apart from the project:
``python3.11 -m venv /work/venv_torch && /work/venv_torch/bin/pip install numpy torch``
(the CPU wheels: ``--index-url https://download.pytorch.org/whl/cpu``).
"""

import argparse
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time

import flax.linen as nn
import jax
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from badnet.core import backend, evaluate, model, train  # pylint: disable=g-import-not-at-top
from badnet import defend, inputs  # noqa: E402
from badnet.io import data, keras_io  # pylint: disable=g-import-not-at-top
from configs import fine_prune  # pylint: disable=g-import-not-at-top

REPO = pathlib.Path(__file__).resolve().parents[1]
CSAW = pathlib.Path(os.environ.get('BADNET_CSAW_DIR', REPO.parent / 'shared' / 'csaw'))
VARIANTS = ('badnet', 'flax_pool', 'jaxlib_defaults')
PROBES = 64
SHIPPED_POOL, SHIPPED_OPTIONS = model.max_pool, backend.compiler_options


def _flax_pool(x: jax.Array) -> jax.Array:
  return nn.max_pool(x, (2, 2), (2, 2), 'VALID')


def _use(variant: str) -> None:
  """Sets this process up for ``variant`` and drops every cached compiled step."""
  model.max_pool = _flax_pool if variant in ('flax_pool', 'jaxlib_defaults') else SHIPPED_POOL
  backend.compiler_options = (lambda: None) if variant == 'jaxlib_defaults' else (
      SHIPPED_OPTIONS)
  train._compiled_step.cache_clear()  # pylint: disable=protected-access
  evaluate._jitted.cache_clear()  # pylint: disable=protected-access



def _net_and_data() -> tuple[str, dict, np.ndarray, np.ndarray]:
  model_path, data_dir = inputs.shipped_benchmark('badnets', quiet=True)
  lab3 = CSAW / 'lab3_bd_weights.h5'
  path = lab3 if lab3.is_file() else model_path
  params = keras_io.read_params(path)
  images = data.load_csaw_h5(data_dir / 'cl' / 'valid.h5').images
  return path.name, params, images, evaluate.predict(params, images)


def _badnet_rates(params, images, labels, mask, epochs: int) -> tuple[float, float]:
  recipe = defend.settings_of(fine_prune.get_config()).finetune.recipe(epochs=epochs)
  _, history = train.fit(params, images, labels, recipe, channel_mask=mask,
                         held={'conv_3': mask}, name='benchmark')
  steps = len(labels) // recipe.batch_size
  train_rate = steps * recipe.batch_size / min(row['seconds'] for row in history[1:])
  evaluate.predict(params, images, channel_mask=mask)  # compile
  best = float('inf')
  for _ in range(3):
    start = time.perf_counter()
    evaluate.predict(params, images, channel_mask=mask)
    best = min(best, time.perf_counter() - start)
  return train_rate, len(images) / best


def _torch_rates(python: str, params, images, labels, mask, steps: int,
                 our_probe: np.ndarray) -> tuple[float, float, str] | None:
  if not pathlib.Path(python).is_file():
    print(f'PyTorch: no interpreter at {python}; skipped (see the docstring to install it)')
    return None
  with tempfile.TemporaryDirectory() as folder:
    weights, out = pathlib.Path(folder) / 'weights.npz', pathlib.Path(folder) / 'out.npz'
    arrays = {f'{layer}/{name}': np.asarray(value) for layer, leaves in params.items()
              for name, value in leaves.items()}
    np.savez(weights, train_images=images, train_labels=labels, mask=mask,
             probe=images[:PROBES], **arrays)
    run = subprocess.run([python, str(REPO / 'benchmarks' / 'training_torch.py'),
                          f'--weights={weights}', f'--out={out}', f'--steps={steps}',
                          f'--batch={fine_prune.get_config().fine_pruning.finetune.batch_size}'],
                         capture_output=True, text=True, check=False)
    if run.returncode:
      print(f'PyTorch failed:\n{run.stderr[-2000:]}')
      return None
    with np.load(out) as result:
      same = int((result['probe_classes'] == our_probe).sum())
  rates = {key: float(value) for key, value in
           re.findall(r'^(train|forward) images/s: (\S+)$', run.stdout, re.M)}
  version = run.stdout.splitlines()[0]
  print(f'PyTorch ({version}): the same classes as badnet on {same} of {PROBES} probe images')
  return rates['train'], rates['forward'], version


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--epochs', type=int, default=4, help='fit epochs (the first compiles)')
  parser.add_argument('--variants', default=','.join(VARIANTS))
  parser.add_argument('--torch_python', default='/work/venv_torch/bin/python')
  parser.add_argument('--torch_steps', type=int, default=30)
  args = parser.parse_args()
  variants = args.variants.split(',')
  unknown = sorted(set(variants) - set(VARIANTS))
  if unknown or args.epochs < 2:
    sys.exit(f'unknown variants {unknown} (expected {VARIANTS}) or --epochs < 2')
  name, params, images, labels = _net_and_data()
  rng = np.random.default_rng(0)
  mask = np.ones(model.num_channels(params), np.float32)
  mask[rng.permutation(len(mask))[:len(mask) // 3]] = 0
  print(f'{jax.devices()[0].device_kind} ({len(jax.devices())} devices, {os.cpu_count()} CPUs); '
        f'net {name}, {len(images)} images, {int((mask == 0).sum())} conv_3 channels pruned',
        flush=True)
  rows = {}
  for variant in variants:
    _use(variant)
    rows[variant] = _badnet_rates(params, images, labels, mask, args.epochs)
    print(f'{variant}: train {rows[variant][0]:.0f}, forward {rows[variant][1]:.0f} images/s',
          flush=True)
  _use('badnet')
  if 'badnet' in rows:
    print(f'train images/s: {rows["badnet"][0]:.0f}')
    print(f'forward images/s: {rows["badnet"][1]:.0f}')
  probe = evaluate.predict(params, images[:PROBES], channel_mask=mask)
  peer = _torch_rates(args.torch_python, params, images, labels, mask, args.torch_steps, probe)
  print('\n| variant | train images/s | forward images/s | train vs PyTorch |')
  print('|---|---:|---:|---:|')
  for variant, (train_rate, forward_rate) in rows.items():
    ratio = f'{train_rate / peer[0]:.2f}x' if peer else '-'
    print(f'| {variant} | {train_rate:.0f} | {forward_rate:.0f} | {ratio} |')
  if peer:
    print(f'| PyTorch | {peer[0]:.0f} | {peer[1]:.0f} | 1.00x |')


if __name__ == '__main__':
  main()
