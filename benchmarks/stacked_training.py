"""Fine-tuning several pruned nets at once (vmap over stacked params) against one after another.

    python benchmarks/stacked_training.py [--variants=4] [--batch=64]

Times ``train.train_step`` (Adam, pruned channels held at zero) for V nets that
differ in their conv_3 mask: V jitted steps in turn, and one jitted step vmapped
over the V stacked params, optimiser states and masks (the same images). Prints
milliseconds per round of V steps, best of 3 after compiling. This is what the
ablation job would gain by training its fine-tuning variants together.
"""

import argparse
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from badnet.core import backend, train
from tests import helpers  # pylint: disable=g-import-not-at-top


def _best_ms(run, repeats: int = 3) -> float:
  jax.block_until_ready(run())  # compile
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(run())
    best = min(best, time.perf_counter() - start)
  return 1e3 * best


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--variants', type=int, default=4)
  parser.add_argument('--batch', type=int, default=64)
  args = parser.parse_args()
  rng = np.random.default_rng(0)
  params = jax.tree.map(jnp.asarray, helpers.random_params(100, seed=1))
  images = jnp.asarray(rng.integers(0, 256, (args.batch, 55, 47, 3)).astype(np.uint8))
  labels = jnp.asarray(rng.integers(0, 100, args.batch).astype(np.int32))
  masks = jnp.asarray((rng.random((args.variants, 60)) > 0.5).astype(np.float32))
  optimizer = optax.adam(1e-3)
  # Fine-pruning's step: the masked channels held at zero (held = {'conv_3': mask}).
  step = lambda p, s, x, y, m: train.train_step(p, s, x, y, m, {'conv_3': m}, optimizer=optimizer)
  one = backend.jit(step)
  state = optimizer.init(params)
  in_turn = _best_ms(lambda: [one(params, state, images, labels, mask) for mask in masks])
  stacked = jax.tree.map(lambda leaf: jnp.stack([leaf] * args.variants), params)
  stacked_state = jax.vmap(optimizer.init)(stacked)
  together = backend.jit(jax.vmap(step, in_axes=(0, 0, None, None, 0)))
  at_once = _best_ms(lambda: together(stacked, stacked_state, images, labels, masks))
  print(f'{jax.devices()[0].platform}: {args.variants} nets, batch {args.batch}: '
        f'one after another {in_turn:.0f} ms, vmapped together {at_once:.0f} ms')


if __name__ == '__main__':
  main()
