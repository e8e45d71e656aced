"""ANP, Adversarial Neuron Pruning (Wu and Wang, NeurIPS 2021), as a plug-in.

Backdoor neurons are those whose small multiplicative perturbation raises the clean loss most.
ANP learns a mask in [0, 1] per neuron minimising ``alpha * L(m) + (1 - alpha) * max_{|delta|,
|xi| <= eps} L(m, delta, xi)`` on clean data and prunes every neuron whose mask is at most 0.2
(``learned_masks`` holds the shared machinery, and the named departures: a depth chosen on
held-out clean data, fine-tuning)."""

import dataclasses
import functools
import itertools
from typing import ClassVar

import numpy as np

from badnet import config as config_lib
from badnet.core import model as model_lib
from badnet.defences import base, learned_masks

NAME = 'anp'
Params = model_lib.Params
report, markdown = learned_masks.report, learned_masks.markdown


@dataclasses.dataclass(frozen=True)
class Settings(learned_masks.Common):
  """Config block ``anp``: ``learned_masks.Common``'s settings and ANP's: ``eps`` and ``alpha``,
  the perturbation budget and the natural loss's weight; ``seeds``, of the batches and noise
  (tuples of the three form a grid); ``iterations`` SGD mask steps (published: 2000; 1000 here,
  a departure that keeps the job within 5 minutes on a 2-core CPU); ``stacked``: the grid
  vmapped ('vmap'), in turn ('loop') or 'auto' (vmap a grid)."""
  eps: float | tuple[float, ...] = 0.4
  alpha: float | tuple[float, ...] = 0.2
  seeds: tuple[int, ...] = (0,)
  iterations: int = 1000
  batch_size: int = 128
  learning_rate: float = 0.2
  momentum: float = 0.9
  stacked: str = 'auto'

  FIELDS: ClassVar[config_lib.Fields] = {
      **learned_masks.Common.FIELDS,
      'eps': config_lib.Each(config_lib.Number(0, 1)),
      'alpha': config_lib.Each(config_lib.Number(0, 1)),
      'seeds': config_lib.Each(config_lib.Integer()),
      'iterations': config_lib.Integer(1),
      'batch_size': config_lib.Integer(1),
      'learning_rate': config_lib.Number(0, 10, low_open=True),
      'momentum': config_lib.Number(0, 1, high_open=True),
      'stacked': config_lib.Choice(('auto', 'vmap', 'loop'), 'way to run the grid'),
  }


def learn(params: Params, images: np.ndarray, labels: np.ndarray, settings: Settings,
          precision: str = model_lib.DEFAULT_PRECISION
          ) -> tuple[dict[str, learned_masks.Learned], dict]:
  """ANP's masks for every variant of the settings, by variant name, learned on (images, labels)."""
  # The grid: every (eps, alpha, seed) of the settings' tuples.
  axes = map(config_lib.values, (settings.eps, settings.alpha, settings.seeds))
  grid = [learned_masks.AnpSettings(float(eps), float(alpha), int(seed))
          for eps, alpha, seed in itertools.product(*axes)]
  stacked = settings.stacked == 'vmap' or (settings.stacked == 'auto' and len(grid) > 1)
  learned = learned_masks.learn_anp(
      params, images, labels, grid, config_lib.values(settings.layers), settings.iterations,
      settings.batch_size, learned_masks.MaskOptimizer(settings.learning_rate, settings.momentum),
      precision, stacked=stacked)
  # A candidate's prefix: 'eps=0.4 alpha=0.2 seed=0: ' in a grid, '' for a single setting.
  name = lambda v: f'eps={v.eps:g} alpha={v.alpha:g} seed={v.seed}: ' if len(grid) > 1 else ''
  return {name(v): mask for v, mask in zip(grid, learned)}, {}


def defend(params: Params, clean: base.Clean, settings: Settings) -> base.Outcome:
  """Masks learned on part of ``clean``; candidates and the choice on the rest of it."""
  return learned_masks.defend(NAME, params, clean, settings, functools.partial(
      learn, settings=settings, precision=clean.precision))
