"""RNP, Reconstructive Neuron Pruning (Li et al., ICML 2023), as a plug-in.

First unlearn: gradient ascent on the clean loss until clean accuracy falls to
``rnp.clean_threshold`` percent. Then, on the unlearned net, learn a mask per
neuron that recovers the clean loss (masks only, clipped to [0, 1]): the
neurons whose masks stay low carried the clean task the unlearning broke
least, the backdoor's. They are pruned from the original net
(``learned_masks`` has the shared machinery); the depth is chosen on held-out
clean data.
"""

import numpy as np

from badnet import config as config_lib
from badnet.core import model as model_lib
from badnet.defences import base, fine_pruning, learned_masks
from badnet.io import data

NAME = 'rnp'
Params = model_lib.Params
FIELDS: config_lib.Fields = {
    **learned_masks.FIELDS,
    'finetune.epochs': config_lib.Integer(0),
    **fine_pruning.recipe_fields(lambda config: config.finetune.epochs, holdout=False),
    'rnp.unlearning_lr': config_lib.Number(0, 10, low_open=True),
    'rnp.unlearning_momentum': config_lib.Number(0, 1, high_open=True),
    'rnp.weight_decay': config_lib.Number(0, 1),
    'rnp.clip_norm': config_lib.Number(0, 1e6, low_open=True),
    'rnp.clean_threshold': config_lib.Number(0, 100),
    'rnp.max_unlearning_epochs': config_lib.Integer(1),
    'rnp.recovering_lr': config_lib.Number(0, 10, low_open=True),
    'rnp.recovering_epochs': config_lib.Integer(1),
    'rnp.alpha': config_lib.Number(0, 1, low_open=True),
    'rnp.batch_size': config_lib.Integer(1),
}


def settings(config: config_lib.Config) -> learned_masks.RnpSettings:
  tune = config.rnp
  return learned_masks.RnpSettings(
      float(tune.unlearning_lr), float(tune.unlearning_momentum), float(tune.weight_decay),
      float(tune.clip_norm), float(tune.clean_threshold), tune.max_unlearning_epochs,
      float(tune.recovering_lr), tune.recovering_epochs, float(tune.alpha), tune.batch_size,
      config.seed)


def learn(params: Params, images: np.ndarray, labels: np.ndarray, config: config_lib.Config
          ) -> tuple[dict[str, learned_masks.Learned], list[dict]]:
  """RNP's masks (one variant, named '') and the unlearning history."""
  mask, history = learned_masks.learn_rnp(params, images, labels, settings(config),
                                          config_lib.values(config.layers), config.precision)
  return {'': mask}, history


def defend(params: Params, clean: data.Dataset, config: config_lib.Config) -> base.Outcome:
  """Masks learned on part of ``clean``; candidates and the choice on the rest of it."""
  fit_rows, holdout_rows = fine_pruning.split_for_fine_tuning(
      clean.labels, config.holdout_fraction, config.seed)
  variant_masks, history = learn(params, clean.images[fit_rows], clean.labels[fit_rows], config)
  outcome = learned_masks.choose(params, clean.images, clean.labels, fit_rows, holdout_rows,
                                 variant_masks, config)
  outcome.figures.update(masks=variant_masks, unlearning=history)
  return outcome
