"""The core: the net, evaluation, training and several devices or hosts.

  model        the CSAW DeepID as a Flax module; one masked apply (observe / resume)
  masks        hard pruning: a layer's channels zeroed by a 0/1 mask
  evaluate     jitted, sharded predictions over a device mesh
  train        optax recipes, the pure train step, fit
  distributed  several processes (hosts) with jax.distributed
  backend      jax.jit with XLA options for the backend (YNNPACK off on a CPU)
  cache        one cached ``functools.partial`` per (function, arguments): one compilation
"""
