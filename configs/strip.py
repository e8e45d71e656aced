"""STRIP (Gao et al., ACSAC 2019): flag inputs whose prediction survives superimposed clean images.

    python main.py --config=configs/strip.py --workdir=workdir/strip

Inputs as in configs/prune.py (a model and CSAW-layout data; with neither it
runs on the shipped synthetic benchmark, --config.benchmark=pruning_aware for
the other net). It splits the clean validation split in two (class-stratified,
seeded): the overlays, and the clean inputs whose entropies fix the threshold
(a normal fitted to them, cut at strip.frr %). Only then does it read the test
files: every clean and poisoned test input is superimposed with
strip.overlays clean images, and flagged when the mean entropy of the
predictions is below the threshold. With a repaired net (strip.repaired, e.g.
a prune job's models/repaired_X=2.h5, or one computed by the pruning defence
at strip.goodnet_x) it also scores GoodNet (B and the repaired net disagree) and
the composed detector (flagged by STRIP or GoodNet). It prints

    | detector | false rejection % (clean flagged) | false acceptance % (poisoned passed) | ...

on the test split and writes results.json (`strip`: N, blend, threshold, the
normal fit, the realised rate on the fitting inputs; `test`: per detector
its rates and the clean accuracy and ASR of B behind it; `goodnet`; `data`),
results.md, entropies.npz (clean_valid_fit, clean_test, poisoned_test) and
plots/entropy.png (the histograms and the threshold). Measured figures,
the choice of blend and times: WORKSPACE.md ("STRIP").
"""

import ml_collections

from configs import _defence


def get_config() -> ml_collections.ConfigDict:
  config = _defence.get_config('strip')
  config.batch_size = 100  # blended images per forward pass
  return config
