"""ANP, Adversarial Neuron Pruning (Wu and Wang, NeurIPS 2021), as a plug-in.

Backdoor neurons are the ones whose small multiplicative perturbation raises
the clean loss most. ANP learns a mask in [0, 1] per neuron that minimises
``alpha * L(m) + (1 - alpha) * max_{|delta|, |xi| <= eps} L(m, delta, xi)`` on
a little clean data, then prunes the neurons with small masks
(``learned_masks`` has the shared machinery and the departures from the
original). Settings given as tuples (``anp.eps``, ``anp.alpha``,
``anp.seeds``) form a grid whose masks are learned together in one vmapped
computation; every choice is made on held-out clean data.
"""

import itertools

import numpy as np

from badnet import config as config_lib
from badnet.core import model as model_lib
from badnet.defences import base, fine_pruning, learned_masks
from badnet.io import data

NAME = 'anp'
Params = model_lib.Params
FIELDS: config_lib.Fields = {
    **learned_masks.FIELDS,
    'finetune.epochs': config_lib.Integer(0),
    **fine_pruning.recipe_fields(lambda config: config.finetune.epochs, holdout=False),
    'anp.eps': config_lib.Each(config_lib.Number(0, 1)),
    'anp.alpha': config_lib.Each(config_lib.Number(0, 1)),
    'anp.seeds': config_lib.Each(config_lib.Integer()),
    'anp.iterations': config_lib.Integer(1),
    'anp.batch_size': config_lib.Integer(1),
    'anp.learning_rate': config_lib.Number(0, 10, low_open=True),
    'anp.momentum': config_lib.Number(0, 1, high_open=True),
    'anp.stacked': config_lib.Choice(('auto', 'vmap', 'loop'), 'way to run the grid'),
}


def variants(config: config_lib.Config) -> list[learned_masks.AnpSettings]:
  """The grid of settings: every (eps, alpha, seed) of the config's tuples."""
  return [learned_masks.AnpSettings(float(eps), float(alpha), int(seed))
          for eps, alpha, seed in itertools.product(config_lib.values(config.anp.eps),
                                                    config_lib.values(config.anp.alpha),
                                                    config_lib.values(config.anp.seeds))]


def variant_name(settings: learned_masks.AnpSettings, grid: bool) -> str:
  """'' for a single setting; 'eps=0.4 alpha=0.2 seed=0: ' in a grid (a candidate's prefix)."""
  return f'eps={settings.eps:g} alpha={settings.alpha:g} seed={settings.seed}: ' if grid else ''


def learn(params: Params, images: np.ndarray, labels: np.ndarray, config: config_lib.Config
          ) -> dict[str, learned_masks.Learned]:
  """ANP's masks for every variant of the config, by variant name, learned on (images, labels)."""
  grid = variants(config)
  stacked = config.anp.stacked == 'vmap' or (config.anp.stacked == 'auto' and len(grid) > 1)
  learned = learned_masks.learn_anp(
      params, images, labels, grid, config_lib.values(config.layers), config.anp.iterations,
      config.anp.batch_size, learned_masks.MaskOptimizer(config.anp.learning_rate,
                                                         config.anp.momentum),
      config.precision, stacked=stacked)
  return {variant_name(v, len(grid) > 1): mask for v, mask in zip(grid, learned)}


def defend(params: Params, clean: data.Dataset, config: config_lib.Config) -> base.Outcome:
  """Masks learned on part of ``clean``; candidates and the choice on the rest of it."""
  fit_rows, holdout_rows = fine_pruning.split_for_fine_tuning(
      clean.labels, config.holdout_fraction, config.seed)
  variant_masks = learn(params, clean.images[fit_rows], clean.labels[fit_rows], config)
  outcome = learned_masks.choose(params, clean.images, clean.labels, fit_rows, holdout_rows,
                                 variant_masks, config)
  outcome.figures['masks'] = variant_masks
  return outcome
