"""The working directory of a job: checked before any work, written atomically.

A workdir is new, empty, or one the same job wrote (its ``config.json`` says),
so a mistyped ``--workdir`` never overwrites the user's files. Outputs are
written to a temporary file and renamed, so an interrupted run leaves the
previous results; a failed write stops the job with one line naming the file."""

import contextlib
import json
import os
import pathlib
import re
import tempfile
from collections.abc import Iterator
from typing import Any

from badnet.errors import WorkdirError

MARKER_FILE = 'config.json'
_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read the process umask (there is no way to read it without setting it)
MARKER_KEY = 'badnet_job'
_TMP_SUFFIX = '.tmp'


def owner(path: pathlib.Path) -> str | None:
  """The job that wrote the workdir ``path`` (None: no badnet job did)."""
  try:
    return str(json.loads((path / MARKER_FILE).read_text())[MARKER_KEY])
  except (OSError, ValueError, TypeError, KeyError):
    return None


def prepare(workdir: str | os.PathLike, job: str) -> pathlib.Path:
  """Creates ``workdir`` for ``job``, or checks that ``job`` made it; removes stale temp files."""
  path = pathlib.Path(workdir).expanduser()
  if path.exists() and not path.is_dir():
    raise WorkdirError(f'{path}: the workdir exists and is not a directory')
  if path.is_dir() and any(path.iterdir()):
    wrote = owner(path)
    if wrote is None:
      raise WorkdirError(f'{path}: the workdir holds files that no badnet job wrote '
                         f'(no {MARKER_FILE} with "{MARKER_KEY}"); choose a new or empty one')
    if wrote != job:
      raise WorkdirError(f'{path}: the workdir holds the outputs of a {wrote} job; choose '
                         f'another workdir for this {job} job')
  try:
    path.mkdir(parents=True, exist_ok=True)
    tempfile.TemporaryFile(dir=path).close()
  except OSError as error:
    raise WorkdirError(f'{path}: the workdir is not writable ({error.strerror})') from None
  for stale in leftovers(path):
    stale.unlink()
  return path


def leftovers(path: pathlib.Path) -> list[pathlib.Path]:
  """Temporary files of ``atomic_path`` under ``path`` that a killed run left behind."""
  return sorted(p for p in path.rglob(f'.*{_TMP_SUFFIX}') if p.is_file())


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[pathlib.Path]:
  """Yields a temporary path to write; renames it to ``path`` if the block succeeds."""
  path = pathlib.Path(path)
  tmp = None
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.', suffix=_TMP_SUFFIX)
    os.close(fd)
    yield pathlib.Path(tmp)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; outputs are ordinary files
    os.replace(tmp, path)
  except (OSError, RuntimeError) as error:  # h5py reports a failed flush as RuntimeError
    raise WorkdirError(f'{path}: could not write it ({_reason(error)})') from None
  finally:
    if tmp is not None and os.path.exists(tmp):
      os.unlink(tmp)


def _reason(error: Exception) -> str:
  """Why a write failed, in a few words ('No space left on device')."""
  text = str(error)
  if hdf5 := re.search(r"error message = '([^']+)'", text):  # HDF5 wraps the OS's reason
    return hdf5.group(1)
  if isinstance(error, OSError) and error.strerror:
    return error.strerror
  return (text.splitlines() or [type(error).__name__])[0]


def write_text(path: str | os.PathLike, text: str) -> None:
  with atomic_path(path) as tmp:
    tmp.write_text(text)


def tidy(obj: Any) -> Any:
  """``obj`` with every float at 6 significant digits (99.55, not 99.55000000000001)."""
  if isinstance(obj, float):
    return float(f'{obj:.6g}')
  if isinstance(obj, dict):
    return {key: tidy(value) for key, value in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [tidy(value) for value in obj]
  return obj


def write_json(path: str | os.PathLike, obj: Any) -> None:
  """``obj`` as indented JSON, its floats ``tidy``."""
  write_text(path, json.dumps(tidy(obj), indent=2, sort_keys=False) + '\n')


def write_config(workdir: pathlib.Path, config: Any, job: str) -> None:
  """Writes ``config.json`` (the marker that makes the workdir ours)."""
  values = config.to_dict() if hasattr(config, 'to_dict') else dict(config)
  write_json(workdir / MARKER_FILE, {MARKER_KEY: job, **values})
