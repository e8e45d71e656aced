"""Fine-pruning (Liu, Dolan-Gavitt and Garg, RAID 2018): prune, then fine-tune on clean data.

The defender prunes conv_3 (see ``prune``) and then trains the pruned net on
their clean data only, with the pruned channels held at exactly zero (kernel
slice and bias) through every step, whatever the optimiser. A held-out part of
the clean data chooses the epoch, so no poisoned input ever informs a choice.

Every piece is a pure function over parameter pytrees: ``train.train_step``
is the step (params, optimiser state, batch, mask in; params, state out) and
``fine_prune`` runs it over epochs.
"""

import numpy as np

from badnet import model as model_lib
from badnet import prune, train

Params = model_lib.Params


def holdout_split(labels: np.ndarray, fraction: float, seed: int
                  ) -> tuple[np.ndarray, np.ndarray]:
  """Row indices (training, held out): ``fraction`` of each class held out, seeded.

  Stratified, so every class with at least two images is in both parts; a
  class with one image stays in training.
  """
  rng = np.random.default_rng(seed)
  held = []
  for label in np.unique(labels):
    rows = np.flatnonzero(labels == label)
    count = int(round(fraction * len(rows)))
    count = min(max(count, 1), len(rows) - 1) if len(rows) > 1 else 0
    held.append(rng.permutation(rows)[:count])
  holdout = np.sort(np.concatenate(held)) if held else np.zeros(0, np.int64)
  return np.setdiff1d(np.arange(len(labels)), holdout), holdout


def fine_prune(params: Params, channel_mask: np.ndarray, images: np.ndarray,
               labels: np.ndarray, recipe: train.Recipe, holdout_fraction: float,
               name: str = 'fine-prune',
               layer: str = model_lib.FEATURE_LAYER) -> tuple[Params, list[dict]]:
  """B' = prune(params, mask), fine-tuned on clean (images, labels) with the pruned channels at 0.

  Args:
    params: the backdoored net B.
    channel_mask: [C] 1 keeps, 0 prunes a channel of ``layer`` (all ones:
      fine-tuning alone).
    images, labels: the defender's clean data (uint8 [N, 55, 47, 3], int [N]).
    recipe: optimiser, schedule, epochs, batch size and seed.
    holdout_fraction: the part of (images, labels) held out to choose the
      epoch (the one with the best held-out clean accuracy).
    name: shown in progress logs.
    layer: the pruned layer (conv_3 by default; see ``model.PRUNABLE_LAYERS``).

  Returns:
    The fine-pruned params and the per-epoch history (with ``holdout_acc``).
  """
  mask = prune.check_mask(channel_mask, model_lib.num_channels(params, layer))
  fit_rows, holdout_rows = holdout_split(labels, holdout_fraction, recipe.seed)
  return train.fit(prune.prune(params, mask, layer), images[fit_rows], labels[fit_rows],
                   recipe, channel_mask=mask, hold_pruned_at_zero=True,
                   holdout=(images[holdout_rows], labels[holdout_rows]), name=name,
                   layer=layer)
