"""What every defence config holds: the inputs, the evaluation, and the defence's settings block.

A config of the one defence job (``badnet/jobs/defend.py``) names its defence
(``config.defence``) and carries that defence's settings in a block of its
own name (``config.<defence>``), whose defaults are the defence's
``Settings`` dataclass (``badnet/defences/<defence>.py``): declared once, there.
"""

import ml_collections

from badnet import config as config_lib
from badnet import defences


def get_config(defence: str) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.job = 'defend'
  config.defence = defence
  # The backdoored net B: Keras .h5, weights-only or full model. Empty (and no
  # data given): the shipped synthetic benchmark.
  config.model = ''
  # Which shipped synthetic net runs when model and data are empty: any net of
  # the zoo (badnet/benchmark/assets/benchmark.json): 'badnets', 'pruning_aware'
  # (its backdoor survives pruning), 'blended', 'clean' (no backdoor), and their
  # other training seeds, e.g. 'badnets_s1'.
  config.benchmark = 'badnets'
  config.data = ml_collections.ConfigDict()
  # A folder in the CSAW lab3 layout: cl/valid.h5, cl/test.h5, bd/bd_valid.h5,
  # bd/bd_test.h5. Each file can be overridden by the fields below.
  config.data.dir = ''
  config.data.clean_valid = ''     # clean validation images: all the defence sees
  config.data.clean_test = ''      # clean test images: the reported figures
  config.data.poisoned_valid = ''  # poisoned validation images (labels = target): reported ASR
  config.data.poisoned_test = ''   # poisoned test images (labels = target): reported ASR
  # Images per evaluation step, over all devices (rounded up to a multiple of the
  # device count).
  config.batch_size = 512
  # float32 precision of every convolution and matmul: 'highest' (true float32,
  # what Keras computes on a CPU: the same classes on any device), 'high' or
  # 'default' (the backend's choice: TF32 on NVIDIA GPUs, bf16 passes on TPUs,
  # faster there but it can flip near ties). A CPU computes float32 either way.
  config.precision = 'highest'
  config[defence] = config_lib.block(defences.get(defence).Settings())
  return config
