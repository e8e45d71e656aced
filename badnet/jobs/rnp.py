"""RNP (reconstructive neuron pruning) end to end: unlearn, recover masks, prune on held-out."""

import pathlib

import ml_collections

from badnet import pipeline
from badnet.defences import rnp
from badnet.io import inputs

FIELDS = {**inputs.FIELDS, **rnp.FIELDS}


def run(config: ml_collections.ConfigDict, out: pathlib.Path) -> dict:
  return pipeline.run_learned_masks(rnp, config, out)
