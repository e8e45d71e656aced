"""The working directory of a job: checked before any work, written atomically.

A workdir is either new, empty, or one a badnet job wrote before (it holds
``config.json`` with a ``badnet_job`` key). Anything else is refused, so a
mistyped ``--workdir`` never overwrites a user's files. Every output is written
to a temporary file in the same folder and renamed over the old one, so a rerun
replaces results atomically and an interrupted run leaves the previous ones.
"""

import contextlib
import json
import os
import pathlib
import tempfile
from collections.abc import Iterator
from typing import Any

from badnet.errors import WorkdirError

MARKER_FILE = 'config.json'
_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read the process umask (there is no way to read it without setting it)
MARKER_KEY = 'badnet_job'


def _is_ours(path: pathlib.Path) -> bool:
  try:
    return MARKER_KEY in json.loads((path / MARKER_FILE).read_text())
  except (OSError, ValueError, TypeError):
    return False


def prepare(workdir: str | os.PathLike) -> pathlib.Path:
  """Creates ``workdir`` or checks that a badnet job made it; checks it is writable."""
  path = pathlib.Path(workdir).expanduser()
  if path.exists() and not path.is_dir():
    raise WorkdirError(f'{path}: the workdir exists and is not a directory')
  if path.is_dir() and any(path.iterdir()) and not _is_ours(path):
    raise WorkdirError(f'{path}: the workdir holds files that no badnet job wrote '
                       f'(no {MARKER_FILE} with "{MARKER_KEY}"); choose a new or empty one')
  try:
    path.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=path):
      pass
  except OSError as error:
    raise WorkdirError(f'{path}: the workdir is not writable ({error.strerror})') from None
  return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[pathlib.Path]:
  """Yields a temporary path to write; renames it to ``path`` if the block succeeds."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.', suffix='.tmp')
  os.close(fd)
  try:
    yield pathlib.Path(tmp)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; outputs are ordinary files
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)


def write_text(path: str | os.PathLike, text: str) -> None:
  with atomic_path(path) as tmp:
    tmp.write_text(text)


def write_json(path: str | os.PathLike, obj: Any) -> None:
  write_text(path, json.dumps(obj, indent=2, sort_keys=False) + '\n')


def write_config(workdir: pathlib.Path, config: Any, job: str) -> None:
  """Writes ``config.json`` (the marker that makes the workdir ours)."""
  values = config.to_dict() if hasattr(config, 'to_dict') else dict(config)
  write_json(workdir / MARKER_FILE, {MARKER_KEY: job, **values})
