"""Config checks declared once: a range or a choice per field, checked by one helper. Each job and
defence maps dotted field names to specs (``Integer``, ``Number``, ``Choice``, ``Boolean``,
``Each``); before any work a bad value stops the job with one line naming the field, what it must
be and what it got."""

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import ml_collections

from badnet.errors import ConfigError

Config = ml_collections.ConfigDict
Bound = float | Callable[[Config], float]


def values(value: Any) -> tuple:
  """A tuple field's values; a single value counts as a tuple of one."""
  return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def _bound(bound: Bound, config: Config) -> float:
  return bound(config) if callable(bound) else bound


class Spec(Protocol):
  def ok(self, value: Any, config: Config) -> bool: ...
  def describe(self, config: Config) -> str: ...


@dataclasses.dataclass(frozen=True)
class Integer:
  """A whole number in [low, high] (either bound optional)."""
  low: int | None = None
  high: Bound | None = None
  what: str | None = None  # the description, if not the default one

  def ok(self, value: Any, config: Config) -> bool:
    return (isinstance(value, int) and not isinstance(value, bool)
            and (self.low is None or value >= self.low)
            and (self.high is None or value <= _bound(self.high, config)))

  def describe(self, config: Config) -> str:
    if self.what:
      return self.what.format(high=None if self.high is None else _bound(self.high, config))
    return {None: 'an integer', 0: 'a whole number >= 0', 1: 'a positive integer'}.get(
        self.low, f'an integer >= {self.low}')


@dataclasses.dataclass(frozen=True)
class Number:
  """A finite int or float between two bounds, each open or closed."""
  low: Bound = -math.inf
  high: Bound = math.inf
  low_open: bool = False
  high_open: bool = False
  what: str | None = None

  def ok(self, value: Any, config: Config) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
      return False
    low, high = _bound(self.low, config), _bound(self.high, config)
    return ((low < value if self.low_open else low <= value)
            and (value < high if self.high_open else value <= high))

  def describe(self, config: Config) -> str:
    if self.what:
      return self.what
    low, high = _bound(self.low, config), _bound(self.high, config)
    if low == 0 and high == math.inf:
      return 'positive' if self.low_open else 'zero or positive'
    return (f'in {"(" if self.low_open else "["}{low:g}, {high:g}'
            f'{")" if self.high_open else "]"}')


@dataclasses.dataclass(frozen=True)
class Choice:
  """One of a fixed set of names; ``what`` names the kind ('order', 'optimizer')."""
  options: Sequence[str]
  what: str

  def ok(self, value: Any, config: Config) -> bool:
    return isinstance(value, str) and value in self.options

  def describe(self, config: Config) -> str:
    return f'one of {", ".join(self.options)}'


@dataclasses.dataclass(frozen=True)
class OfType:
  """A value of one Python type (bool is not taken for int, nor int for bool)."""
  kind: type
  description: str

  def ok(self, value: Any, config: Config) -> bool:
    return type(value) is self.kind or (
        isinstance(value, self.kind) and not isinstance(value, bool))

  def describe(self, config: Config) -> str:
    return self.description


def Boolean() -> OfType:
  """True or False (named like a class, as the other specs are)."""
  return OfType(bool, 'True or False')


def Text() -> OfType:
  return OfType(str, 'a string')


@dataclasses.dataclass(frozen=True)
class Each:
  """A tuple of values (a single value counts as one), not empty, each checked by ``item``."""
  item: Spec
  empty: str = 'give at least one value'  # the advice after 'config.<name> is empty; '
  note: str = ''                          # appended to an element's message

  def check(self, name: str, value: Any, config: Config) -> None:
    items = values(value)
    if not items:
      raise ConfigError(f'config.{name} is empty; {self.empty}')
    for item in items:
      if self.item.ok(item, config):
        continue
      if isinstance(self.item, Choice):
        raise ConfigError(f'config.{name}: unknown {self.item.what} {item!r}; expected some '
                          f'of {", ".join(self.item.options)}')
      raise ConfigError(f'config.{name}: {item!r} is not {self.item.describe(config)}'
                        f'{self.note}')


Fields = Mapping[str, Spec | Each]


def check(config: Config, fields: Fields, prefix: str = '') -> None:
  """Checks every declared field, in order: the first bad one stops with a ConfigError naming
  ``config.<prefix><name>``."""
  for name, spec in fields.items():
    value, shown = config, prefix + name
    for part in name.split('.'):  # config.a.b for name 'a.b'
      value = value[part]
    if isinstance(spec, Each):
      spec.check(shown, value, config)
    elif not spec.ok(value, config):
      if isinstance(spec, Choice):
        raise ConfigError(f'config.{shown}: unknown {spec.what} {value!r}; expected '
                          f'{spec.describe(config)}')
      raise ConfigError(f'config.{shown} must be {spec.describe(config)}, got {value!r}')


# Fields that most jobs share.
BATCH_SIZE: Fields = {'batch_size': Integer(1)}


def block(settings: Any) -> Config:
  """A config block holding a settings dataclass's defaults (nested dataclasses nested)."""
  return ml_collections.ConfigDict(dataclasses.asdict(settings))


def build(cls: type, config_block: Config, where: str) -> Any:
  """Settings of dataclass ``cls`` from a config block, checked first by ``cls.FIELDS``: a missing
  field takes the default, a dataclass default is built from the nested block. Messages name
  ``config.<where><field>``."""
  check(config_block, getattr(cls, 'FIELDS', {}), prefix=where)
  defaults = cls()
  values = {}
  for name in (field.name for field in dataclasses.fields(cls) if field.name in config_block):
    value, default = config_block[name], getattr(defaults, name)
    if dataclasses.is_dataclass(default):
      value = build(type(default), value, f'{where}{name}.')
    elif isinstance(value, list):
      value = tuple(value)
    values[name] = value
  return cls(**values)
