"""Any defence end to end: ``config.defence`` with the settings of its block ``config.<defence>``.

The configs prune, fine_prune, anp, rnp, neural_cleanse and strip are this
job with a defence chosen (``badnet.defend`` is the path they all take).
"""

import pathlib

import ml_collections

from badnet import config as config_lib
from badnet import defences, defend, inputs
from badnet.core import model

FIELDS: config_lib.Fields = {
    **inputs.FIELDS,
    'defence': config_lib.Choice(defences.names(), 'defence'),
    'batch_size': config_lib.Integer(1),
    'precision': config_lib.Choice(model.PRECISIONS, 'precision'),
}


def check(config: ml_collections.ConfigDict) -> None:
  defend.check(config)


def owner(config: ml_collections.ConfigDict) -> str:
  """The name a workdir is kept under: the defence's (one defence's outputs per workdir)."""
  return config.defence


def multi_process(config: ml_collections.ConfigDict) -> bool:
  """Whether the defence runs as several processes (the pruning defence's streamed pass)."""
  return getattr(defences.get(config.defence), 'MULTI_PROCESS', False)


def run(config: ml_collections.ConfigDict, out: pathlib.Path) -> dict:
  return defend.run(config, out)
