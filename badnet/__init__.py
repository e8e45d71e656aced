"""badnet: defending backdoored DeepID face classifiers by pruning, in JAX/Flax.

Modules (import them directly, e.g. ``from badnet import prune``):
  model     the CSAW DeepID as a Flax module; pure logits/features/head functions
  keras_io  Keras 2 HDF5 files <-> params, checked against the architecture
  data      CSAW .h5 and image files, validated
  evaluate  jitted, sharded predictions and the one-pass pruning sweep (any masks)
  sweep     the prune job's fast exact sweep (one feature pass, the head only where it
            changes), for any of conv_1..conv_4; masked_logits vmapped over masks
  distributed  several processes (hosts) with jax.distributed: row shares, gathering
  prune     mean activations, pruning order, masks, prune(params, mask), thresholds
  goodnet   GoodNet: B where B and B' agree, else class N
  report    sweep.csv, results.json/.md and plots
  synthetic, triggers, train   the built-in backdoor benchmark and BadNet training
"""
