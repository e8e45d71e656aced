"""The shipped synthetic benchmark: its data in the CSAW layout and its BadNets.

The data is a function of a ``BenchmarkSpec`` (the face generator's seed and
sizes, the trigger, the target), byte for byte, so it is regenerated, never
shipped; the nets trained on it ship in ``badnet/benchmark/assets``.
"""

import dataclasses
import json
import pathlib

import numpy as np

from badnet.benchmark import faces, triggers
from badnet.io import data, workdir

# CSAW lab3 layout, relative to a data folder.
CSAW_FILES = {'clean_valid': 'cl/valid.h5', 'clean_test': 'cl/test.h5',
              'poisoned_valid': 'bd/bd_valid.h5', 'poisoned_test': 'bd/bd_test.h5'}

ASSETS = pathlib.Path(__file__).resolve().parent / 'assets'
SHIPPED_SPEC = ASSETS / 'benchmark.json'
SHIPPED_NETS = {'badnets': ASSETS / 'badnets_bd_weights.h5',
                'pruning_aware': ASSETS / 'pruning_aware_bd_weights.h5'}
_STAMP = 'benchmark.json'  # written beside the data: which spec made it


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

  def per_identity(self, split: str) -> int:
    return getattr(self, f'{split}_per_identity')


def write_csaw_dir(data_dir: pathlib.Path, spec: BenchmarkSpec
                   ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """Generates valid and test and writes them in the CSAW lab3 layout; returns the clean splits.

  cl/{valid,test}.h5 hold the clean images; bd/bd_{valid,test}.h5 every
  non-target image with the trigger, labelled with the target, as CSAW does.
  A stamp records the spec, so a later call with the same spec reuses the files.
  """
  splits = {}
  for split in ('valid', 'test'):
    images, labels = faces.generate_faces(spec.num_identities, spec.per_identity(split),
                                          spec.seed, split)
    splits[split] = (images, labels)
    data.write_csaw_h5(data_dir / 'cl' / f'{split}.h5', images, labels)
    data.write_csaw_h5(data_dir / 'bd' / f'bd_{split}.h5',
                       *triggers.poisoned_split(images, labels, spec.trigger, spec.target))
  workdir.write_json(data_dir / _STAMP, dataclasses.asdict(spec))
  return splits


def _has_data(data_dir: pathlib.Path, spec: BenchmarkSpec) -> bool:
  files = CSAW_FILES.values()
  try:
    stamp = json.loads((data_dir / _STAMP).read_text())
  except (OSError, ValueError):
    return False
  return stamp == dataclasses.asdict(spec) and all((data_dir / f).is_file() for f in files)


def shipped_spec() -> BenchmarkSpec:
  return BenchmarkSpec(**json.loads(SHIPPED_SPEC.read_text())['data'])


def shipped_benchmark(data_dir: str | pathlib.Path, attack: str = 'badnets'
                      ) -> tuple[pathlib.Path, pathlib.Path]:
  """The shipped benchmark BadNet and its data, regenerated under ``data_dir`` if needed.

  Returns:
    The path of the shipped Keras weights file and the CSAW-layout data folder.
  """
  data_dir = pathlib.Path(data_dir)
  spec = shipped_spec()
  if not _has_data(data_dir, spec):
    write_csaw_dir(data_dir, spec)
  return SHIPPED_NETS[attack], data_dir
