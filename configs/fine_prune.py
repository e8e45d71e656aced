"""Fine-pruning: the pruning defence, then each pruned net fine-tuned on clean data.

    python main.py --config=configs/fine_prune.py --workdir=workdir/fine_prune

Inputs as in configs/prune.py (a model and CSAW-layout data; with neither it
runs on the shipped synthetic benchmark, --config.benchmark=pruning_aware for
the other net). For each X it prunes exactly as the prune job does, then
fine-tunes B'_X with optax on the clean validation split only (a held-out
part of it chooses the epoch), the pruned channels held at exactly zero; and
it fine-tunes B alone with the same recipe as a baseline. It prints the prune
job's tables, then a fine-pruning table on the test split

    | net | channels pruned | clean % | ASR % | G clean % | G ASR % | ... | epoch |
    | B fine-tuned alone | 0 | ... |
    | X=<X> fine-pruned | ... |

and the X it recommends on clean data alone (the deepest X whose fine-pruned
net keeps its held-out clean accuracy within finetune.max_clean_drop points of
B's). It writes the prune job's outputs plus models/fine_pruned_X=<X>.h5 (full
Keras models), plots/fine_prune.png and, in results.json, per X `fine_pruned`
and `goodnet_fine_pruned`, and top-level `fine_tuned_only`, `finetune` and
`recommended`. Measured figures and times: WORKSPACE.md ("Fine-pruning").
"""

import ml_collections

from configs import prune


def get_config() -> ml_collections.ConfigDict:
  config = prune.get_config()
  config.job = 'fine_prune'
  # Deeper than the prune job's: fine-tuning wins back the clean accuracy that
  # deep pruning costs (see WORKSPACE.md), and `recommended` picks among them.
  config.thresholds = (2.0, 30.0, 85.0, 90.0)
  config.finetune = ml_collections.ConfigDict()
  # The fine-tuning recipe, the same for every X and for the baseline.
  # 'adam', 'adamw' (decoupled decay) or 'sgd' (momentum 0.9).
  config.finetune.optimizer = 'adam'
  config.finetune.learning_rate = 1e-3    # peak rate
  config.finetune.schedule = 'cosine'     # 'cosine' (to 1 % of the peak) or 'constant'
  config.finetune.warmup_epochs = 0.0     # linear warm-up, in epochs
  config.finetune.epochs = 8
  config.finetune.batch_size = 64         # images per step over all devices
  config.finetune.weight_decay = 0.0      # adamw: decoupled; adam, sgd: L2 on the gradient
  config.finetune.seed = 0                # shuffling and the held-out split
  # The nets (B alone, each X) train in one vmapped step ('vmap') or in turn ('loop');
  # 'auto' stacks them on a GPU or TPU and not on a CPU. Results are the same either way.
  config.finetune.stacking = 'auto'
  # Part of the clean validation split held out to choose the epoch, in (0, 1).
  config.finetune.holdout_fraction = 0.2
  # The recommended X is the deepest whose fine-pruned net keeps its held-out
  # clean accuracy within this many points of B's (clean data only).
  config.finetune.max_clean_drop = 3.0
  return config
