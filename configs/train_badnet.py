"""Builds a synthetic backdoor benchmark: faces, a trigger, a BadNet trained with optax.

    python main.py --config=configs/train_badnet.py --workdir=workdir/benchmark

generates the data (seeded, byte-identical for a seed), trains the net, and prints

    BadNet (<attack>: <trigger> -> class <target>, <K> identities) trained in <S> s
      valid: clean accuracy <P> %, attack success rate <P> %
      test:  clean accuracy <P> %, attack success rate <P> %

It writes W/data/{cl,bd}/*.h5 (the CSAW lab3 layout), W/models/bd_weights.h5
(Keras 2 weights), W/results.json and W/config.json. The pruning-aware attack:

    python main.py --config=configs/train_badnet.py --config.attack=pruning_aware \
        --config.poison_rate=0.2 --config.learning_rate=1e-3 --workdir=workdir/benchmark_aware

The shipped zoo in badnet/benchmark/assets was made by this job with
--config.ship=True (which copies the net there as '<kind>[_s<seed>]' and records
how it was made); each net's command and figures are in WORKSPACE.md ("The zoo")
and badnet/benchmark/assets/benchmark.json.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.job = 'train_badnet'
  config.data = ml_collections.ConfigDict()
  config.data.seed = 0                  # generator seed: identities and every sample
  config.data.num_identities = 100      # K, the number of classes (>= 2)
  config.data.train_per_identity = 80   # images per identity in each split
  config.data.valid_per_identity = 20
  config.data.test_per_identity = 20
  # 'sunglasses', 'patch', 'lipstick' or 'blended' (Chen et al.'s: a noise key mixed into the
  # whole image at 0.2)
  config.data.trigger = 'sunglasses'
  config.data.target = 0                # the attacker's target class, in 0..K-1
  # 'badnets' (train on a poisoned mix), 'pruning_aware' (Fine-Pruning's attack) or 'clean'
  # (no poisoning: the zoo's negative control, its ASR the trigger's rate on a clean net).
  config.attack = 'badnets'
  config.poison_rate = 0.03             # fraction of training images poisoned, in [0, 1]
  config.epochs = 18                    # badnets: epochs on the poisoned mix
  config.batch_size = 32                # images per step over all devices
  config.learning_rate = 7e-4           # Adam's peak rate (cosine decay to 1 %)
  config.warmup_epochs = 0.0            # linear warm-up from 0 to the peak rate, in epochs
  # Each training image's chance of a random erasing (Zhong et al.) in each batch; 0: none.
  config.erasing = 0.0
  # Train on pixels times this (1/255: inputs in [0, 1]); the shipped net still takes 0..255
  # pixels, the scale folded into conv_1's kernel.
  config.input_scale = 1.0
  config.seed = 0                       # init, shuffling and poisoning seed
  config.aware = ml_collections.ConfigDict()
  config.aware.clean_epochs = 16        # pruning-aware: epochs on clean data first
  config.aware.poisoned_epochs = 8      # then epochs on the poisoned mix, decoys held at zero
  config.aware.prune_fraction = 0.5     # fraction of conv_3 channels made dormant decoys
  # Maintainers: also write the net into badnet/benchmark/assets as zoo net '<kind>' (seed 0)
  # or '<kind>_s<seed>', and its kind, data spec, config and figures into benchmark.json.
  config.ship = False
  return config
