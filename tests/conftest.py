"""Shared fixtures: the real CSAW artifacts (skipped when absent) and Keras' backend."""

import os
import pathlib

# Keras (the test oracle) must use JAX, the one backend this project installs.
os.environ.setdefault('KERAS_BACKEND', 'jax')

import numpy as np  # pylint: disable=g-import-not-at-top
import pytest  # pylint: disable=g-import-not-at-top

REPO = pathlib.Path(__file__).resolve().parents[1]


def _csaw_dir() -> pathlib.Path:
  return pathlib.Path(os.environ.get('BADNET_CSAW_DIR', REPO.parent / 'shared' / 'csaw'))


@pytest.fixture(scope='session')
def csaw_dir() -> pathlib.Path:
  """../shared/csaw (or $BADNET_CSAW_DIR): the real CSAW nets; skips the test if absent."""
  path = _csaw_dir()
  if not (path / 'lab3_bd_weights.h5').is_file():
    pytest.skip(f'{path} (the real CSAW nets and faces) is absent; set BADNET_CSAW_DIR '
                f'to run the tests against the real artifacts')
  return path


@pytest.fixture(scope='session')
def real_faces(csaw_dir) -> dict[str, np.ndarray]:
  """10 real lab3 test faces, clean and with the real sunglasses trigger."""
  with np.load(csaw_dir / 'samples' / 'mahatimadhira_recovered_test_pairs.npz') as pairs:
    return {key: pairs[key] for key in pairs.files}
