"""Neural Cleanse (Wang et al., IEEE S&P 2019): reversed triggers, outlier labels, unlearning.

    python main.py --config=configs/neural_cleanse.py --workdir=workdir/neural_cleanse

Inputs as in configs/prune.py (a model and CSAW-layout data; with neither it
runs on the shipped synthetic benchmark, --config.benchmark=pruning_aware for
the other net). For every label (or those of --config.labels='(0,5,7)') it
optimises the smallest mask and pattern that send clean validation images to
that label, on part of the clean validation split: nc.slots labels at a time
in one vmapped optimisation, a finished label's slot taken by the next. It
then flags the labels whose mask's L1 norm lies more than
nc.anomaly_threshold (2) MADs below the median, and measures each reversed
trigger's attack success on the held-out part. With unlearning.epochs > 0
and a label flagged, it fine-tunes B on the clean part with a
trigger_fraction of the images carrying a flagged trigger under their true
label (configs/fine_prune.py's recipe), the epoch chosen on the held-out
part. Only then does it read the test and poisoned files, to report. It
logs progress and prints

    Flagged: <labels (anomaly index)> or none; median L1 norm <m>, MAD <d> (...)
    | label | L1 norm | anomaly index | flagged | trigger success % (held-out) | steps | found |

(the flagged labels and the smallest norms), then B's and the unlearned net's
and its GoodNet's figures on the test split, and writes results.json
(`labels`, `l1_norms`, `anomaly_index`, `flagged`, `trigger_success`, ...,
`base`, `defended`, `goodnet`, `data`), results.md, triggers.npz (`labels`
[L], `masks` [L, 55, 47] in [0, 1], `patterns` [L, 55, 47, 3] in 0..255:
stamp with (1 - m) x + m p), plots/l1_norms.png, plots/triggers.png and, when
it unlearned, models/defended.h5 (a full Keras model).

The paper's optimisation: steps of ~1000 images (31 batches of 32), at most
1000 steps, early stopping after 25 steps without a smaller mask. That is
hours per label on a CPU; the defaults take steps of one batch of 32 and at
most 200 of them, which fits all 100 labels of a shipped net in 5 minutes
here (WORKSPACE.md, "Neural Cleanse", has the times and why).
The lambda schedule, Adam and the anomaly index are the paper's.
"""

import ml_collections

from configs import fine_prune, prune


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.job = 'neural_cleanse'
  base = prune.get_config()
  config.model, config.benchmark, config.data = base.model, base.benchmark, base.data
  # Labels to reverse engineer: None, every label of the net; or a tuple, e.g. (0, 5, 7).
  # The anomaly index compares the labels given, so it needs many of them.
  config.labels = ml_collections.config_dict.placeholder(tuple)
  config.holdout_fraction = 0.2   # clean validation images held out (trigger success, epoch)
  config.seed = 0                 # the held-out split, the batches, the triggers' starts
  config.batch_size = 512         # evaluation
  config.precision = 'highest'
  config.nc = ml_collections.ConfigDict()
  config.nc.steps = 200           # at most (paper: 1000); most labels stop early before it
  config.nc.batch_size = 32       # images a batch (paper: 32)
  config.nc.batches_per_step = 1  # batches a step (paper: 31, ~1000 images)
  config.nc.learning_rate = 0.1   # Adam on the mask and pattern in tanh space
  config.nc.beta_1 = 0.5
  config.nc.beta_2 = 0.9
  config.nc.init_cost = 1e-3      # lambda once the attack succeeds
  config.nc.attack_threshold = 0.99  # a step succeeds when this fraction reaches the label
  config.nc.patience = 5          # steps in a row before lambda is set, doubled or lowered
  config.nc.cost_multiplier = 2.0  # lambda x 2 up, / 2 ** 1.5 down
  config.nc.early_stop_patience = 25  # steps without a smaller mask (0: never stop early)
  # 'cross_entropy' (the paper's) or 'original_code' (what the authors' Keras code computes:
  # 16.1 (1 - p), its categorical_crossentropy arguments swapped).
  config.nc.loss = 'cross_entropy'
  # Labels optimised together: one vmapped batch of slots x batch_size images a call.
  # On a 2-core CPU one label at a time is fastest (WORKSPACE.md, "Neural Cleanse");
  # on an accelerator, raise it.
  config.nc.slots = 1
  config.nc.anomaly_threshold = 2.0  # flag labels this many MADs below the median norm
  # Unlearning (NC's mitigation): fine-tune on the clean part, trigger_fraction of
  # it stamped with a flagged label's trigger, true labels kept; configs/fine_prune.py's
  # recipe, the epoch chosen on the held-out part. epochs 0: detection only.
  config.unlearning = fine_prune.get_config().finetune
  del config.unlearning['max_clean_drop'], config.unlearning['holdout_fraction']
  config.unlearning.epochs = 8
  config.unlearning.trigger_fraction = 0.2  # paper: 20 %
  return config
