"""Builds a synthetic benchmark: data in the CSAW layout, a backdoored net, its report."""

import dataclasses
import math
import pathlib
import time

from absl import logging
import ml_collections

from badnet import config as config_lib
from badnet.benchmark import attacks, faces, shipped, triggers
from badnet.core import evaluate, train
from badnet import inputs
from badnet.io import keras_io, workdir

FIELDS = {
    'data.seed': config_lib.Integer(),
    'data.num_identities': config_lib.Integer(2),
    **{f'data.{split}_per_identity': config_lib.Integer(1) for split in faces.SPLITS},
    'data.trigger': config_lib.Choice(tuple(triggers.TRIGGERS), 'trigger'),
    'data.target': config_lib.Integer(0, lambda config: config.data.num_identities - 1,
                                      what='a class in 0..{high}'),
    'attack': config_lib.Choice(('clean', 'badnets', 'pruning_aware'), 'attack'),
    'poison_rate': config_lib.Number(0, 1),
    'epochs': config_lib.Integer(1),
    'batch_size': config_lib.Integer(1),
    'aware.clean_epochs': config_lib.Integer(1),
    'aware.poisoned_epochs': config_lib.Integer(1),
    'learning_rate': config_lib.Number(0, math.inf, low_open=True, high_open=True),
    'warmup_epochs': config_lib.Number(
        0, lambda config: min(config.epochs, config.aware.clean_epochs), what='in [0, epochs]'),
    'aware.prune_fraction': config_lib.Number(0, 1, high_open=True),
    'erasing': config_lib.Number(0, 1),
    'input_scale': config_lib.Number(0, math.inf, low_open=True, high_open=True),
    'seed': config_lib.Integer(),
    'ship': config_lib.Boolean(),
}


def _train(config: ml_collections.ConfigDict, spec: shipped.BenchmarkSpec, images, labels):
  common = dict(trigger=spec.trigger, target=spec.target, poison_rate=config.poison_rate,
                recipe=train.Recipe(optimizer='adam', learning_rate=config.learning_rate,
                                    warmup_epochs=config.warmup_epochs, epochs=config.epochs,
                                    batch_size=config.batch_size,
                                    erasing=config.erasing, seed=config.seed),
                input_scale=config.input_scale)
  if config.attack == 'clean':
    return attacks.train_clean(images, labels, spec.num_identities, recipe=common['recipe'],
                               input_scale=config.input_scale)
  if config.attack == 'badnets':
    return attacks.train_badnets(images, labels, spec.num_identities, **common)
  return attacks.train_pruning_aware(
      images, labels, spec.num_identities, clean_epochs=config.aware.clean_epochs,
      poisoned_epochs=config.aware.poisoned_epochs,
      prune_fraction=config.aware.prune_fraction, **common)


def run(config: ml_collections.ConfigDict, out: pathlib.Path) -> dict:
  spec = shipped.BenchmarkSpec(**config.data.to_dict())
  start = time.perf_counter()
  print(f'Generating {spec.num_identities} identities (seed {spec.seed}) under {out / "data"}',
        flush=True)
  splits = shipped.write_csaw_dir(out / 'data', spec)
  train_images, train_labels = faces.generate_faces(
      spec.num_identities, spec.train_per_identity, spec.seed, 'train')
  logging.info('Data ready in %.1f s.', time.perf_counter() - start)
  params, details = _train(config, spec, train_images, train_labels)
  seconds = time.perf_counter() - start
  keras_io.write_keras_weights(out / 'models' / 'bd_weights.h5', params)
  results = {'attack': config.attack, 'seconds': round(seconds, 1),
             'data': inputs.recorded({key: out / 'data' / relative
                                      for key, relative in inputs.CSAW_FILES.items()})}
  for split, (images, labels) in splits.items():
    poisoned, targets = triggers.poisoned_split(images, labels, spec.trigger, spec.target)
    results[split] = {'clean_acc': evaluate.accuracy(params, images, labels),
                      'asr': evaluate.attack_success_rate(params, poisoned, targets)}
  results.update(details)
  workdir.write_json(out / 'results.json', results)
  print(f'BadNet ({config.attack}: {spec.trigger} -> class {spec.target}, '
        f'{spec.num_identities} identities) trained in {seconds:.0f} s')
  for split in ('valid', 'test'):
    print(f'  {split + ":":<6} clean accuracy {results[split]["clean_acc"]:.2f} %, '
          f'attack success rate {results[split]["asr"]:.2f} %', flush=True)
  if config.ship:
    _ship(config, spec, out / 'models' / 'bd_weights.h5', results)
  return workdir.tidy(results)


def _ship(config, spec, weights: pathlib.Path, results: dict) -> None:
  """Copies the net into badnet/benchmark/assets as zoo net '<kind>[_s<seed>]' and records its
  kind, data spec, config and figures in the manifest."""
  kind = shipped.kind_of_config(config.attack, spec.trigger)
  name = shipped.zoo_name(kind, config.seed)
  target = shipped.ASSETS / f'{name}_bd_weights.h5'
  manifest = shipped.manifest() if shipped.SHIPPED_SPEC.exists() else {'nets': {}}
  with workdir.atomic_path(target) as tmp:
    tmp.write_bytes(weights.read_bytes())
  summary = {k: results[k] for k in ('valid', 'test', 'seconds')}
  manifest['nets'][name] = {'file': target.name, 'kind': kind, 'seed': config.seed,
                            'data': dataclasses.asdict(spec), 'config': config.to_dict(),
                            'results': summary}
  order = lambda item: (shipped.KINDS.index(item[1]['kind']), item[1]['seed'])
  manifest['nets'] = dict(sorted(manifest['nets'].items(), key=order))
  workdir.write_json(shipped.SHIPPED_SPEC, manifest)
  print(f'Shipped as zoo net {name!r} to {target}')
