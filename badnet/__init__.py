"""badnet: defending backdoored DeepID face classifiers, in JAX/Flax.

The package, by concern (import modules, e.g. ``from badnet.core import model``):
  core/       the net and its arithmetic: model, masks, evaluate, train, distributed, backend,
              cache
  defences/   defences as plug-ins found by name (``defences.get('pruning')``), and the
              pieces they share: base, goodnet, sweep, learned_masks
  benchmark/  the synthetic benchmark: faces, triggers, attacks, the shipped nets
  io/         files: data (CSAW), keras_io, workdir, tables, report and plots
  config      config checks declared once (ranges and choices per field)
  inputs      a job's model and data files, or the shipped benchmark
  defend      the one path every defence takes: defend, score, report
  runner      runs one job: checks, workdir, config record, run
  jobs/       ablate, classify, defend, evaluate, train_badnet: leaves only the runner calls
"""
