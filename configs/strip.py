"""STRIP (Gao et al., ACSAC 2019): flag inputs whose prediction survives superimposed clean images.

    python main.py --config=configs/strip.py --workdir=workdir/strip

Inputs as in configs/prune.py (a model and CSAW-layout data; with neither it
runs on the shipped synthetic benchmark, --config.benchmark=pruning_aware for
the other net). It splits the clean validation split in two (class-stratified,
seeded): the overlays, and the clean inputs whose entropies fix the threshold
(a normal fitted to them, cut at strip.frr %). Only then does it read the test
files: every clean and poisoned test input is superimposed with
strip.overlays clean images, and flagged when the mean entropy of the
predictions is below the threshold. With a repaired net (config.repaired, e.g.
a prune job's models/repaired_X=2.h5, or one computed by the pruning defence
at goodnet_x) it also scores GoodNet (B and the repaired net disagree) and
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

from configs import prune


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.job = 'strip'
  base = prune.get_config()
  config.model, config.benchmark, config.data = base.model, base.benchmark, base.data
  config.strip = ml_collections.ConfigDict()
  config.strip.overlays = 100        # N, clean images superimposed on each input (paper: 100)
  config.strip.frr = 1.0             # false-rejection rate the threshold is set for, % in (0, 100)
  # How an overlay is superimposed: 'add' (the paper: x + overlay, saturated at 255) or
  # 'average' (0.5 x + 0.5 overlay). WORKSPACE.md ("STRIP") says how the default was chosen.
  config.strip.blend = 'average'
  # The threshold: 'normal' (the paper: a normal fitted to the clean entropies, cut at
  # its frr quantile) or 'quantile' (the clean entropies' own frr percentile).
  config.strip.threshold = 'normal'
  config.strip.overlay_fraction = 0.5  # of the clean validation split: the overlays; rest: fit
  config.seed = 0                    # the split and the overlays' draws
  # GoodNet for the composed detector: a repaired Keras net (.h5) to compare B with,
  # or, if empty, B'_X computed by the pruning defence on the clean validation split
  # at X = goodnet_x points (conv_3, increasing mean activation); 0: no GoodNet.
  config.repaired = ''
  config.goodnet_x = 2.0
  # Blended images per forward pass (batch_size // N inputs, at least one). Small on purpose:
  # a step of 2 x 100 blends holds buffers that glibc maps fresh (mmap) every step, and their
  # page faults cost as much as the arithmetic (WORKSPACE.md, "STRIP").
  config.batch_size = 100
  config.precision = 'highest'
  return config
