"""The CSAW eval.py job: clean accuracy and attack success rate of one net."""

import pathlib

import ml_collections

from badnet import config as config_lib
from badnet.core import evaluate, model
from badnet.errors import ConfigError
from badnet import inputs
from badnet.io import data, keras_io, workdir

FIELDS = config_lib.BATCH_SIZE


def check(config: ml_collections.ConfigDict) -> None:
  given = [bool(config.model), bool(config.data.clean), bool(config.data.poisoned)]
  if any(given) and not all(given[:2]):
    raise ConfigError('config.model and config.data.clean are both needed '
                      '(or give neither to evaluate the shipped benchmark)')


def run(config: ml_collections.ConfigDict, out: pathlib.Path) -> dict[str, float]:
  model_path, clean_path, poisoned_path = config.model, config.data.clean, config.data.poisoned
  if not model_path and not clean_path and not poisoned_path:
    model_path, data_dir = inputs.shipped_benchmark()
    clean_path = data_dir / inputs.CSAW_FILES['clean_test']
    poisoned_path = data_dir / inputs.CSAW_FILES['poisoned_test']
  params = keras_io.read_params(model_path)
  num_classes = model.num_classes_of(params)
  used = {'clean_test': clean_path, **({'poisoned_test': poisoned_path} if poisoned_path else {})}
  results = {'model': str(model_path), 'data': inputs.recorded(used)}
  clean = data.load_csaw_h5(clean_path, num_classes)
  results['clean_acc'] = evaluate.accuracy(params, clean.images, clean.labels, config.batch_size)
  print(f'clean accuracy: {results["clean_acc"]:.2f} % ({len(clean)} images, {clean_path})')
  if poisoned_path:
    poisoned = data.load_csaw_h5(poisoned_path, num_classes)
    results['asr'] = evaluate.attack_success_rate(
        params, poisoned.images, poisoned.labels, config.batch_size)
    print(f'attack success rate: {results["asr"]:.2f} % ({len(poisoned)} images, '
          f'{poisoned_path})')
  workdir.write_json(out / 'results.json', results)
  return workdir.tidy(results)
