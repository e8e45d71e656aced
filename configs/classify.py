"""Classifies image files with GoodNet, as the CSAW submission contract asks.

    python main.py --config=configs/classify.py --config.model=B.h5 \
        --config.repaired=B_prime.h5 --config.images=a.png,b.jpg

prints one line per image, its path and its GoodNet class in 0..N (N = the
number of classes, meaning "backdoored input detected"):

    a.png 79
    b.jpg 1283

and writes the same to <workdir>/predictions.csv.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.job = 'classify'
  config.model = ''     # the backdoored net B (.h5)
  config.repaired = ''  # the pruned net B' (.h5), e.g. models/repaired_X=2.h5 of a prune run
  # Comma-separated image files (47 wide x 55 high, RGB; PNG, JPEG, ...).
  config.images = ''
  # Scale images of another size to 47 x 55 instead of refusing them.
  config.resize = False
  config.batch_size = 512
  return config
