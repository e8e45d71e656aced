"""GoodNet on image files: one line per image with its class in 0..N, and what the classes mean.

The nets come from a prune or fine-prune workdir (``config.run``, ``x``, ``net``) or two
files (``model``, ``repaired``); the images from files, folders or glob patterns.
"""

import glob
import json
import pathlib

import ml_collections

from badnet import config as config_lib
from badnet.benchmark import shipped
from badnet.core import model
from badnet.defences import goodnet
from badnet.errors import ConfigError, DataError, ModelFileError
from badnet.io import data, keras_io, workdir

NETS = ('repaired', 'fine_pruned')
IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg', '.bmp', '.gif', '.tif', '.tiff', '.webp')
FIELDS = {**config_lib.BATCH_SIZE, 'resize': config_lib.Boolean(),
          'net': config_lib.Choice(('', *NETS), 'net')}


def check(config: ml_collections.ConfigDict) -> None:
  if config.run and (config.model or config.repaired):
    raise ConfigError('give either config.run (a prune or fine-prune workdir) or '
                      'config.model and config.repaired, not both')
  if not config.run and not (config.model and config.repaired):
    raise ConfigError('config.run (a prune or fine-prune workdir, with config.x) or both '
                      'config.model and config.repaired are needed')
  if not _patterns(config):
    raise ConfigError('config.images is empty: give image files, folders or glob patterns '
                      '(comma-separated)')


def _patterns(config: ml_collections.ConfigDict) -> list[str]:
  return [p.strip() for p in str(config.images).split(',') if p.strip()]


def image_paths(patterns: list[str]) -> list[str]:
  """The image files a list of files, folders (their images, sorted) and glob patterns names."""
  paths = []
  for pattern in patterns:
    path = pathlib.Path(pattern).expanduser()
    if path.is_dir():
      found = sorted(str(p) for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    elif glob.has_magic(pattern):
      found = sorted(p for p in glob.glob(str(path)) if pathlib.Path(p).is_file())
    else:
      found = [str(path)]  # a missing file is reported when it is read
    if not found:
      raise DataError(f'{pattern}: no image files there')
    paths += found
  return paths


def nets_of_run(config: ml_collections.ConfigDict) -> tuple[pathlib.Path, pathlib.Path, dict]:
  """B's file, B'_X's file and the run's results.json, from a prune or fine-prune workdir."""
  run = pathlib.Path(config.run).expanduser()
  job = workdir.owner(run)
  if job not in ('pruning', 'fine_pruning'):
    raise ConfigError(f'config.run: {run} is not the workdir of a prune or fine-prune run'
                      + (f' (a {job} job wrote it)' if job else ''))
  try:
    results = json.loads((run / 'results.json').read_text())
  except (OSError, ValueError):
    raise ConfigError(f'config.run: {run} has no readable results.json (did that run '
                      f'finish?)') from None
  reached = [x for x, entry in results['thresholds'].items() if entry['reached']]
  listed = ', '.join(reached) or '(none reached)'
  if config.x:
    try:
      x = f'{float(config.x):g}'  # as the run's results name its X
    except ValueError:
      raise ConfigError(f'config.x: {config.x!r} is not a number') from None
  else:
    x = (results.get('recommended') or {}).get('x')
    if x is None:
      raise ConfigError(f'config.x is needed: the X of {run} to use, one of {listed}')
  if x not in reached:
    raise ConfigError(f'config.x: {run} has no repaired net at X={x}; it has X = {listed}')
  entry = results['thresholds'][x]
  net = config.net or ('fine_pruned' if entry.get('fine_pruned_model_file') else 'repaired')
  key = 'fine_pruned_model_file' if net == 'fine_pruned' else 'model_file'
  if not entry.get(key):
    raise ConfigError(f'config.net: {run} has no {net} net (a {job} run)')
  return pathlib.Path(results['model']), run / entry[key], results


def _meaning(num_classes: int, b_path: pathlib.Path, shipped_net: bool) -> list[str]:
  lines = [f'GoodNet classes: 0..{num_classes - 1} are the classes of B ({b_path}), '
           f'where B and the repaired net agree; {num_classes} means "backdoored input '
           f'detected" (they disagree).']
  if shipped_net:
    target = shipped.shipped_spec().target
    lines.append(f'On the shipped benchmark class {target} is the attacker\'s target: an '
                 f'input classified {target} may carry the trigger and still pass.')
  return lines


def run(config: ml_collections.ConfigDict, out: pathlib.Path) -> list[int]:
  if config.run:
    b_path, repaired_path, results = nets_of_run(config)
    shipped_net = bool(results.get('synthetic_benchmark'))
  else:
    b_path, repaired_path = pathlib.Path(config.model), pathlib.Path(config.repaired)
    shipped_net = b_path.resolve() in {p.resolve() for p in shipped.SHIPPED_NETS.values()}
  paths = image_paths(_patterns(config))
  params_b = keras_io.read_params(b_path)
  num_classes = model.num_classes_of(params_b)
  params_b_prime = keras_io.read_params(repaired_path)
  if model.num_classes_of(params_b_prime) != num_classes:
    raise ModelFileError(f'{repaired_path}: has {model.num_classes_of(params_b_prime)} '
                         f'classes but {b_path} has {num_classes}')
  images = data.load_images(paths, resize=config.resize)
  classes = [int(c) for c in goodnet.predict(params_b, params_b_prime, images,
                                             config.batch_size)]
  flagged = sum(c == num_classes for c in classes)
  lines = [*_meaning(num_classes, b_path, shipped_net), f'Repaired net: {repaired_path}', '',
           *(f'{path} {label}' for path, label in zip(paths, classes)), '',
           f'{flagged} of {len(classes)} images flagged as backdoored (class {num_classes}).']
  print('\n'.join(lines), flush=True)
  workdir.write_text(out / 'predictions.csv', 'image,class,backdoor_detected\n' + ''.join(
      f'{p},{c},{int(c == num_classes)}\n' for p, c in zip(paths, classes)))
  return classes
