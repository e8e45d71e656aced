"""Defences as plug-ins, found by name (as big_vision finds its evaluators).

A defence is a module ``badnet.defences.<name>`` that defines

  NAME: str                 its name (the module's)
  FIELDS: config.Fields     its config fields and their checks
  defend(params, clean, config) -> base.Outcome
      params: the backdoored net B (a params pytree);
      clean:  the defender's clean data (an ``io.data.Dataset``, the clean
              validation split): the only data a defence ever sees;
      config: an ml_collections config holding FIELDS.
      It returns the repaired nets it offers (``Outcome.candidates``, each
      with the neurons it pruned and its clean-data figures), an optional
      detector (inputs -> flagged), what it measured on clean data and how it
      chose (``Outcome.figures``), and the candidate it recommends, if any.

Scoring on poisoned data is the caller's (``defences.goodnet.figures`` for
a repaired net and its GoodNet); a defence never reads a poisoned file.
``get(name)`` imports and checks a defence; ``names()`` lists them.
"""

import importlib
import pkgutil
from types import ModuleType

from badnet.errors import ConfigError

# Modules of this package that are shared pieces, not defences.
_NOT_DEFENCES = frozenset({'base', 'goodnet', 'learned_masks', 'sweep'})


def names() -> tuple[str, ...]:
  """Every defence in badnet/defences."""
  return tuple(sorted(info.name for info in pkgutil.iter_modules(__path__)
                      if info.name not in _NOT_DEFENCES))


def get(name: str) -> ModuleType:
  """The defence module ``name``, checked to have the interface above."""
  if name not in names():
    raise ConfigError(f'unknown defence {name!r}; expected one of {", ".join(names())}')
  module = importlib.import_module(f'{__name__}.{name}')
  missing = [attr for attr in ('NAME', 'FIELDS', 'defend') if not hasattr(module, attr)]
  if missing:
    raise TypeError(f'badnet.defences.{name} lacks {", ".join(missing)}')
  return module
