"""Defences as plug-ins, found by name: ``get(name)`` imports and checks one, ``names()`` lists.

A defence is a module ``badnet.defences.<name>`` that defines

  NAME: str   its name (the module's, and its config block's)
  Settings    a frozen dataclass of its settings' defaults, their checks in ``Settings.FIELDS``
              (``config.build`` makes one from ``config.<name>``)
  defend(params, clean, settings) -> base.Outcome
      repairs the backdoored net ``params`` from ``clean`` (``base.Clean``, the clean
      validation split) alone: the nets it offers, an optional detector, its clean-data
      figures and the candidate it recommends, if any.
  report(outcome, scorer, settings, out) -> dict
      its part of results.json, from the outcome and the shared scorer's classes on the
      test and poisoned files; writes its files to ``out`` (None: a process that writes none).
  markdown(results, printed=False) -> str
      results.md (``printed``: what the job prints, perhaps shorter).

and optionally ``READS`` ('features' or 'both': the pruned layer's features are computed
for it), ``MULTI_PROCESS`` and ``check(settings, config)`` (checks that need a file, before
any work). ``badnet.defend`` runs them all; a defence never reads a poisoned file.
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
  missing = [attr for attr in ('NAME', 'Settings', 'defend', 'report', 'markdown')
             if not hasattr(module, attr)]
  if missing:
    raise TypeError(f'badnet.defences.{name} lacks {", ".join(missing)}')
  return module
