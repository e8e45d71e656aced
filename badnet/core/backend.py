"""``jax.jit`` with XLA options chosen per backend.

On DeepID's shapes XLA's own CPU code (Eigen) runs convolutions and reductions
faster, in float32, than the YNNPACK fusions jaxlib uses by default, so ``jit``
turns YNNPACK off on a CPU unless XLA_FLAGS sets the option.
"""

import os
from collections.abc import Callable
from typing import Any

import jax

YNN_OPTION = 'xla_cpu_experimental_ynn_fusion_type'


def compiler_options() -> dict[str, str] | None:
  """XLA options for ``jax.jit`` on the default backend (None: jax's defaults)."""
  if jax.default_backend() != 'cpu' or YNN_OPTION in os.environ.get('XLA_FLAGS', ''):
    return None
  return {YNN_OPTION: ''}  # an empty list of fusion types: none goes to YNNPACK


def jit(fun: Callable[..., Any], **kwargs: Any) -> Any:
  """``jax.jit(fun, **kwargs)`` with ``compiler_options()`` for the default backend."""
  return jax.jit(fun, compiler_options=compiler_options(), **kwargs)
