"""Shared fixtures: the real CSAW artifacts (skipped when absent) and Keras' backend."""

import os
import pathlib
from collections.abc import Callable

# Keras (the test oracle) must use JAX, the one backend this project installs; set
# before anything imports keras.
os.environ['KERAS_BACKEND'] = 'jax'

import numpy as np  # pylint: disable=g-import-not-at-top
import pytest  # pylint: disable=g-import-not-at-top

REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_CSAW_DIR = pathlib.Path(__file__).resolve().parents[2] / 'shared' / 'csaw'
FACE_PAIRS = pathlib.Path('samples') / 'mahatimadhira_recovered_test_pairs.npz'


def csaw_path() -> pathlib.Path:
  """$BADNET_CSAW_DIR if set, else ../shared/csaw next to the repository."""
  return pathlib.Path(os.environ.get('BADNET_CSAW_DIR') or DEFAULT_CSAW_DIR)


@pytest.fixture(scope='session')
def csaw_dir() -> pathlib.Path:
  """../shared/csaw (or $BADNET_CSAW_DIR): the real CSAW nets; skips the test if absent."""
  path = csaw_path()
  if not (path / 'lab3_bd_weights.h5').is_file():
    pytest.skip(f'../shared/csaw (real CSAW nets) is absent: no {path / "lab3_bd_weights.h5"}; '
                f'set BADNET_CSAW_DIR to the folder to run the tests on the real artifacts')
  return path


@pytest.fixture(scope='session')
def real_faces(csaw_dir) -> dict[str, np.ndarray]:
  """10 real lab3 test faces: clean and poisoned (uint8 [10, 55, 47, 3]) and their labels."""
  path = csaw_dir / FACE_PAIRS
  if not path.is_file():
    pytest.skip(f'../shared/csaw (real CSAW nets) is absent: no {path}')
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
      pytest.skip(f'../shared/csaw (real CSAW nets) is absent: no {path}')
    return path
  return find
