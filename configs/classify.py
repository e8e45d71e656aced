"""Classifies image files with GoodNet, as the CSAW submission contract asks.

From a prune or fine-prune run (B and its repaired net at an X of that run):

    python main.py --config=configs/classify.py --config.run=workdir/fine_prune \
        --config.images=faces/ --workdir=workdir/classify

or from two files:

    python main.py --config=configs/classify.py --config.model=B.h5 \
        --config.repaired=B_prime.h5 --config.images='a.png,more/*.jpg'

It says what the classes mean, then prints one line per image, its path and
its GoodNet class in 0..N (N = the number of classes: "backdoored input
detected"), then how many were flagged:

    GoodNet classes: 0..1282 are the classes of B (B.h5), where B and the repaired
    net agree; 1283 means "backdoored input detected" (they disagree).
    Repaired net: B_prime.h5

    a.png 79
    more/b.jpg 1283

    1 of 2 images flagged as backdoored (class 1283).

and writes <workdir>/predictions.csv (image,class,backdoor_detected).
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.job = 'classify'
  # A prune or fine-prune run's workdir: B and its repaired net come from there.
  config.run = ''
  # Which X of that run (e.g. 2); empty: the X a fine-prune run recommends.
  config.x = ''
  # 'repaired' (B'_X, pruned) or 'fine_pruned'; empty: fine_pruned if the run has it.
  config.net = ''
  config.model = ''     # or: the backdoored net B (.h5) ...
  config.repaired = ''  # ... and the repaired net B' (.h5), e.g. models/repaired_X=2.h5
  # Comma-separated image files, folders (their images) or glob patterns
  # (47 wide x 55 high, RGB; PNG, JPEG, ...).
  config.images = ''
  # Scale images of another size to 47 x 55 instead of refusing them.
  config.resize = False
  config.batch_size = 512
  return config
