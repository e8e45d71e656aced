"""Compiling for the backend a job runs on: ``jax.jit`` with XLA options chosen per backend.

On a CPU, jaxlib hands convolutions, reductions and some matrix products to
YNNPACK fusions by default. On DeepID's shapes XLA's own CPU code (Eigen) runs
them several times faster, forward and backward, with float32 arithmetic
throughout (WORKSPACE.md, "Training speed"), so ``jit`` turns YNNPACK off on a
CPU. A user whose XLA_FLAGS already set ``xla_cpu_experimental_ynn_fusion_type``
keeps their own choice. GPUs and TPUs get jax's defaults.
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
