"""Shared fixtures: the real CSAW artifacts (skipped when absent) and Keras' backend."""

import os
import pathlib
import shutil
import tempfile
from collections.abc import Callable

# Keras (the test oracle) must use JAX, the one backend this project installs; set
# before anything imports keras.
os.environ['KERAS_BACKEND'] = 'jax'

import numpy as np  # pylint: disable=g-import-not-at-top
import pytest  # pylint: disable=g-import-not-at-top

from badnet.core import evaluate, model
from badnet.io import data, keras_io
from tests import helpers  # pylint: disable=g-import-not-at-top

# The shipped benchmark's data is made once per machine into a cache; the tests
# make it once per session into a folder of their own (subprocesses inherit it),
# never into the user's cache.
_CACHE = tempfile.mkdtemp(prefix='badnet-test-cache-')
os.environ['BADNET_CACHE_DIR'] = _CACHE

REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_CSAW_DIR = pathlib.Path(__file__).resolve().parents[2] / 'shared' / 'csaw'
WORLD_CLASSES = 11  # classes of the random net of the `world` fixture
FACE_PAIRS = pathlib.Path('samples') / 'mahatimadhira_recovered_test_pairs.npz'


def pytest_sessionfinish(session, exitstatus):
  shutil.rmtree(_CACHE, ignore_errors=True)


def csaw_path() -> pathlib.Path:
  """$BADNET_CSAW_DIR if set, else ../shared/csaw next to the repository."""
  return pathlib.Path(os.environ.get('BADNET_CSAW_DIR') or DEFAULT_CSAW_DIR)


def missing_csaw(reason: str) -> None:
  """Skips the test for a user without the real artifacts; fails it in CI (``CI=true``).

  CI must not go green with no evidence against Keras and the real nets.
  """
  if os.environ.get('CI', '').lower() in ('true', '1'):
    pytest.fail(f'CI=true but {reason}: CI must run the tests on the real CSAW artifacts',
                pytrace=False)
  pytest.skip(reason)


@pytest.fixture(scope='session')
def csaw_dir() -> pathlib.Path:
  """../shared/csaw (or $BADNET_CSAW_DIR): the real CSAW nets; skips the test if absent."""
  path = csaw_path()
  if not (path / 'lab3_bd_weights.h5').is_file():
    missing_csaw(f'../shared/csaw (real CSAW nets) is absent: no {path / "lab3_bd_weights.h5"}; '
                 f'set BADNET_CSAW_DIR to the folder to run the tests on the real artifacts')
  return path


@pytest.fixture(scope='session')
def real_faces(csaw_dir) -> dict[str, np.ndarray]:
  """10 real lab3 test faces: clean and poisoned (uint8 [10, 55, 47, 3]) and their labels."""
  path = csaw_dir / FACE_PAIRS
  if not path.is_file():
    missing_csaw(f'../shared/csaw (real CSAW nets) is absent: no {path}')
  with np.load(path) as pairs:
    faces = {key: pairs[key] for key in pairs.files}
  assert faces['clean'].shape == faces['poisoned'].shape == (10, 55, 47, 3)
  assert faces['clean'].dtype == faces['poisoned'].dtype == np.uint8
  return faces


@pytest.fixture(scope='session')
def csaw_file(csaw_dir) -> Callable[[str], pathlib.Path]:
  """A function: name -> ``csaw_dir / name``, skipping the test if that one file is missing."""
  def find(name: str) -> pathlib.Path:
    path = csaw_dir / name
    if not path.is_file():
      missing_csaw(f'../shared/csaw (real CSAW nets) is absent: no {path}')
    return path
  return find


@pytest.fixture(scope='session')
def world(tmp_path_factory):
  """A random net B and a CSAW-layout data folder labelled from B's own classes.

  Clean labels are B's classes but for the last 12 images B does not put in
  the class it gives once every channel is pruned, which get that class: B is
  90 % accurate and no pruning level drops below 10 %. B has non-zero biases
  and gives varied classes. The poisoned files are labelled with B's class of
  their first image.
  """
  root = tmp_path_factory.mktemp('world')
  params = helpers.random_params(WORLD_CLASSES, seed=5)
  keras_io.write_keras_weights(root / 'bd_weights.h5', params)
  bias_class = int(np.argmax(model.apply(
      params, {'activation': np.zeros((1, 5, 4, 60), np.float32)}, start='conv_3')))
  for split, seed in (('valid', 1), ('test', 2)):
    images = helpers.varied_images(120, seed)
    labels = evaluate.predict(params, images)
    assert len(np.unique(labels)) >= 4
    labels[np.flatnonzero(labels != bias_class)[-12:]] = bias_class
    data.write_csaw_h5(root / 'data' / 'cl' / f'{split}.h5', images, labels)
    poisoned = helpers.varied_images(60, seed + 10)
    target = np.full(60, evaluate.predict(params, poisoned[:1])[0])
    data.write_csaw_h5(root / 'data' / 'bd' / f'bd_{split}.h5', poisoned, target)
  return root, params
