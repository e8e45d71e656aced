"""RNP, reconstructive neuron pruning (Li et al., ICML 2023), on clean data only.

    python main.py --config=configs/rnp.py --workdir=workdir/rnp

Inputs as in configs/prune.py. The published method by default: on 80 % of
the clean validation split it unlearns (gradient ascent on the clean loss
until training accuracy falls to rnp.clean_threshold percent), learns masks
on the unlearned net's conv neurons that recover the clean task, and prunes
B's neurons whose mask is at most rnp.threshold (0.2), kernel slice zeroed,
bias kept; no fine-tuning. It prints and writes what configs/anp.py does
(results.json also holds the unlearning epochs), with the same options
(rnp.selection='holdout', rnp.finetune.epochs).
"""

import ml_collections

from configs import _defence


def get_config() -> ml_collections.ConfigDict:
  config = _defence.get_config('rnp')
  return config
