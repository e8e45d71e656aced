"""One ``functools.partial`` per (function, arguments): jit caches compiled steps by object."""

import functools
from collections.abc import Callable, Hashable
from typing import Any


@functools.cache
def _bound(fn: Callable[..., Any], kwargs: tuple[tuple[str, Hashable], ...]
           ) -> Callable[..., Any]:
  return functools.partial(fn, **dict(kwargs))


def bind(fn: Callable[..., Any], **kwargs: Hashable) -> Callable[..., Any]:
  """``functools.partial(fn, **kwargs)``, the same object for equal (hashable) arguments."""
  return _bound(fn, tuple(sorted(kwargs.items())))
