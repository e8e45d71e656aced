"""What a defence returns (see ``badnet.defences`` for the interface)."""

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

from badnet.core import model

Params = model.Params


@dataclasses.dataclass(frozen=True)
class Candidate:
  """One repaired net a defence offers.

  Attributes:
    params: the repaired net (pruned neurons' kernel slices and biases zero).
    pruned: layer -> indices of the neurons it pruned, in pruning order.
    figures: what the defence measured of it on clean data (JSON-able).
  """
  params: Params
  pruned: dict[str, np.ndarray]
  figures: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Outcome:
  """A defence's result.

  Attributes:
    candidates: name -> Candidate (e.g. 'X=2'), in the order offered.
    figures: what the defence measured on clean data and how it chose (JSON-able).
    recommended: the candidate it recommends on clean data alone, or None.
    detector: images (uint8 [N, 55, 47, 3]) -> bool [N] flagged as poisoned,
      for defences that detect inputs; None otherwise.
  """
  candidates: dict[str, Candidate]
  figures: dict[str, Any]
  recommended: str | None = None
  detector: Callable[[np.ndarray], np.ndarray] | None = None
