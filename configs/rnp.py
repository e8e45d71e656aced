"""RNP, reconstructive neuron pruning (Li et al., ICML 2023), on clean data only.

    python main.py --config=configs/rnp.py --workdir=workdir/rnp

Inputs as in configs/prune.py. On part of the clean validation split it
unlearns (gradient ascent on the clean loss until clean accuracy falls to
rnp.clean_threshold percent), learns masks that recover the clean task on the
unlearned net, then prunes B's neurons with the smallest masks (each candidate
fine-tuned as in configs/anp.py), and keeps the deepest candidate whose held-out clean
accuracy stays within `max_clean_drop` points of B's. It prints and writes
what configs/anp.py does (results.json also holds the unlearning epochs).
"""

import ml_collections

from configs import anp


def get_config() -> ml_collections.ConfigDict:
  config = anp.get_config()
  config.job = 'rnp'
  del config['anp']
  config.rnp = ml_collections.ConfigDict()
  config.rnp.unlearning_lr = 0.01         # SGD ascending the clean loss
  config.rnp.unlearning_momentum = 0.9
  config.rnp.weight_decay = 5e-4
  config.rnp.clip_norm = 20.0             # the gradient's global norm, clipped
  config.rnp.clean_threshold = 20.0       # stop unlearning at this clean accuracy (%)
  config.rnp.max_unlearning_epochs = 20
  config.rnp.recovering_lr = 0.2          # SGD (momentum 0.9) on the masks
  config.rnp.recovering_epochs = 20
  config.rnp.alpha = 0.2                  # the recovering loss's scale
  config.rnp.batch_size = 128
  return config
