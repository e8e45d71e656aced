"""Runs one badnet job: ``python main.py --config=configs/<job>.py [--workdir=W]``.

The config names the job (``config.job``, a module in ``badnet/jobs``);
``badnet.runner`` checks the whole config, prepares the workdir and runs it.
Errors in the user's input (files, config values, the workdir) are printed as one
line and exit with status 1.

Several processes (hosts) run one prune job together with ``jax.distributed``:
start the same command once per process with ``--num_processes=P
--process_id=i --coordinator_address=HOST:PORT`` (HOST being process 0's), or
with ``--distributed`` where JAX detects the cluster itself (TPU pods, SLURM).
Each process reads only its share of every data file; process 0 writes.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from badnet import runner
from badnet.core import distributed
from badnet.errors import BadnetError

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Path to a config file in configs/.', lock_config=True)
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Folder for the outputs (default: workdir/<job>). Must be new, empty, '
    'or written by an earlier badnet job.')
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', '', 'host:port of process 0, for a run of several processes.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', 1, 'Processes in the run.')
_PROCESS_ID = flags.DEFINE_integer('process_id', 0, 'This process, 0..num_processes - 1.')
_AUTO = flags.DEFINE_bool('distributed', False,
                          'Join a multi-process run that JAX detects (TPU pods, SLURM).')
flags.mark_flags_as_required(['config'])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  config = _CONFIG.value
  if _NUM_PROCESSES.value > 1 and not _COORDINATOR.value:
    raise app.UsageError('--num_processes > 1 needs --coordinator_address=HOST:PORT')
  if not 0 <= _PROCESS_ID.value < _NUM_PROCESSES.value:
    raise app.UsageError(f'--process_id must be in 0..{_NUM_PROCESSES.value - 1}')
  distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                         _AUTO.value)
  try:
    runner.run(config, _WORKDIR.value)
  except BadnetError as error:
    logging.flush()
    print(f'error: {error}', file=sys.stderr)
    sys.exit(1)


if __name__ == '__main__':
  app.run(main)
