"""The types that pass between a defence and the one path that runs it (``badnet.defend``)."""

import dataclasses
import math
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np

from badnet import config as config_lib
from badnet.core import model, train
from badnet.defences import sweep
from badnet.errors import DataError

Params = model.Params


@dataclasses.dataclass(frozen=True)
class Tuning(train.Recipe):
  """A ``train.Recipe`` as a config block holds it, and ``stacking`` (see ``train.stacks``).
  Fine-pruning's recipe as its job was first written, before any of its figures: Adam 1e-3,
  cosine, 10 epochs of batch 64."""
  epochs: int = 10
  batch_size: int = 64
  stacking: str = 'auto'

  FIELDS: ClassVar[config_lib.Fields] = {
      'optimizer': config_lib.Choice(train.OPTIMIZERS, 'optimizer'),
      'schedule': config_lib.Choice(train.SCHEDULES, 'schedule'),
      'batch_size': config_lib.Integer(1),
      'learning_rate': config_lib.Number(0, math.inf, low_open=True, high_open=True),
      'weight_decay': config_lib.Number(0, math.inf, high_open=True),
      'warmup_epochs': config_lib.Number(0, lambda tune: tune.epochs),
      'seed': config_lib.Integer(),
      'epochs': config_lib.Integer(0),
      'stacking': config_lib.Choice(train.STACKING, 'stacking'),
  }

  def recipe(self, epochs: int | None = None) -> train.Recipe:
    """The ``train.Recipe`` (``epochs`` overrides this block's)."""
    fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(train.Recipe)}
    floats = {name: float(fields[name]) for name in ('learning_rate', 'warmup_epochs',
                                                     'weight_decay')}
    return train.Recipe(**{**fields, **floats, **({} if epochs is None else {'epochs': epochs})})


@dataclasses.dataclass(frozen=True)
class Clean:
  """The defender's clean data (the clean validation split) and how to evaluate on it.

  Attributes:
    labels: int [N], every process's rows.
    images: uint8 [N, 55, 47, 3], this process's rows; None where only features were kept.
    features: layer -> this process's rows' ``sweep.Features``, where the path computed them.
    gather: this process's rows of a per-row array -> every process's (identity on one).
  """
  labels: np.ndarray
  images: np.ndarray | None
  batch_size: int = 512
  precision: str = model.DEFAULT_PRECISION
  features: dict[str, sweep.Features] = dataclasses.field(default_factory=dict)
  gather: Callable[[np.ndarray], np.ndarray] = lambda rows: rows
  source: str = 'the clean validation split'  # its file, for messages

  def features_of(self, params: Params, layer: str) -> sweep.Features:
    """The features of ``layer``: the path's, or computed from the images now."""
    if layer not in self.features:
      return sweep.features(params, self.images, self.batch_size, self.precision, layer)
    return self.features[layer]


@dataclasses.dataclass(frozen=True)
class Candidate:
  """One repaired net a defence offers: pruned neurons by layer, in order; clean-data figures."""
  params: Params
  pruned: dict[str, np.ndarray]
  figures: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Outcome:
  """A defence's result.

  Attributes:
    candidates: name -> Candidate (e.g. 'X=2'), in the order offered.
    figures: what it measured on clean data and how it chose (JSON-able, but for arrays).
    recommended: the candidate it recommends on clean data alone, or None.
    detector: uint8 images [N, 55, 47, 3] -> bool [N] flagged as poisoned, or None.
  """
  candidates: dict[str, Candidate]
  figures: dict[str, Any]
  recommended: str | None = None
  detector: Callable[[np.ndarray], np.ndarray] | None = None


def images_allowed(max_drop: float, images: int) -> int:
  """The held-out images ``within_budget`` lets a candidate lose."""
  return math.floor(max_drop * images / 100 + 1e-9)


def within_budget(b_acc: float, acc: float, max_drop: float, images: int) -> bool:
  """Whether accuracy ``acc`` (%) loses at most ``max_drop`` points of ``b_acc`` on ``images``
  held-out images, counted in whole images: a figure's resolution is one, 100 / images points."""
  return round((b_acc - acc) * images / 100) <= images_allowed(max_drop, images)


def holdout_split(labels: np.ndarray, fraction: float, seed: int
                  ) -> tuple[np.ndarray, np.ndarray]:
  """Row indices (training, held out): ``fraction`` of each class held out, stratified, seeded."""
  rng = np.random.default_rng(seed)
  held = []
  for label in np.unique(labels):
    rows = np.flatnonzero(labels == label)
    count = int(round(fraction * len(rows)))
    count = min(max(count, 1), len(rows) - 1) if len(rows) > 1 else 0
    held.append(rng.permutation(rows)[:count])
  holdout = np.sort(np.concatenate(held)) if held else np.zeros(0, np.int64)
  return np.setdiff1d(np.arange(len(labels)), holdout), holdout


def split_for_fine_tuning(labels: np.ndarray, fraction: float, seed: int
                          ) -> tuple[np.ndarray, np.ndarray]:
  """``holdout_split``, refusing a split that leaves either part empty (one clear line)."""
  fit_rows, holdout_rows = holdout_split(labels, fraction, seed)
  if not len(fit_rows) or not len(holdout_rows):
    raise DataError(f'{len(labels)} clean validation images leave {len(fit_rows)} to fine-tune '
                    f'on and {len(holdout_rows)} to hold out (holdout_fraction={fraction}); '
                    f'fine-pruning needs at least two images of some class')
  return fit_rows, holdout_rows
