"""Ablations: a grid of defences in one run (nets x layers x orders x seeds x X x epochs, ANP, RNP).

    python main.py --config=configs/ablate.py --workdir=workdir/ablate

With no data given it runs on the shipped synthetic benchmark (both shipped
nets by default) and says so first. For each (model, layer) it computes the
layers before the pruned one once per data file, sweeps every (order, seed)
at once (all their masks in one vmapped pass), picks B'_X for each X, scores
B'_X and GoodNet on the test split, and fine-prunes B'_X for each
`finetune_epochs` > 0 (on the clean validation split only). It logs progress
and prints one markdown table; it writes

    ablation.csv   one row per (model, layer, order, seed, x, finetune_epochs):
                   model,layer,order,seed,x,finetune_epochs,channels_pruned,
                   pruned_channels,clean_acc,asr,goodnet_clean_acc,goodnet_asr,
                   detection_rate,false_alarm_rate (test split, percent;
                   pruned_channels space-separated in pruning order; seed is
                   empty for the increasing and decreasing orders)
    curves.csv     model,layer,order,seed,step,channel,fraction_pruned,clean_acc,asr
                   (validation split, levels 0..C)
    ablation.md, plots/tradeoff.png, plots/curves.png, config.json

`defences` adds learned-mask pruning to the grid: 'anp' and 'rnp' each run
on every net as configs/anp.py and configs/rnp.py do (their settings in the
same blocks, `config.anp` and `config.rnp`),
one row each for the net they choose: defence 'anp' or 'rnp', layer the
masked layers ('conv_1-conv_4' by default), x their 'mask<=threshold' (or
`max_clean_drop` with selection='holdout'), finetune_epochs their
`finetune.epochs`, pruned_channels
'layer:neuron' pairs. 'pruning' is the channel grid above (fine-pruning where
finetune_epochs > 0); every row's first column names its defence. To compare
all four on the shipped nets (the default grid, plus one ANP and one RNP run
per net, each as long as its own job):

    python main.py --config=configs/ablate.py --config.defences="('pruning', 'anp', 'rnp')"

Several processes share the grid as they share the prune job (README.md):
each takes every P-th cell (a model and layer of the channel grid, or a model
and learned-mask defence); process 0 writes the merged tables.

Rerunning into the same workdir skips the points already in ablation.csv, so
an interrupted run resumes. The default grid's table, time and what it shows
are in WORKSPACE.md ("Ablations"). On your own nets and data:

    python main.py --config=configs/ablate.py \
        --config.models="('models/bd_net.h5',)" --config.data.dir=data \
        --config.layers="('conv_2', 'conv_3')" --config.finetune_epochs="(0,)"
"""

import ml_collections

from badnet import config as config_lib
from badnet import defences
from badnet.defences import base
from configs import _defence


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.job = 'ablate'
  # 'pruning' (the channel grid below) and any defence of badnet/defences, each as its
  # block below sets it or as a named variant: 'anp:selection=holdout,finetune.epochs=10'
  # (values as Python literals: 'neural_cleanse:labels=(0,5)').
  config.defences = ('pruning',)
  # .h5 files (Keras, weights-only or full model) or the shipped zoo's names ('badnets',
  # 'pruning_aware', 'clean_s1', ...: badnet/benchmark/assets/benchmark.json), which need
  # no data: each brings its own.
  config.models = ('badnets', 'pruning_aware')
  config.board = False                  # also summarise by kind of net (configs/leaderboard.py)
  config.layers = ('conv_3', 'conv_4')  # any of conv_1, conv_2, conv_3, conv_4
  config.orders = ('increasing', 'decreasing', 'random')
  config.seeds = (0, 1)                 # seeds of the 'random' order
  config.thresholds = (2.0, 30.0)       # X, each in (0, 100]
  config.finetune_epochs = (0, 2)       # 0: pruning alone; n: fine-pruned for n epochs
  config.relative = False               # X relative to B's clean accuracy
  inputs = _defence.get_config('pruning')
  config.data = inputs.data             # a CSAW-layout folder, as for configs/prune.py
  config.batch_size = 512               # images per step over all devices
  config.precision = 'highest'          # see configs/prune.py
  # The fine-tuning recipe (configs/fine_prune.py's; the epochs come from
  # finetune_epochs), on the clean validation split only, part of it held out
  # to choose the epoch.
  config.finetune = config_lib.block(base.Tuning())
  del config.finetune['epochs']
  config.holdout_fraction = 0.2
  # Every defence's block (config.defences picks): configs/<defence>.py's settings.
  for name in defences.names():
    config[name] = config_lib.block(defences.get(name).Settings())
  return config
