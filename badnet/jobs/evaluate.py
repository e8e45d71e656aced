"""The CSAW eval.py job: clean accuracy and attack success rate of one net."""

import pathlib

import ml_collections

from badnet import data, evaluate, keras_io, model, workdir as workdir_lib
from badnet.errors import ConfigError
from badnet.jobs import common


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Evaluates ``config.model`` on ``config.data``; writes results.json to ``workdir``."""
  common.check_batch_size(config)
  out = workdir_lib.prepare(workdir)
  workdir_lib.write_config(out, config, 'evaluate')
  model_path, clean_path, poisoned_path = config.model, config.data.clean, config.data.poisoned
  if not model_path and not clean_path and not poisoned_path:
    model_path, data_dir = common.shipped_benchmark(out)
    clean_path = data_dir / common.CSAW_FILES['clean_test']
    poisoned_path = data_dir / common.CSAW_FILES['poisoned_test']
  if not model_path or not clean_path:
    raise ConfigError('config.model and config.data.clean are both needed '
                      '(or give neither to evaluate the shipped benchmark)')
  params = keras_io.read_params(model_path)
  num_classes = model.num_classes_of(params)
  results = {'model': str(model_path)}
  clean = data.load_csaw_h5(clean_path, num_classes)
  results['clean_acc'] = evaluate.accuracy(params, clean.images, clean.labels, config.batch_size)
  print(f'clean accuracy: {results["clean_acc"]:.2f} % ({len(clean)} images, {clean_path})')
  if poisoned_path:
    poisoned = data.load_csaw_h5(poisoned_path, num_classes)
    results['asr'] = evaluate.attack_success_rate(
        params, poisoned.images, poisoned.labels, config.batch_size)
    print(f'attack success rate: {results["asr"]:.2f} % ({len(poisoned)} images, '
          f'{poisoned_path})')
  workdir_lib.write_json(pathlib.Path(out) / 'results.json', results)
  return results
