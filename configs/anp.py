"""ANP, adversarial neuron pruning (Wu and Wang, NeurIPS 2021), on clean data only.

    python main.py --config=configs/anp.py --workdir=workdir/anp

Inputs as in configs/prune.py (a model and CSAW-layout data; with neither it
runs on the shipped synthetic benchmark, --config.benchmark=pruning_aware for
the other net). It learns a mask per neuron of conv_1..conv_4, fc_1 and fc_2
on part of the clean validation split (the rest held out), prunes the neurons
with the smallest masks at depths 1, 2, 3, 4, 6, 8, 12, ... (learned_masks.DEPTHS),
fine-tunes each pruned net on the same clean part with its pruned neurons held
at zero (anp.finetune.epochs; 0: pruning alone), and keeps the deepest candidate
whose held-out clean accuracy stays within `anp.max_clean_drop` points of B's.
Only then does it read the test and poisoned files, to report. It prints B's
figures, the chosen net's and its GoodNet's on the test split and
the whole trade-off:

    | candidate | mask at most | held-out clean % (pruned / fine-tuned) | test clean % | ...

and writes results.json (`base`, `defended`, `goodnet`, `pruned`,
`model_file`, `tradeoff`, `data`), results.md, masks.npz (the learned masks,
by layer), models/defended.h5 (a full Keras model: the pruned neurons' kernel
slices and biases zeroed), plots/tradeoff.png and plots/masks.png. Tuples in
anp.eps, anp.alpha or anp.seeds make a grid, learned together in one vmapped
computation (anp.stacked='auto': vmap for a grid; 'loop': one after another).
The published settings are 2000 iterations of batch 128 and pruning alone;
the defaults are 300 iterations and each candidate fine-tuned with
configs/fine_prune.py's recipe (8 epochs); WORKSPACE.md ("Learned-mask
pruning") has their times and says why fine-tuning is on by default.
"""

import ml_collections

from configs import _defence


def get_config() -> ml_collections.ConfigDict:
  config = _defence.get_config('anp')
  return config
