"""The pruning defence and GoodNet (the CSAW-HackML lab3 job).

    python main.py --config=configs/prune.py --workdir=workdir/prune

With no model or data it runs on the shipped synthetic benchmark and says so
in its first line, then prints (about 20 s on a 2-core CPU)

    | X | channels pruned | B' clean % | B' ASR % | G clean % | G ASR % | ...
    | 2 | 41 | 96.95 | 98.48 | 96.75 | 98.48 | 1.41 | 2.85 |
    | 4 | 42 | 89.85 | 97.73 | 89.60 | 97.73 | 2.17 | 10.05 |
    | 10 | 43 | 82.15 | 92.42 | 81.90 | 92.42 | 7.47 | 17.75 |
    | 30 | 45 | 60.20 | 86.57 | 60.00 | 86.57 | 13.33 | 39.70 |

(--config.benchmark=pruning_aware: X=2 at 38 channels, B' 95.10 / 98.99).
Pruning alone leaves the backdoor in place; configs/fine_prune.py removes it.
On the real CSAW lab3 data (see README.md for where to put it):

    python main.py --config=configs/prune.py --config.model=models/bd_net.h5 \
        --config.data.dir=data --workdir=workdir/lab3

It logs progress, then prints a table; the published lab3 figures (test split,
../shared/DESIGN.md) would read

    | X | channels pruned | B' clean % | B' ASR % | G clean % | G ASR % | ...
    | 2 | 45 | 95.90 | 100.00 | 95.74 | 100.00 | ...
    | 4 | 48 | 92.29 |  99.98 | 92.13 |  99.98 | ...
    | 10 | 52 | 84.54 | 77.21 | 84.33 |  77.21 | ...
    | 30 | 54 | 54.76 |  6.96 | 54.68 |   6.96 | ...

(G's clean accuracy can never exceed B''s: G is right only where B' is right
and agrees with B.) On files of the real lab3 sizes it takes 24-29 s on a
2-core CPU against about 620 s for the notebooks' Keras loop
(benchmarks/scale.py, WORKSPACE.md). Several processes (hosts) share the work
with jax.distributed: add --num_processes=P --process_id=i
--coordinator_address=HOST:PORT to each process's command (README.md). It writes to the workdir: sweep.csv, results.json, results.md, plots/sweep.png,
plots/thresholds.png, models/repaired_X=<X>.h5 (full Keras models) and config.json.
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
