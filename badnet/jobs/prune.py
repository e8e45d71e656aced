"""The pruning defence and GoodNet, end to end: sweep, thresholds, reports, repaired nets."""

import pathlib

import ml_collections

from badnet import pipeline
from badnet.core import distributed
from badnet.defences import pruning
from badnet.io import inputs, report, workdir

FIELDS = {**inputs.FIELDS, **pruning.FIELDS}
MULTI_PROCESS = True


def run(config: ml_collections.ConfigDict, out: pathlib.Path) -> dict:
  """Runs the defence; writes sweep.csv, results.json/.md, plots and repaired nets."""
  run_ = pipeline.run_pruning(config, out)
  if distributed.is_leader():
    pipeline.write_repaired(out, run_)
    report.write_results(out, run_.results, run_.clean_acc, run_.asr, run_.levels)
    print(report.summary(run_.results), flush=True)
  return workdir.tidy(run_.results)
