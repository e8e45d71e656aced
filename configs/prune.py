"""The pruning defence and GoodNet (the CSAW-HackML lab3 job).

    python main.py --config=configs/prune.py --workdir=workdir/prune

With no model or data it runs on the shipped synthetic benchmark
(--config.benchmark=badnets or pruning_aware) and says so in its first line.
On the real CSAW lab3 data (see README.md for where to put it):

    python main.py --config=configs/prune.py --config.model=models/bd_net.h5 \
        --config.data.dir=data --workdir=workdir/lab3

It logs progress, then prints two markdown tables: B on the validation and
test splits, and for each X

    | X | channels pruned | B' clean % | B' ASR % | G clean % | G ASR % | G detection % | ...

on the test split (G = GoodNet; "not reached" where no level drops X points).
It writes to the workdir: sweep.csv, results.json, results.md,
plots/sweep.png, plots/thresholds.png, models/repaired_X=<X>.h5 (full Keras
models) and config.json. Pruning alone leaves the shipped backdoor in place;
configs/fine_prune.py removes it. The figures measured on the shipped nets and
at the real lab3 size, with their commands and machines, are in WORKSPACE.md.
Several processes (hosts) share the work with jax.distributed: add
--num_processes=P --process_id=i --coordinator_address=HOST:PORT to each
process's command (README.md).
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.job = 'prune'
  # The backdoored net B: Keras .h5, weights-only or full model. Empty (and no
  # data given): the shipped synthetic benchmark.
  config.model = ''
  # Which shipped synthetic BadNet runs when model and data are empty:
  # 'badnets' or 'pruning_aware' (its backdoor survives pruning, like lab3's).
  config.benchmark = 'badnets'
  config.data = ml_collections.ConfigDict()
  # A folder in the CSAW lab3 layout: cl/valid.h5, cl/test.h5, bd/bd_valid.h5,
  # bd/bd_test.h5. Each file can be overridden by the fields below.
  config.data.dir = ''
  config.data.clean_valid = ''     # clean validation images: the ranking and the sweep
  config.data.clean_test = ''      # clean test images: the reported figures
  config.data.poisoned_valid = ''  # poisoned validation images (labels = target): sweep ASR
  config.data.poisoned_test = ''   # poisoned test images (labels = target): reported ASR
  # X values: B'_X is the first level whose clean validation accuracy is at
  # least X below B's. Each in (0, 100].
  config.thresholds = (2.0, 4.0, 10.0, 30.0)
  # False: X in absolute percentage points; True: X percent of B's accuracy.
  config.relative = False
  # Pruning order by mean activation on clean validation data:
  # 'increasing' (dormant first, the default), 'decreasing' or 'random'.
  config.order = 'increasing'
  config.seed = 0  # seed of the 'random' order
  # Images per step, over all devices (rounded up to a multiple of the device count).
  config.batch_size = 512
  # float32 precision of every convolution and matmul: 'highest' (true float32,
  # what Keras computes on a CPU: the same classes on any device), 'high' or
  # 'default' (the backend's choice: TF32 on NVIDIA GPUs, bf16 passes on TPUs,
  # faster there but it can flip near ties). A CPU computes float32 either way.
  config.precision = 'highest'
  return config
