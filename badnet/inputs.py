"""A job's inputs: the model and the four CSAW data files, from the config or the shipped benchmark.

With no model and no data given, a job runs on a shipped synthetic BadNet and its data,
made once per machine into ``$BADNET_CACHE_DIR`` (default ``~/.cache/badnet``).
"""

import dataclasses
import pathlib

from badnet import config as config_lib
from badnet.benchmark import shipped
from badnet.core import distributed
from badnet.errors import ConfigError

CSAW_FILES = shipped.CSAW_FILES
FIELDS: config_lib.Fields = {
    'benchmark': config_lib.Choice(tuple(shipped.SHIPPED_NETS), 'shipped net')}


@dataclasses.dataclass(frozen=True)
class Inputs:
  model_path: pathlib.Path
  paths: dict[str, pathlib.Path]  # keys of CSAW_FILES
  synthetic: bool


def shipped_benchmark(name: str = 'badnets', quiet: bool = False
                      ) -> tuple[pathlib.Path, pathlib.Path]:
  """A shipped synthetic net and its data folder (in the machine's cache)."""
  folder = shipped.cache_dir(shipped.net_spec(name))
  if not quiet:
    print(f'Running on the shipped synthetic benchmark (net {name}: '
          f'{shipped.KIND_TEXT[shipped.kind_of(name)]}; no model or data given); its data is '
          f'in {folder} (made once per machine; ${shipped.CACHE_ENV} moves it).', flush=True)
  return shipped.shipped_benchmark(None, name)


def recorded(paths: dict[str, pathlib.Path]) -> dict[str, str]:
  """The data files a job read, as results.json's ``data`` records them (absolute paths)."""
  return {key: str(pathlib.Path(path).resolve()) for key, path in paths.items()}


def no_data_given(config: config_lib.Config) -> bool:
  return not config.data.dir and not any(config.data[key] for key in CSAW_FILES)


def data_paths(config: config_lib.Config) -> dict[str, pathlib.Path]:
  """The four data files: config.data.<key> if set, else under config.data.dir."""
  paths = {}
  for key, relative in CSAW_FILES.items():
    if config.data[key]:
      paths[key] = pathlib.Path(config.data[key])
    elif config.data.dir:
      paths[key] = pathlib.Path(config.data.dir) / relative
    else:
      raise ConfigError(f'no path for the {key.replace("_", " ")} file: set config.data.dir '
                        f'(CSAW layout: {relative}) or config.data.{key}')
  return paths


def resolve(config: config_lib.Config) -> Inputs:
  """The model and the four data files, from the config or the shipped benchmark."""
  if not config.model and no_data_given(config):
    # Process 0 regenerates the data; the others wait for it, then find it there.
    if distributed.is_leader():
      shipped_benchmark(config.benchmark)
    distributed.barrier('shipped benchmark data')
    model_path, data_dir = shipped_benchmark(config.benchmark, quiet=True)
    return Inputs(model_path, {key: data_dir / relative for key, relative in CSAW_FILES.items()},
                  True)
  if not config.model:
    raise ConfigError('config.model is empty; give the backdoored net (.h5), or leave '
                      'model and data empty to run on the shipped synthetic benchmark')
  return Inputs(pathlib.Path(config.model), data_paths(config), False)


def resolve_models(config: config_lib.Config
                   ) -> tuple[dict[str, pathlib.Path], dict[str, dict[str, pathlib.Path]], bool]:
  """For a grid: model name -> file, model name -> (data key -> file), and whether it is the
  shipped benchmark (each shipped net with its own data: its trigger's poisoned files).

  ``config.models`` holds .h5 files or shipped nets' names; only shipped nets may omit data.
  """
  models = {name: pathlib.Path(shipped.SHIPPED_NETS.get(name, name))
            for name in dict.fromkeys(config_lib.values(config.models))}
  if not no_data_given(config):
    given = data_paths(config)
    return models, {name: given for name in models}, False
  if not set(models) <= set(shipped.SHIPPED_NETS):
    raise ConfigError('config.data is empty but config.models names a file: give the data '
                      '(config.data.dir), or use only the shipped nets')
  if distributed.is_leader():  # process 0 makes each data set; the others then find it made
    for name in models:
      shipped_benchmark(name, quiet=True)
  distributed.barrier('shipped benchmark data')
  folders = {name: shipped_benchmark(name, quiet=True)[1] for name in models}
  print(f'Running on the shipped synthetic benchmark (nets: {", ".join(models)}; no data '
        f'given); their data is in {", ".join(sorted(set(map(str, folders.values()))))}.',
        flush=True)
  return models, {name: {key: folder / relative for key, relative in CSAW_FILES.items()}
                  for name, folder in folders.items()}, True
