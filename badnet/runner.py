"""Runs one job: checks the whole config, prepares the workdir, writes the config, runs the job.

A job is a module ``badnet.jobs.<config.job>``, a leaf that only this runner
calls. It defines

  FIELDS: config.Fields    its config fields and their checks (ranges, choices)
  run(config, out) -> Any  the work, writing its outputs to the prepared
                           workdir ``out`` (a pathlib.Path)

and optionally

  check(config) -> None    checks that involve several fields or files' presence
  MULTI_PROCESS = True     it runs as several processes (jax.distributed);
                           every other job refuses to

so no job repeats the checks, the workdir handling or the config record.
"""

import importlib
import pathlib
import pkgutil
from types import ModuleType
from typing import Any

import jax

from badnet import config as config_lib
from badnet import jobs
from badnet.core import distributed
from badnet.errors import ConfigError
from badnet.io import workdir as workdir_lib


def job_names() -> tuple[str, ...]:
  """Every job in badnet/jobs."""
  return tuple(sorted(info.name for info in pkgutil.iter_modules(jobs.__path__)))


def load_job(name: str) -> ModuleType:
  """The module of job ``name`` (a ConfigError naming the jobs if there is none)."""
  if name not in job_names():
    raise ConfigError(f'config.job: unknown job {name!r}; expected one of '
                      f'{", ".join(job_names())}')
  return importlib.import_module(f'badnet.jobs.{name}')


def check(config: config_lib.Config) -> ModuleType:
  """Every check of ``config`` that needs no work: its declared fields, then the job's own."""
  job = load_job(config.job)
  config_lib.check(config, job.FIELDS)
  if hasattr(job, 'check'):
    job.check(config)
  if jax.process_count() > 1 and not getattr(job, 'MULTI_PROCESS', False):
    raise ConfigError(f'the {config.job} job runs on one process (run configs/prune.py '
                      f'across processes)')
  return job


def run(config: config_lib.Config, workdir: str | pathlib.Path | None = None) -> Any:
  """Checks ``config``, prepares ``workdir`` (default workdir/<job>), records the config, runs."""
  job = check(config)
  out = distributed.on_every_process(_prepare, config, workdir or f'workdir/{config.job}')
  results = job.run(config, out)
  if distributed.is_leader():
    print(f'Results in {out}: {", ".join(_listing(out))}', flush=True)
  return results


def _listing(out: pathlib.Path) -> list[str]:
  """The workdir's outputs, folders with a slash (the config record and data last)."""
  names = sorted(p.name + ('/' if p.is_dir() else '') for p in out.iterdir()
                 if not p.name.startswith('.'))
  last = [n for n in ('config.json', 'data/') if n in names]
  return [n for n in names if n not in last] + last


def _prepare(config: config_lib.Config, workdir: str | pathlib.Path) -> pathlib.Path:
  """The checked workdir with its config.json; only process 0 touches it."""
  if not distributed.is_leader():
    return pathlib.Path(workdir)
  out = workdir_lib.prepare(workdir, config.job)
  workdir_lib.write_config(out, config, config.job)
  return out
