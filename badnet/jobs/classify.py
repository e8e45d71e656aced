"""GoodNet on image files: one line per image with its class in 0..N."""

import pathlib

import ml_collections

from badnet import config as config_lib
from badnet.core import model
from badnet.defences import goodnet
from badnet.errors import ConfigError, ModelFileError
from badnet.io import data, keras_io, workdir

FIELDS = {**config_lib.BATCH_SIZE, 'resize': config_lib.Boolean()}


def _image_paths(config: ml_collections.ConfigDict) -> list[str]:
  return [p.strip() for p in str(config.images).split(',') if p.strip()]


def check(config: ml_collections.ConfigDict) -> None:
  if not config.model or not config.repaired or not _image_paths(config):
    raise ConfigError('config.model, config.repaired and config.images are all needed')


def run(config: ml_collections.ConfigDict, out: pathlib.Path) -> list[int]:
  paths = _image_paths(config)
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
  workdir.write_text(out / 'predictions.csv',
                     'image,class\n' + ''.join(f'{p},{c}\n' for p, c in zip(paths, classes)))
  return classes
