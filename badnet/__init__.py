"""badnet: defending backdoored DeepID face classifiers, in JAX/Flax.

The library, by concern (import the modules, e.g. ``from badnet.core import model``):
  core/        the net and its arithmetic: model (one masked apply), masks (hard
               pruning), evaluate (sharded predictions), train (optax), distributed,
               cache (cached partials: one compilation each)
  defences/    defences as plug-ins found by name (``defences.get('pruning')``):
               pruning, fine_pruning; and what they share: sweep (the exact fast
               sweep), goodnet (GoodNet and its figures), base (what a defence returns)
  benchmark/   the synthetic benchmark: faces, triggers, attacks, the shipped nets
  io/          files: keras_io, data (CSAW), inputs, workdir, tables, report
  pipeline     the pruning pipeline the prune and fine-prune jobs share
  config       config checks declared once (ranges and choices per field)
  runner       runs one job: checks, workdir, config record, run
  jobs/        the jobs, leaves that only the runner calls
"""
