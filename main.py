"""Runs one badnet job: ``python main.py --config=configs/<job>.py [--workdir=W]``.

The config names the job (``config.job``, a module in ``badnet/jobs``);
``badnet.runner`` checks the whole config, prepares the workdir and runs it.
Errors in the user's input (files, config values and names, the workdir, a full
disk) are printed as one line and exit with status 1; Ctrl-C stops the job
with one line and status 130, leaving no half-written file.

Several processes (hosts) run one prune job together with ``jax.distributed``:
start the same command once per process with ``--num_processes=P
--process_id=i --coordinator_address=HOST:PORT`` (HOST being process 0's), or
with ``--distributed`` where JAX detects the cluster itself (TPU pods, SLURM).
Each process reads only its share of every data file; process 0 writes.
"""

import importlib.util
import logging as py_logging
import os
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from badnet import runner
from badnet.core import distributed, interrupts
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


def _flag_error(error: Exception, argv: list[str]) -> str:
  """One line for a command line that could not be parsed."""
  text = str(error)
  if isinstance(error, (AttributeError, KeyError)):  # ml_collections: no such config field
    overrides = [arg.split('=')[0] for arg in argv if arg.startswith('--config.')]
    flag = next((o for o in overrides
                 if re.search(rf'\b{re.escape(o.split(".")[-1])}\b', text)), '--config.<field>')
    guess = re.search(r'Did you mean "(\w+)"', text)
    hint = f'; did you mean {flag.rsplit(".", 1)[0]}.{guess.group(1)}?' if guess else ''
    moved = _in_a_block(argv, flag)
    if moved and not guess:  # a defence's field, now in its block (config.<defence>.<field>)
      hint = f'; did you mean --config.{moved}?'
    return f'{flag}: no such config field{hint}'
  if 'config file' in text or 'failure to load' in text:
    path = next((a.split('=', 1)[1] for a in argv if a.startswith('--config=')), '?')
    return f'--config={path}: cannot load this config file (no such file, or it fails)'
  return text.splitlines()[0] if text else type(error).__name__


def _in_a_block(argv: list[str], flag: str) -> str | None:
  """'<block>.<field>' where the config file's block holds the top-level field ``flag`` names."""
  path = next((a.split('=', 1)[1] for a in argv if a.startswith('--config=')), None)
  name = flag.removeprefix('--config.')
  try:
    spec = importlib.util.spec_from_file_location('_config', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
  except Exception:  # noqa: BLE001 (no hint, then; the error line stands alone)
    return None
  return next((f'{key}.{name}' for key, value in config.items()
               if hasattr(value, 'keys') and name.split('.')[0] in value), None)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with every failure as one line and exit status 1."""
  try:
    remaining = flags.FLAGS(argv)
    _CONFIG.value.keys()  # loads the config file and applies the overrides now
    return remaining
  except Exception as error:  # noqa: BLE001 (each failure is the user's command line)
    print(f'error: {_flag_error(error, argv)}', file=sys.stderr)
    sys.exit(1)


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
  # JAX probes for a TPU on every start and logs its absence; that is no news.
  py_logging.getLogger('jax._src.xla_bridge').setLevel(py_logging.WARNING)
  interrupts.install()
  try:
    runner.run(config, _WORKDIR.value)
  except BadnetError as error:
    _stop(f'error: {error}', 1)
  except KeyboardInterrupt:
    _stop('interrupted (Ctrl-C): the job stopped; files it had finished are complete, '
          'and nothing half-written was left', 130)
  except OSError as error:  # a file operation no check foresaw: still one line
    where = f'{error.filename}: ' if error.filename else ''
    _stop(f'error: {where}{error.strerror or error}', 1)


def _stop(line: str, status: int) -> None:
  logging.flush()
  print(line, file=sys.stderr, flush=True)
  if status == 130:
    # Interrupted mid-computation: XLA's threads may still be running the step the
    # interrupt cut short, and tearing the interpreter down under them can crash
    # (a segfault instead of this exit status). The job's files are settled by now
    # (atomic writes clean up as the interrupt unwinds), so leave at once.
    sys.stdout.flush()
    os._exit(status)
  sys.exit(status)


if __name__ == '__main__':
  app.run(main, flags_parser=_parse_flags)
