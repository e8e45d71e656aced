"""Running one job as several processes (hosts) with ``jax.distributed``.

Every per-image computation (features, the sweep's classes, predictions) is
independent of the other images, so each process reads only its share of the
rows of each data file (a contiguous block, in process order), computes on its
own devices, and the per-image results are gathered across processes
(``multihost_utils.process_allgather``) in row order. Every process then holds
the same global arrays and computes the same figures; process 0 writes the
outputs. Concatenated in process order the gathered rows are the rows one
process would have computed, so the results equal a one-process run's.

With one process (the default) nothing here calls into ``jax.distributed``.
"""

from collections.abc import Callable
from typing import Any, TypeVar

import jax
from jax.experimental import multihost_utils
import numpy as np

from badnet.errors import BadnetError

Result = TypeVar('Result')


def initialize(coordinator_address: str = '', num_processes: int = 1,
               process_id: int = 0, auto: bool = False) -> None:
  """Joins a multi-process run; a no-op for one process unless ``auto``.

  Args:
    coordinator_address: host:port of process 0's coordinator service.
    num_processes: the number of processes in the run.
    process_id: this process's index, 0..num_processes - 1.
    auto: let JAX detect the cluster (TPU pods, SLURM, ...) from its environment.
  """
  if auto:
    jax.distributed.initialize()
  elif num_processes > 1:
    jax.distributed.initialize(coordinator_address, num_processes, process_id)


def is_leader() -> bool:
  """True on the process that writes outputs (process 0)."""
  return jax.process_index() == 0


def row_range(count: int, process: int | None = None,
              processes: int | None = None) -> tuple[int, int]:
  """The rows [start, stop) of a file of ``count`` rows that ``process`` reads."""
  process = jax.process_index() if process is None else process
  processes = jax.process_count() if processes is None else processes
  return process * count // processes, (process + 1) * count // processes


def gather_rows(local: Any, count: int) -> Any:
  """Every process's rows of a pytree of per-row arrays, concatenated in row order.

  Args:
    local: this process's rows (each leaf [rows of ``row_range(count)``, ...]).
    count: the number of rows over all processes.
  """
  processes = jax.process_count()
  if processes == 1:
    return local
  ranges = [row_range(count, p, processes) for p in range(processes)]
  largest = max(stop - start for start, stop in ranges)

  def pad(leaf: np.ndarray) -> np.ndarray:
    # process_allgather needs the same shape on every process.
    leaf = np.asarray(leaf)
    padding = np.zeros((largest - len(leaf), *leaf.shape[1:]), leaf.dtype)
    return np.concatenate([leaf, padding])

  stacked = multihost_utils.process_allgather(jax.tree.map(pad, local))
  return jax.tree.map(
      lambda leaf: np.concatenate([leaf[p, :stop - start]
                                   for p, (start, stop) in enumerate(ranges)]), stacked)


def on_every_process(fn: Callable[..., Result], *args: Any) -> Result:
  """``fn(*args)``, where a user error on any process stops every process.

  A process that hits bad input (its share of a file holds NaN, the workdir
  is not writable) would otherwise exit while the others wait for it in the
  next gather. Every process calls this at the same point: it raises its own
  error, and the others raise one naming the process that failed.
  """
  error, result = None, None
  try:
    result = fn(*args)
  except BadnetError as caught:
    error = caught
  if jax.process_count() > 1:
    failed = np.flatnonzero(multihost_utils.process_allgather(np.array(error is not None)))
    if error is None and len(failed):
      raise BadnetError(f'process {", ".join(map(str, failed))} of {jax.process_count()} '
                        f'stopped on an error (its own output says which); stopping too')
  if error is not None:
    raise error
  return result


def barrier(name: str) -> None:
  """Waits until every process gets here (no-op for one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)
