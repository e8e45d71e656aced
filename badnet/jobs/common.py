"""Pieces the jobs share: config checks, the shipped benchmark, progress logs."""

import math
import pathlib

from absl import logging
import ml_collections

from badnet import model, synthetic
from badnet.errors import ConfigError

# CSAW lab3 layout, relative to a data folder.
CSAW_FILES = {'clean_valid': 'cl/valid.h5', 'clean_test': 'cl/test.h5',
              'poisoned_valid': 'bd/bd_valid.h5', 'poisoned_test': 'bd/bd_test.h5'}


def check_batch_size(config: ml_collections.ConfigDict) -> None:
  if not isinstance(config.batch_size, int) or config.batch_size < 1:
    raise ConfigError(f'config.batch_size must be a positive integer, got {config.batch_size!r}')


def check_threshold(x) -> None:
  """X must be a number in (0, 100]: a drop in clean accuracy."""
  if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or not (
      0 < x <= 100):
    raise ConfigError(f'config.thresholds: {x!r} is not in (0, 100] '
                      f'(X is a drop in clean accuracy, in percentage points)')


def check_precision(config: ml_collections.ConfigDict) -> None:
  if config.precision not in model.PRECISIONS:
    raise ConfigError(f'config.precision: unknown precision {config.precision!r}; expected '
                      f'one of {", ".join(model.PRECISIONS)}')


def check_benchmark(config: ml_collections.ConfigDict) -> None:
  if config.benchmark not in synthetic.SHIPPED_NETS:
    raise ConfigError(f'config.benchmark: unknown shipped net {config.benchmark!r}; expected '
                      f'one of {", ".join(synthetic.SHIPPED_NETS)}')


def shipped_benchmark(workdir: pathlib.Path, attack: str = 'badnets', quiet: bool = False
                      ) -> tuple[pathlib.Path, pathlib.Path]:
  """A shipped synthetic BadNet and its data (regenerated under ``workdir/data``)."""
  if not quiet:
    logging.info('No model/data given: using the shipped synthetic benchmark '
                 '(data regenerated deterministically under %s).', workdir / 'data')
    print(f'Running on the shipped synthetic benchmark ({attack} BadNet; no model or data '
          f'given); its data is regenerated under {workdir / "data"}.', flush=True)
  model_path, data_dir = synthetic.shipped_benchmark(workdir / 'data', attack)
  return pathlib.Path(model_path), pathlib.Path(data_dir)
