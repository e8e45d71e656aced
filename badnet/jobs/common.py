"""Pieces the jobs share: config checks, the shipped benchmark, progress logs."""

import pathlib

from absl import logging
import ml_collections


from badnet.errors import ConfigError

# CSAW lab3 layout, relative to a data folder.
CSAW_FILES = {'clean_valid': 'cl/valid.h5', 'clean_test': 'cl/test.h5',
              'poisoned_valid': 'bd/bd_valid.h5', 'poisoned_test': 'bd/bd_test.h5'}


def check_batch_size(config: ml_collections.ConfigDict) -> None:
  if not isinstance(config.batch_size, int) or config.batch_size < 1:
    raise ConfigError(f'config.batch_size must be a positive integer, got {config.batch_size!r}')


def shipped_benchmark(workdir: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
  """The shipped synthetic BadNet and its data (regenerated under ``workdir/data``)."""
  logging.info('No model/data given: using the shipped synthetic benchmark '
               '(data regenerated deterministically under %s).', workdir / 'data')
  print('Running on the shipped synthetic benchmark (no model or data given); '
        f'its data is regenerated under {workdir / "data"}.', flush=True)
  from badnet import synthetic  # pylint: disable=g-import-not-at-top  # heavy; only when used
  model_path, data_dir = synthetic.shipped_benchmark(workdir / "data")
  return pathlib.Path(model_path), pathlib.Path(data_dir)
