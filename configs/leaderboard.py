"""The leaderboard: every defence on every net of the shipped zoo, summarised by kind of net.

    python main.py --config=configs/leaderboard.py --workdir=workdir/leaderboard

A preset of the ablation job (configs/ablate.py): the same grid, one cell per
(net, defence), each defence run through the one defend path on the net's
clean validation split and scored on its test files. The defences: pruning as
configs/prune.py runs it (conv_3, increasing mean activation, X = 2, 4, 10, 30),
fine-pruning, ANP, RNP, Neural Cleanse and STRIP with their defaults, and the
named variants worth setting beside them (ANP and RNP choosing their depth on
held-out clean data, as badnet did before their papers' threshold). The nets:
the whole zoo, clean (the negative control), BadNets, blended and
pruning-aware, several training seeds of each. It prints each finished cell
with the time left, then leaderboard.md; it writes

    leaderboard.md    repairing defences: clean accuracy, ASR and DER, mean ± 95 %
                      interval over the nets of a kind; detectors: nets whose target
                      was flagged, nets with any label flagged (false positives on
                      clean nets), STRIP's FRR and FAR; seconds per cell; the date,
                      commit and machine
    leaderboard.csv   each net's row and each group's mean with its 95 % half-width
    ablation.csv      every row of every cell (the ablation job's columns)
    plots/leaderboard.png, plots/curves.png (the pruning sweeps), results.json, config.json

A rerun into the same workdir runs only the cells not done (a new defence, a
new net). Fewer nets or defences: --config.models="('badnets', 'clean')"
--config.defences="('pruning', 'strip')". The committed board and its time
are in results/leaderboard.md (with .csv and .png) and WORKSPACE.md.
"""

import ml_collections

from badnet.benchmark import shipped
from configs import ablate


def zoo() -> tuple[str, ...]:
  """Every shipped net, kind by kind."""
  return tuple(name for kind in shipped.KINDS for name in shipped.nets_of_kind(kind))


def get_config() -> ml_collections.ConfigDict:
  config = ablate.get_config()
  config.board = True
  config.models = zoo()
  # The quick ones first: an interrupted board has whole defences done.
  config.defences = ('pruning', 'fine_pruning', 'rnp', 'rnp:selection=holdout', 'strip',
                     'neural_cleanse', 'anp', 'anp:selection=holdout')
  # The channel grid as the pruning defence's defaults (configs/prune.py).
  pruning = config.pruning
  config.layers = (pruning.layer,)
  config.orders = (pruning.order,)
  config.seeds = (pruning.seed,)
  config.thresholds = tuple(pruning.thresholds)
  config.finetune_epochs = (0,)
  config.relative = pruning.relative
  return config
