"""The same predictions on 1 device and on 8 (forced CPU) devices."""

import os
import subprocess
import sys

import numpy as np

from badnet import evaluate, model, prune
from tests import helpers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 203 images in batches of 50: neither a multiple of 8 devices nor of the batch.
_SCRIPT = '''
import sys
import jax
import numpy as np
from badnet import evaluate, model, prune
from tests import helpers
assert jax.device_count() == 8, jax.devices()
params = model.init_params(13, seed=5)
images = helpers.varied_images(203, seed=6)
masks = prune.prefix_masks(np.arange(60))[::7]
np.savez(sys.argv[1], predict=evaluate.predict(params, images, batch_size=50),
         sweep=evaluate.sweep_predictions(params, masks, images, batch_size=50),
         means=prune.mean_activations(params, images, batch_size=50))
'''


def test_eight_devices_give_the_same_predictions(tmp_path):
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=8',
         'JAX_PLATFORMS': 'cpu'}
  out = tmp_path / 'eight.npz'
  subprocess.run([sys.executable, '-c', _SCRIPT, str(out)], cwd=REPO, env=env, check=True,
                 timeout=300)
  eight = np.load(out)
  params = model.init_params(13, seed=5)
  images = helpers.varied_images(203, seed=6)
  masks = prune.prefix_masks(np.arange(60))[::7]
  one = evaluate.predict(params, images, batch_size=50)
  assert len(np.unique(one)) > 1
  np.testing.assert_array_equal(eight['predict'], one)
  np.testing.assert_array_equal(eight['sweep'],
                                evaluate.sweep_predictions(params, masks, images, batch_size=50))
  np.testing.assert_allclose(eight['means'],
                             prune.mean_activations(params, images, batch_size=50), rtol=1e-6)
