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

from configs import _defence


def get_config() -> ml_collections.ConfigDict:
  config = _defence.get_config('pruning')
  return config
