"""ANP (adversarial neuron pruning) end to end: masks on clean data, the depth on held-out data."""

import pathlib

import ml_collections

from badnet import pipeline
from badnet.defences import anp
from badnet.io import inputs

FIELDS = {**inputs.FIELDS, **anp.FIELDS}


def run(config: ml_collections.ConfigDict, out: pathlib.Path) -> dict:
  return pipeline.run_learned_masks(anp, config, out)
