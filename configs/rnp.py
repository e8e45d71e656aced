"""RNP, reconstructive neuron pruning (Li et al., ICML 2023), on clean data only.

    python main.py --config=configs/rnp.py --workdir=workdir/rnp

Inputs as in configs/prune.py. On part of the clean validation split it
unlearns (gradient ascent on the clean loss until clean accuracy falls to
rnp.clean_threshold percent), learns masks that recover the clean task on the
unlearned net, then prunes B's neurons with the smallest masks (each candidate
fine-tuned as in configs/anp.py), and keeps the deepest candidate whose held-out clean
accuracy stays within `rnp.max_clean_drop` points of B's. It prints and writes
what configs/anp.py does (results.json also holds the unlearning epochs).
"""

import ml_collections

from configs import _defence


def get_config() -> ml_collections.ConfigDict:
  config = _defence.get_config('rnp')
  return config
