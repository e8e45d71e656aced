"""The shipped synthetic benchmark: its zoo of nets (in ``assets``), their data in the CSAW layout.

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
SHIPPED_SPEC = ASSETS / 'benchmark.json'  # the zoo's manifest: each net's kind, data, config
# The kinds of net in the zoo: the clean control and three attacks.
KINDS = ('clean', 'badnets', 'blended', 'pruning_aware')
KIND_TEXT = {'clean': 'clean (no backdoor)', 'badnets': 'BadNets', 'blended': 'blended trigger',
             'pruning_aware': 'pruning-aware'}
_STAMP = 'benchmark.json'  # beside the data: the spec that made it, each file's digest
CACHE_ENV = 'BADNET_CACHE_DIR'


def manifest() -> dict:
  """The shipped zoo's manifest: {'nets': {name: {file, kind, seed, data, config, results}}}."""
  return json.loads(SHIPPED_SPEC.read_text())


def zoo_name(kind: str, seed: int) -> str:
  """A shipped net's name: its kind for training seed 0, '<kind>_s<seed>' for the others."""
  return kind if seed == 0 else f'{kind}_s{seed}'


def kind_of_config(attack: str, trigger: str) -> str:
  """The zoo kind a training config makes: the clean control, or the attack (blended by its
  trigger)."""
  if attack == 'clean':
    return 'clean'
  return 'blended' if trigger == 'blended' else attack


# Every shipped net by name, in the manifest's order; KINDS order the board.
SHIPPED_NETS = {name: ASSETS / entry['file'] for name, entry in manifest()['nets'].items()}


def kind_of(name: str) -> str:
  return manifest()['nets'][name]['kind']


def nets_of_kind(kind: str) -> list[str]:
  return [name for name, entry in manifest()['nets'].items() if entry['kind'] == kind]


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


def net_spec(name: str) -> BenchmarkSpec:
  """The data spec of shipped net ``name`` (its clean data, and its trigger in the poisoned)."""
  return BenchmarkSpec(**manifest()['nets'][name]['data'])


def shipped_spec() -> BenchmarkSpec:
  """The default net's ('badnets') data spec."""
  return net_spec('badnets')


def shipped_benchmark(data_dir: str | pathlib.Path | None = None, name: str = 'badnets'
                      ) -> tuple[pathlib.Path, pathlib.Path]:
  """The shipped Keras weights file of net ``name`` and its CSAW-layout data folder.

  ``data_dir`` None: the machine's cache. Data not matching its stamp is made again.
  """
  spec = net_spec(name)
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
  return SHIPPED_NETS[name], data_dir


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
