"""The same predictions on 1 device and on 8 (forced CPU) devices."""

import os
import subprocess
import sys

import numpy as np

from badnet.core import evaluate, masks, model
from badnet.defences import pruning, sweep
from tests import helpers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 203 images in batches of 50: N is a multiple of neither the batch nor 8 devices,
# and 50 itself is not a multiple of 8 (it is rounded up to 56 there).
COUNT, BATCH = 203, 50


def compute() -> dict[str, np.ndarray]:
  """Everything the test compares, computed on whatever devices this process has."""
  params = helpers.random_params(13, seed=6)
  images = helpers.varied_images(COUNT, seed=6)
  order = np.random.default_rng(7).permutation(model.num_channels(params))
  level_masks = masks.prefix_masks(order)[::6]  # levels 0, 6, ..., 60: 11 level_masks
  features = sweep.features(params, images, batch_size=BATCH)
  return dict(
      predict=evaluate.predict(params, images, batch_size=BATCH),
      masked=evaluate.predict(params, images, batch_size=BATCH, channel_mask=level_masks[5]),
      sweep=evaluate.sweep_predictions(params, level_masks, images, batch_size=BATCH),
      fast_sweep=sweep.prefix_classes(params, features.pool_3, order, levels=range(0, 61, 6),
                                      batch_size=BATCH),
      pool_3=features.pool_3,
      means=pruning.mean_activations(params, images, batch_size=BATCH))


_SCRIPT = f'''
import sys
import jax
import numpy as np
from badnet.core import evaluate
from tests.test_sharding import compute
assert jax.device_count() == 8, jax.devices()
assert evaluate.data_mesh().devices.size == 8
assert evaluate.global_batch_size({BATCH}, evaluate.data_mesh()) == 56
np.savez(sys.argv[1], **compute())
'''


def _on_eight_devices(out) -> dict[str, np.ndarray]:
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=8',
         'JAX_PLATFORMS': 'cpu'}
  result = subprocess.run([sys.executable, '-c', _SCRIPT, str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  with np.load(out) as eight:
    return dict(eight)


def test_eight_devices_give_the_same_predictions(tmp_path):
  """predict, masked predict, both pruning sweeps, pool_3 and mean activations: 8 devices == 1."""
  one = compute()
  # The comparison must be of varied outputs, not of one constant class.
  assert len(np.unique(one['predict'])) > 3
  assert one['sweep'].shape == (COUNT, 11)
  assert len({tuple(level) for level in one['sweep'].T}) > 5  # the levels differ
  np.testing.assert_array_equal(one['sweep'][:, 0], one['predict'])  # level 0: nothing pruned
  np.testing.assert_array_equal(one['sweep'][:, 5], one['masked'])
  eight = _on_eight_devices(tmp_path / 'eight.npz')
  np.testing.assert_array_equal(one['fast_sweep'], one['sweep'])
  for key in ('predict', 'masked', 'sweep', 'fast_sweep', 'pool_3'):
    assert eight[key].shape == one[key].shape, key
    np.testing.assert_array_equal(eight[key], one[key], key)
  # Means are float sums whose order of addition may change with the sharding.
  np.testing.assert_allclose(eight['means'], one['means'], rtol=1e-6)
