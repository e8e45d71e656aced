"""ANP, adversarial neuron pruning (Wu and Wang, NeurIPS 2021), on clean data only.

    python main.py --config=configs/anp.py --workdir=workdir/anp

Inputs as in configs/prune.py (a model and CSAW-layout data; with neither it
runs on the shipped synthetic benchmark, --config.benchmark=pruning_aware for
the other net). The published method by default: it learns a mask per conv
neuron (conv_1..conv_4) on 80 % of the clean validation split and prunes every
neuron whose mask is at most anp.threshold (0.2), its kernel slice zeroed and
its bias kept; no fine-tuning. The other 20 % is held out: the masks never see
it, and it reports each candidate's clean accuracy. Only then does it read the
test and poisoned files, to report. It prints B's figures, the chosen net's and
its GoodNet's on the test split, and every threshold of the originals' sweep
(0, 0.05, ..., 0.9):

    | candidate | neurons | mask at most | held-out clean %, pruned | ... | test ASR % |

and writes results.json (`method`, `base`, `defended`, `goodnet`, `pruned`,
`model_file`, `tradeoff`, `data`), results.md, masks.npz (the learned masks,
by layer), models/defended.h5 (a full Keras model), plots/tradeoff.png and
plots/masks.png. Departures are named options, reported under their own
method name: anp.selection='holdout' (the deepest of 1, 2, 3, 4, 6, 8, ...
neurons whose held-out clean accuracy loses at most anp.max_clean_drop
points of B's), anp.finetune.epochs=10 (fine-tune the chosen net, or each
candidate, for that many epochs), anp.layers (add fc_1, fc_2). Tuples in
anp.eps, anp.alpha or anp.seeds make a grid, learned together in one vmapped
computation. WORKSPACE.md ("Defaults and their sources") cites each default.
"""

import ml_collections

from configs import _defence


def get_config() -> ml_collections.ConfigDict:
  config = _defence.get_config('anp')
  return config
