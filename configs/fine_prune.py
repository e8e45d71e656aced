"""Fine-pruning: the pruning defence, then each pruned net fine-tuned on clean data.

    python main.py --config=configs/fine_prune.py --workdir=workdir/fine_prune

Inputs as in configs/prune.py (a model and CSAW-layout data; with neither it
runs on the shipped synthetic benchmark, --config.benchmark=pruning_aware for
the other net). As the paper: it prunes as the prune job does until clean
validation accuracy has dropped fine_pruning.thresholds = (4,) points, then
fine-tunes B'_X with optax on the clean validation split only, a fixed number
of epochs (the last kept; a held-out part watches it), the pruned channels
held at exactly zero; and it fine-tunes B alone with the same recipe as a
baseline. It prints the prune job's tables, then a fine-pruning table on the
test split

    | net | channels pruned | clean % | ASR % | G clean % | ... | held-out clean % |
    | B fine-tuned alone | 0 | ... |
    | X=<X> fine-pruned | ... |

and the X it recommends on clean data alone (with several X, e.g.
--config.fine_pruning.thresholds="(2,30,85,90)": the deepest X whose
fine-pruned net keeps its held-out clean accuracy within
fine_pruning.max_clean_drop points of B's, in whole held-out images). It
writes the prune job's outputs plus models/fine_pruned_X=<X>.h5 (full
Keras models), plots/fine_prune.png and, in results.json, per X `fine_pruned`
and `goodnet_fine_pruned`, and top-level `fine_tuned_only`, `finetune` and
`recommended`. Measured figures and times: WORKSPACE.md ("Fine-pruning").
"""

import ml_collections

from configs import _defence


def get_config() -> ml_collections.ConfigDict:
  config = _defence.get_config('fine_pruning')
  return config
