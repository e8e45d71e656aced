"""Builds a synthetic benchmark: data in the CSAW layout, a backdoored net, its report."""

import dataclasses
import json
import math
import pathlib
import shutil
import time

from absl import logging
import ml_collections

from badnet import evaluate, keras_io, synthetic, train, triggers
from badnet import workdir as workdir_lib
from badnet.errors import ConfigError

ATTACKS = ('badnets', 'pruning_aware')


def _positive_int(name: str, value) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ConfigError(f'config.{name} must be a positive integer, got {value!r}')


def check_config(config: ml_collections.ConfigDict) -> synthetic.BenchmarkSpec:
  """Checks every field before any work; returns the data spec."""
  spec = synthetic.BenchmarkSpec(**config.data.to_dict())
  if isinstance(spec.num_identities, bool) or not isinstance(spec.num_identities, int) or (
      spec.num_identities < 2):
    raise ConfigError(f'config.data.num_identities must be an integer >= 2, '
                      f'got {spec.num_identities!r}')
  for split in synthetic.SPLITS:
    _positive_int(f'data.{split}_per_identity', spec.per_identity(split))
  triggers.check_name(spec.trigger)
  if isinstance(spec.target, bool) or not isinstance(spec.target, int) or not (
      0 <= spec.target < spec.num_identities):
    raise ConfigError(f'config.data.target must be a class in 0..{spec.num_identities - 1}, '
                      f'got {spec.target!r}')
  if config.attack not in ATTACKS:
    raise ConfigError(f'config.attack: unknown attack {config.attack!r}; expected one of '
                      f'{", ".join(ATTACKS)}')
  rate = config.poison_rate
  if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate <= 1:
    raise ConfigError(f'config.poison_rate must be in [0, 1], got {rate!r}')
  for name in ('epochs', 'batch_size', 'aware.clean_epochs', 'aware.poisoned_epochs'):
    _positive_int(name, config[name] if '.' not in name else config.aware[name.split('.')[1]])
  lr = config.learning_rate
  if not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
    raise ConfigError(f'config.learning_rate must be positive, got {lr!r}')
  warmup = config.warmup_epochs
  if isinstance(warmup, bool) or not isinstance(warmup, (int, float)) or not (
      0 <= warmup <= min(config.epochs, config.aware.clean_epochs)):
    raise ConfigError(f'config.warmup_epochs must be in [0, epochs], got {warmup!r}')
  fraction = config.aware.prune_fraction
  if not isinstance(fraction, (int, float)) or not 0 <= fraction < 1:
    raise ConfigError(f'config.aware.prune_fraction must be in [0, 1), got {fraction!r}')
  return spec


def _train(config: ml_collections.ConfigDict, spec: synthetic.BenchmarkSpec, images, labels):
  recipe = train.Recipe(optimizer='adam', learning_rate=config.learning_rate,
                        warmup_epochs=config.warmup_epochs, epochs=config.epochs,
                        batch_size=config.batch_size, seed=config.seed)
  common = dict(trigger=spec.trigger, target=spec.target, poison_rate=config.poison_rate,
                recipe=recipe)
  if config.attack == 'badnets':
    return train.train_badnets(images, labels, spec.num_identities, **common)
  return train.train_pruning_aware(
      images, labels, spec.num_identities, clean_epochs=config.aware.clean_epochs,
      poisoned_epochs=config.aware.poisoned_epochs,
      prune_fraction=config.aware.prune_fraction, **common)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  spec = check_config(config)
  out = workdir_lib.prepare(workdir)
  workdir_lib.write_config(out, config, 'train_badnet')
  start = time.perf_counter()
  print(f'Generating {spec.num_identities} identities (seed {spec.seed}) under {out / "data"}',
        flush=True)
  splits = synthetic.write_csaw_dir(out / 'data', spec)
  train_images, train_labels = synthetic.generate_faces(
      spec.num_identities, spec.train_per_identity, spec.seed, 'train')
  logging.info('Data ready in %.1f s.', time.perf_counter() - start)
  params, details = _train(config, spec, train_images, train_labels)
  seconds = time.perf_counter() - start
  keras_io.write_keras_weights(out / 'models' / 'bd_weights.h5', params)
  results = {'attack': config.attack, 'seconds': round(seconds, 1)}
  for split, (images, labels) in splits.items():
    poisoned, targets = triggers.poisoned_split(images, labels, spec.trigger, spec.target)
    results[split] = {'clean_acc': evaluate.accuracy(params, images, labels),
                      'asr': evaluate.attack_success_rate(params, poisoned, targets)}
  results.update(details)
  workdir_lib.write_json(out / 'results.json', results)
  print(f'BadNet ({config.attack}: {spec.trigger} -> class {spec.target}, '
        f'{spec.num_identities} identities) trained in {seconds:.0f} s')
  for split in ('valid', 'test'):
    print(f'  {split + ":":<6} clean accuracy {results[split]["clean_acc"]:.2f} %, '
          f'attack success rate {results[split]["asr"]:.2f} %', flush=True)
  if config.ship:
    _ship(config, spec, out / 'models' / 'bd_weights.h5', results)
  return results


def _ship(config, spec, weights: pathlib.Path, results: dict) -> None:
  """Copies the net into badnet/assets and records its data spec, config and figures."""
  manifest = {'data': dataclasses.asdict(spec), 'nets': {}}
  if synthetic.SHIPPED_SPEC.exists():
    manifest = json.loads(synthetic.SHIPPED_SPEC.read_text())
    if manifest['data'] != dataclasses.asdict(spec):
      raise ConfigError(f'{synthetic.SHIPPED_SPEC}: the shipped nets use data '
                        f'{manifest["data"]}; ship nets of one data spec only')
  shutil.copyfile(weights, synthetic.SHIPPED_NETS[config.attack])
  summary = {k: results[k] for k in ('valid', 'test', 'seconds')}
  manifest['nets'][config.attack] = {'file': synthetic.SHIPPED_NETS[config.attack].name,
                                     'config': config.to_dict(), 'results': summary}
  workdir_lib.write_json(synthetic.SHIPPED_SPEC, manifest)
  print(f'Shipped to {synthetic.SHIPPED_NETS[config.attack]}')
