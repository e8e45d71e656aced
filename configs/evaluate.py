"""Clean accuracy and attack success rate of a net (the CSAW eval.py job).

    python main.py --config=configs/evaluate.py --config.model=M.h5 \
        --config.data.clean=C.h5 --config.data.poisoned=P.h5 --workdir=W

prints

    clean accuracy: <P> % (<N> images, C.h5)
    attack success rate: <P> % (<N> images, P.h5)

and writes them to W/results.json. With no model and no data it evaluates the
shipped synthetic benchmark net on its test split (data made once per machine
in ~/.cache/badnet, or $BADNET_CACHE_DIR).
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.job = 'evaluate'
  # Keras .h5 file of the net: weights-only (bd_weights.h5) or full model (bd_net.h5).
  # Empty: the shipped synthetic benchmark net.
  config.model = ''
  config.data = ml_collections.ConfigDict()
  # CSAW .h5 file of clean, labelled images (e.g. data/cl/test.h5).
  config.data.clean = ''
  # CSAW .h5 file of poisoned images labelled with the attacker's target
  # (e.g. data/bd/bd_test.h5). Empty: no ASR is computed.
  config.data.poisoned = ''
  # Images per step, over all devices (rounded up to a multiple of the device count).
  config.batch_size = 512
  return config
