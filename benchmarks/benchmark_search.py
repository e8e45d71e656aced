"""Trains a candidate benchmark BadNet and prints how it behaves under the pruning defence.

One row of the search in WORKSPACE.md ("Rebuilding the BadNets benchmark"):

    python benchmarks/benchmark_search.py --learning_rate=7e-4 --poison_rate=0.03
    python benchmarks/benchmark_search.py --weights=badnet/benchmark/assets/badnets_bd_weights.h5

trains on the shipped data spec (or reads --weights) and prints one JSON line,
all on the benchmark's validation split: B's clean accuracy and ASR, the conv_3
channels dormant on clean data (mean activation exactly 0), the level and
figures at X = 2, 4, 10, 30, the level with the lowest ASR among those with at
least 50 % clean accuracy, and the whole sweep. About 15 minutes per trained
net on a 2-core CPU.
"""

import dataclasses
import json
import time

from absl import app, flags
import numpy as np

from badnet.benchmark import attacks, faces, shipped, triggers
from badnet.core import evaluate, masks, train
from badnet.defences import pruning
from badnet.io import keras_io

_WEIGHTS = flags.DEFINE_string('weights', '', 'Evaluate this net instead of training one.')
_LEARNING_RATE = flags.DEFINE_float('learning_rate', 7e-4, "Adam's peak rate.")
_POISON_RATE = flags.DEFINE_float('poison_rate', 0.03, 'Fraction of training images poisoned.')
_EPOCHS = flags.DEFINE_integer('epochs', 18, 'Training epochs.')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 32, 'Images per step.')
_TRIGGER = flags.DEFINE_string('trigger', '', 'Trigger (default: the shipped spec\'s).')
_SEED = flags.DEFINE_integer('seed', 0, 'Init, poisoning and shuffling seed.')
_OUT = flags.DEFINE_string('out', '', 'Write the trained net here (Keras 2 weights).')


def _levels(clean: np.ndarray, asr: np.ndarray) -> dict:
  figures = {}
  for x in (2, 4, 10, 30):
    level = pruning.select_level(clean, x)
    figures[f'X={x}'] = None if level is None else {
        'level': level, 'clean_acc': round(clean[level], 2), 'asr': round(asr[level], 2)}
  usable = np.flatnonzero(clean >= 50)
  best = int(usable[np.argmin(asr[usable])])
  figures['lowest_asr_at_50_clean'] = {'level': best, 'clean_acc': round(clean[best], 2),
                                       'asr': round(asr[best], 2)}
  return figures


def main(argv: list[str]) -> None:
  del argv
  spec = shipped.shipped_spec()
  if _TRIGGER.value:
    spec = dataclasses.replace(spec, trigger=_TRIGGER.value)
  valid, labels = faces.generate_faces(spec.num_identities, spec.valid_per_identity,
                                           spec.seed, 'valid')
  poisoned, targets = triggers.poisoned_split(valid, labels, spec.trigger, spec.target)
  start = time.perf_counter()
  if _WEIGHTS.value:
    params = keras_io.read_params(_WEIGHTS.value)
  else:
    images, train_labels = faces.generate_faces(spec.num_identities,
                                                    spec.train_per_identity, spec.seed, 'train')
    recipe = train.Recipe(learning_rate=_LEARNING_RATE.value, epochs=_EPOCHS.value,
                          batch_size=_BATCH_SIZE.value, seed=_SEED.value)
    params, _ = attacks.train_badnets(images, train_labels, spec.num_identities,
                                    trigger=spec.trigger, target=spec.target,
                                    poison_rate=_POISON_RATE.value, recipe=recipe)
    if _OUT.value:
      keras_io.write_keras_weights(_OUT.value, params)
  seconds = time.perf_counter() - start
  activations = pruning.mean_activations(params, valid)
  level_masks = masks.prefix_masks(pruning.pruning_order(activations))
  clean = 100 * (evaluate.sweep_predictions(params, level_masks, valid) == labels[:, None]).mean(0)
  asr = 100 * (evaluate.sweep_predictions(params, level_masks, poisoned)
               == targets[:, None]).mean(0)
  print(json.dumps({
      'flags': {f.name: f.value for f in (_WEIGHTS, _LEARNING_RATE, _POISON_RATE, _EPOCHS,
                                          _BATCH_SIZE, _TRIGGER, _SEED)},
      'seconds': round(seconds), 'clean_acc': round(clean[0], 2), 'asr': round(asr[0], 2),
      'dormant': int((activations == 0).sum()), **_levels(clean, asr),
      'sweep': [[level, round(c, 1), round(a, 1)] for level, (c, a) in enumerate(zip(clean, asr))],
  }))


if __name__ == '__main__':
  app.run(main)
