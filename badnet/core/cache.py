"""One bound function per (function, keyword arguments), so jit compiles it once.

``jax.jit`` and ``evaluate.map_batches`` cache compiled steps by the function
object. A fresh ``functools.partial`` per call would be a new object, hence a
new compilation, every time; ``bind`` returns the same object for the same
arguments (big_vision's cacheable partials do the same).
"""

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
