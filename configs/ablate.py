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
on every net as configs/anp.py and configs/rnp.py do (settings under
`learned_masks`: their layers, budget, fine-tuning, `anp` and `rnp` blocks),
one row each for the net they choose on held-out clean data: defence 'anp'
or 'rnp', layer the masked layers ('conv_1-fc_2' for all), x their
`max_clean_drop`, finetune_epochs their `finetune.epochs`, pruned_channels
'layer:neuron' pairs. 'pruning' is the channel grid above (fine-pruning where
finetune_epochs > 0); every row's first column names its defence. To compare
all four on the shipped nets (the default grid, plus one ANP and one RNP run
per net, each as long as its own job):

    python main.py --config=configs/ablate.py --config.defences="('pruning', 'anp', 'rnp')"

Rerunning into the same workdir skips the points already in ablation.csv, so
an interrupted run resumes. The default grid's table, time and what it shows
are in WORKSPACE.md ("Ablations"). On your own nets and data:

    python main.py --config=configs/ablate.py \
        --config.models="('models/bd_net.h5',)" --config.data.dir=data \
        --config.layers="('conv_2', 'conv_3')" --config.finetune_epochs="(0,)"
"""

import ml_collections

from configs import anp, fine_prune, rnp


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.job = 'ablate'
  config.defences = ('pruning',)        # any of pruning (the channel grid below), anp, rnp
  # .h5 files (Keras, weights-only or full model) or the shipped names
  # 'badnets' / 'pruning_aware' (which need no data: the shipped benchmark's).
  config.models = ('badnets', 'pruning_aware')
  config.layers = ('conv_3', 'conv_4')  # any of conv_1, conv_2, conv_3, conv_4
  config.orders = ('increasing', 'decreasing', 'random')
  config.seeds = (0, 1)                 # seeds of the 'random' order
  config.thresholds = (2.0, 30.0)       # X, each in (0, 100]
  config.finetune_epochs = (0, 2)       # 0: pruning alone; n: fine-pruned for n epochs
  config.relative = False               # X relative to B's clean accuracy
  config.data = ml_collections.ConfigDict()
  config.data.dir = ''                  # a CSAW-layout folder, as for configs/prune.py
  config.data.clean_valid = ''
  config.data.clean_test = ''
  config.data.poisoned_valid = ''
  config.data.poisoned_test = ''
  config.batch_size = 512               # images per step over all devices
  config.precision = 'highest'          # see configs/prune.py
  # The fine-tuning recipe (as configs/fine_prune.py; epochs come from
  # finetune_epochs), on the clean validation split only.
  tune = fine_prune.get_config().finetune
  del tune['epochs'], tune['max_clean_drop']
  config.finetune = tune
  # ANP and RNP (config.defences): configs/anp.py's and configs/rnp.py's settings,
  # but for the inputs, batch_size and precision (the grid's).
  learned = anp.get_config()
  for field in ('job', 'model', 'benchmark', 'data', 'batch_size', 'precision'):
    del learned[field]
  learned.rnp = rnp.get_config().rnp
  config.learned_masks = learned
  return config
