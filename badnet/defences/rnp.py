"""RNP, Reconstructive Neuron Pruning (Li et al., ICML 2023), as a plug-in.

Unlearn by gradient ascent on the clean loss until clean accuracy falls to ``clean_threshold``
percent, then learn per-neuron masks in [0, 1] on the unlearned net that recover the clean loss:
neurons whose masks stay at most 0.2 carry the backdoor and are pruned from the original net
(the threshold of the original's README run; the options of ``learned_masks.Common`` depart)."""

import dataclasses
from typing import ClassVar

import numpy as np

from badnet import config as config_lib
from badnet.core import model as model_lib
from badnet.defences import base, learned_masks

NAME = 'rnp'
Params = model_lib.Params
report, markdown = learned_masks.report, learned_masks.markdown


@dataclasses.dataclass(frozen=True)
class Settings(learned_masks.RnpSettings, learned_masks.Common):
  """Config block ``rnp``: ``learned_masks.Common``'s and ``RnpSettings``' settings; ``seed``
  seeds both the held-out split and the unlearning's shuffles."""
  FIELDS: ClassVar[config_lib.Fields] = {
      **learned_masks.Common.FIELDS,
      'unlearning_lr': config_lib.Number(0, 10, low_open=True),
      'unlearning_momentum': config_lib.Number(0, 1, high_open=True),
      'weight_decay': config_lib.Number(0, 1),
      'clip_norm': config_lib.Number(0, 1e6),
      'unlearning_milestones': config_lib.Each(config_lib.Integer(1)),
      'clean_threshold': config_lib.Number(0, 100),
      'max_unlearning_epochs': config_lib.Integer(1),
      'recovering_lr': config_lib.Number(0, 10, low_open=True),
      'recovering_epochs': config_lib.Integer(1),
      'alpha': config_lib.Number(0, 1, low_open=True),
      'batch_size': config_lib.Integer(1),
  }


def learn(params: Params, images: np.ndarray, labels: np.ndarray, settings: Settings,
          precision: str = model_lib.DEFAULT_PRECISION
          ) -> tuple[dict[str, learned_masks.Learned], dict]:
  """RNP's masks (one variant, named '') and its unlearning history."""
  mask, history = learned_masks.learn_rnp(params, images, labels, settings,
                                          config_lib.values(settings.layers), precision)
  return {'': mask}, {'unlearning': history}


def defend(params: Params, clean: base.Clean, settings: Settings) -> base.Outcome:
  """Masks learned on part of ``clean``; candidates and the choice on the rest of it."""
  return learned_masks.defend(
      NAME, params, clean, settings,
      lambda params, images, labels: learn(params, images, labels, settings, clean.precision))
