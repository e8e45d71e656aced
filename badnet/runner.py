"""Runs one job: checks the whole config, prepares the workdir, writes the config, runs the job.

A job is a leaf module ``badnet.jobs.<config.job>`` defining ``FIELDS`` (its config fields'
checks) and ``run(config, out)`` (the work, written to the workdir ``out``), and optionally
``check(config)`` (checks across fields or of files' presence), ``owner(config)`` (the name
its workdirs are kept under) and ``multi_process(config)`` (whether it may run as several
processes). So no job repeats the checks, the workdir handling or the config record.
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
  return tuple(sorted(info.name for info in pkgutil.iter_modules(jobs.__path__)))


def load_job(name: str) -> ModuleType:
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
  if jax.process_count() > 1 and not getattr(job, 'multi_process', lambda _: False)(config):
    raise ConfigError(f'the {owner(config, job)} job runs on one process (run configs/prune.py '
                      f'across processes)')
  return job


def owner(config: config_lib.Config, job: ModuleType) -> str:
  """The name the job's workdirs are kept under (a defence's, for the defence job)."""
  return job.owner(config) if hasattr(job, 'owner') else config.job


def run(config: config_lib.Config, workdir: str | pathlib.Path | None = None) -> Any:
  """Checks ``config``, prepares ``workdir`` (default workdir/<owner>), records the config, runs."""
  job = check(config)
  name = owner(config, job)
  out = distributed.on_every_process(_prepare, config, workdir or f'workdir/{name}', name)
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


def _prepare(config: config_lib.Config, workdir: str | pathlib.Path, name: str) -> pathlib.Path:
  """The checked workdir with its config.json; only process 0 touches it."""
  if not distributed.is_leader():
    return pathlib.Path(workdir)
  out = workdir_lib.prepare(workdir, name)
  workdir_lib.write_config(out, config, name)
  return out
