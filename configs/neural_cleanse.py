"""Neural Cleanse (Wang et al., IEEE S&P 2019): reversed triggers, outlier labels, unlearning.

    python main.py --config=configs/neural_cleanse.py --workdir=workdir/neural_cleanse

Inputs as in configs/prune.py (a model and CSAW-layout data; with neither it
runs on the shipped synthetic benchmark, --config.benchmark=pruning_aware for
the other net). For every label (or those of --config.neural_cleanse.labels='(0,5,7)') it
optimises the smallest mask and pattern that send clean validation images to
that label, on part of the clean validation split: neural_cleanse.slots labels at a time
in one vmapped optimisation, a finished label's slot taken by the next. It
then flags the labels whose mask's L1 norm lies more than
neural_cleanse.anomaly_threshold (2) MADs below the median, and measures each reversed
trigger's attack success on the held-out part. With neural_cleanse.unlearning.epochs > 0
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

from configs import _defence


def get_config() -> ml_collections.ConfigDict:
  config = _defence.get_config('neural_cleanse')
  # None: every label of the net; or a tuple, e.g. (0, 5, 7).
  config.neural_cleanse.labels = ml_collections.config_dict.placeholder(tuple)
  return config
