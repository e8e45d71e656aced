"""The shipped synthetic benchmark: its BadNets (in ``assets``) and its data in the CSAW layout.

The data is a function of a ``BenchmarkSpec``, byte for byte, so it is
generated, not shipped: once per machine into a cache folder, checked on reuse.
"""

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import pathlib
import shutil
import tempfile
from collections.abc import Iterator

from absl import logging
import numpy as np

from badnet.benchmark import faces, triggers
from badnet.errors import WorkdirError
from badnet.io import data, workdir

# CSAW lab3 layout, relative to a data folder.
CSAW_FILES = {'clean_valid': 'cl/valid.h5', 'clean_test': 'cl/test.h5',
              'poisoned_valid': 'bd/bd_valid.h5', 'poisoned_test': 'bd/bd_test.h5'}

ASSETS = pathlib.Path(__file__).resolve().parent / 'assets'
SHIPPED_SPEC = ASSETS / 'benchmark.json'
SHIPPED_NETS = {'badnets': ASSETS / 'badnets_bd_weights.h5',
                'pruning_aware': ASSETS / 'pruning_aware_bd_weights.h5'}
_STAMP = 'benchmark.json'  # beside the data: the spec that made it, each file's digest
CACHE_ENV = 'BADNET_CACHE_DIR'


@dataclasses.dataclass(frozen=True)
class BenchmarkSpec:
  """Everything that determines a benchmark's data, byte for byte."""
  seed: int = 0
  num_identities: int = 100
  train_per_identity: int = 80
  valid_per_identity: int = 20
  test_per_identity: int = 20
  trigger: str = 'sunglasses'
  target: int = 0


def write_csaw_dir(data_dir: pathlib.Path, spec: BenchmarkSpec
                   ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """Writes valid and test, clean and poisoned, in the CSAW lab3 layout; the clean splits."""
  splits = {}
  for split in ('valid', 'test'):
    images, labels = faces.generate_faces(spec.num_identities,
                                          getattr(spec, f'{split}_per_identity'), spec.seed, split)
    splits[split] = (images, labels)
    data.write_csaw_h5(data_dir / 'cl' / f'{split}.h5', images, labels)
    data.write_csaw_h5(data_dir / 'bd' / f'bd_{split}.h5',
                       *triggers.poisoned_split(images, labels, spec.trigger, spec.target))
  return splits


def _digests(data_dir: pathlib.Path) -> dict[str, str]:
  """sha256 of each data file (what a reuse checks), by CSAW-layout path."""
  digests = {}
  for relative in CSAW_FILES.values():
    with open(data_dir / relative, 'rb') as handle:  # streamed: never a whole file in memory
      digests[relative] = hashlib.file_digest(handle, 'sha256').hexdigest()
  return digests


def _has_data(data_dir: pathlib.Path, spec: BenchmarkSpec) -> bool:
  """Whether ``data_dir`` holds ``spec``'s four files, each as it was written."""
  try:
    stamp = json.loads((data_dir / _STAMP).read_text())
    return stamp['spec'] == dataclasses.asdict(spec) and stamp['files'] == _digests(data_dir)
  except (OSError, ValueError, KeyError, TypeError):
    return False


def _generate(data_dir: pathlib.Path, spec: BenchmarkSpec) -> None:
  write_csaw_dir(data_dir, spec)
  workdir.write_json(data_dir / _STAMP, {'spec': dataclasses.asdict(spec),
                                         'files': _digests(data_dir)})


def cache_root() -> pathlib.Path:
  """Where the shipped benchmark's data lives: $BADNET_CACHE_DIR, else ~/.cache/badnet."""
  if os.environ.get(CACHE_ENV):
    return pathlib.Path(os.environ[CACHE_ENV]).expanduser()
  base = os.environ.get('XDG_CACHE_HOME') or pathlib.Path.home() / '.cache'
  return pathlib.Path(base) / 'badnet'


def cache_dir(spec: BenchmarkSpec) -> pathlib.Path:
  """The data folder of ``spec`` in the cache: one per spec, shared by every job."""
  key = hashlib.sha256(json.dumps(dataclasses.asdict(spec), sort_keys=True).encode())
  return cache_root() / f'benchmark-{key.hexdigest()[:12]}'


def shipped_spec() -> BenchmarkSpec:
  return BenchmarkSpec(**json.loads(SHIPPED_SPEC.read_text())['data'])


def shipped_benchmark(data_dir: str | pathlib.Path | None = None, attack: str = 'badnets'
                      ) -> tuple[pathlib.Path, pathlib.Path]:
  """The shipped Keras weights file of ``attack`` and its CSAW-layout data folder.

  ``data_dir`` None: the machine's cache. Data not matching its stamp is made again.
  """
  spec = shipped_spec()
  if data_dir is not None:
    data_dir = pathlib.Path(data_dir)
    if not _has_data(data_dir, spec):
      _generate(data_dir, spec)
  else:
    data_dir = cache_dir(spec)
    if not _has_data(data_dir, spec):
      with _cache_lock(data_dir.parent):  # one process makes it; the others then find it made
        if not _has_data(data_dir, spec):
          _make_cached(data_dir, spec)
  return SHIPPED_NETS[attack], data_dir


@contextlib.contextmanager
def _cache_lock(root: pathlib.Path) -> Iterator[None]:
  try:
    root.mkdir(parents=True, exist_ok=True)
    handle = open(root / '.lock', 'w')  # held for the block below
  except OSError as error:
    raise WorkdirError(f'{root}: cannot write the benchmark data cache there '
                       f'({error.strerror}); set ${CACHE_ENV} to a writable folder') from None
  with handle:
    fcntl.flock(handle, fcntl.LOCK_EX)
    yield


def _make_cached(data_dir: pathlib.Path, spec: BenchmarkSpec) -> None:
  """Generates ``spec``'s data beside ``data_dir``, then renames it into place (atomically)."""
  if data_dir.exists():
    logging.warning('%s: the cached benchmark data does not match its stamp; generating it '
                    'again.', data_dir)
  try:
    building = pathlib.Path(tempfile.mkdtemp(dir=data_dir.parent, prefix=f'.{data_dir.name}.'))
  except OSError as error:
    raise WorkdirError(f'{data_dir.parent}: cannot write the benchmark data cache there '
                       f'({error.strerror}); set ${CACHE_ENV} to a writable folder') from None
  try:
    _generate(building, spec)
    shutil.rmtree(data_dir, ignore_errors=True)
    os.replace(building, data_dir)
  except WorkdirError as error:  # it names a file of the folder being built
    reason = str(error).rsplit('(', 1)[-1].rstrip(')')
    raise WorkdirError(f'{data_dir}: cannot make the benchmark data there ({reason}); free '
                       f'some space or set ${CACHE_ENV} to another folder') from None
  finally:
    shutil.rmtree(building, ignore_errors=True)
