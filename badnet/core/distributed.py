"""Running one job as several processes (hosts) with ``jax.distributed``.

Per-image results do not depend on other images, so each process reads a contiguous block of each
file's rows and the rows are gathered back in order: every process then holds what a one-process
run would, and process 0 writes the outputs. With one process nothing here calls jax.distributed.
"""

import json
from collections.abc import Callable
from typing import Any, TypeVar

import jax
from jax.experimental import multihost_utils
import numpy as np

from badnet.errors import BadnetError

Result = TypeVar('Result')


def initialize(coordinator_address: str = '', num_processes: int = 1,
               process_id: int = 0, auto: bool = False) -> None:
  """Joins a multi-process run at ``coordinator_address`` (host:port), or as JAX finds (auto)."""
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
  """Every process's rows of ``local`` (leaves [rows, ...]; ``count`` in all), in row order."""
  processes = jax.process_count()
  if processes == 1:
    return local
  ranges = [row_range(count, p, processes) for p in range(processes)]
  largest = max(stop - start for start, stop in ranges)
  # process_allgather needs the same shape on every process.
  pad = lambda leaf: np.pad(leaf, [(0, largest - len(leaf))] + [(0, 0)] * (np.ndim(leaf) - 1))
  stacked = multihost_utils.process_allgather(jax.tree.map(pad, local))
  return jax.tree.map(
      lambda leaf: np.concatenate([leaf[p, :stop - start]
                                   for p, (start, stop) in enumerate(ranges)]), stacked)


def on_every_process(fn: Callable[..., Result], *args: Any) -> Result:
  """``fn(*args)``, where a user error on any process stops every process.

  Otherwise a process that hits bad input would exit while the others wait in
  the next gather. Call it at the same point on every process.
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
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def gather_objects(local: Any) -> list[Any]:
  """Every process's JSON-able ``local``, in process order (``[local]`` on one process)."""
  if jax.process_count() == 1:
    return [local]
  encoded = np.frombuffer(json.dumps(local).encode(), np.uint8)
  sizes = multihost_utils.process_allgather(np.array(len(encoded)))
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[:len(encoded)] = encoded
  gathered = multihost_utils.process_allgather(padded)
  return [json.loads(bytes(row[:size]).decode()) for row, size in zip(gathered, sizes)]
