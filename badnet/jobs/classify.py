"""GoodNet on image files: one line per image with its class in 0..N."""

import pathlib

import ml_collections

from badnet import data, goodnet, keras_io, model
from badnet import workdir as workdir_lib
from badnet.errors import ConfigError, ModelFileError
from badnet.jobs import common


def run(config: ml_collections.ConfigDict, workdir: str) -> list[int]:
  common.check_batch_size(config)
  paths = [p.strip() for p in str(config.images).split(',') if p.strip()]
  if not config.model or not config.repaired or not paths:
    raise ConfigError('config.model, config.repaired and config.images are all needed')
  out = workdir_lib.prepare(workdir)
  workdir_lib.write_config(out, config, 'classify')
  params_b = keras_io.read_params(config.model)
  num_classes = model.num_classes_of(params_b)
  params_b_prime = keras_io.read_params(config.repaired)
  if model.num_classes_of(params_b_prime) != num_classes:
    raise ModelFileError(f'{config.repaired}: has {model.num_classes_of(params_b_prime)} '
                         f'classes but {config.model} has {num_classes}')
  images = data.load_images(paths, resize=config.resize)
  classes = [int(c) for c in goodnet.predict(params_b, params_b_prime, images,
                                             config.batch_size)]
  lines = [f'{path} {label}' for path, label in zip(paths, classes)]
  print('\n'.join(lines), flush=True)
  workdir_lib.write_text(pathlib.Path(out) / 'predictions.csv',
                         'image,class\n' + ''.join(f'{p},{c}\n' for p, c in zip(paths, classes)))
  return classes
