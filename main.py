"""Runs one badnet job: ``python main.py --config=configs/<job>.py [--workdir=W]``.

The config names the job (``config.job``); its ``run(config, workdir)`` lives in
``badnet/jobs/<job>.py``. Errors in the user's input (files, config values,
the workdir) are printed as one line and exit with status 1.
"""

import importlib
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from badnet.errors import BadnetError

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Path to a config file in configs/.', lock_config=True)
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Folder for the outputs (default: workdir/<job>). Must be new, empty, '
    'or written by an earlier badnet job.')
flags.mark_flags_as_required(['config'])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  config = _CONFIG.value
  workdir = _WORKDIR.value or f'workdir/{config.job}'
  job = importlib.import_module(f'badnet.jobs.{config.job}')
  try:
    job.run(config, workdir)
  except BadnetError as error:
    logging.flush()
    print(f'error: {error}', file=sys.stderr)
    sys.exit(1)


if __name__ == '__main__':
  app.run(main)
