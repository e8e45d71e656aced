"""The house: jobs are leaves, defences are plug-ins, config checks are declared once."""

import ast
import dataclasses
import importlib
import math
import pathlib

import jax
import ml_collections
import numpy as np
import pytest

from badnet import config as config_lib
from badnet import defences, defend, runner
from badnet.core import cache, masks
from badnet.errors import ConfigError
from badnet.io import tables
from tests import helpers
from tests.conftest import REPO

PACKAGE = REPO / 'badnet'


def _imports(path: pathlib.Path) -> set[str]:
  """Every module ``path`` imports (``from a import b`` counts as a and a.b)."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      found |= {alias.name for alias in node.names}
    elif isinstance(node, ast.ImportFrom) and node.module:
      found |= {node.module} | {f'{node.module}.{alias.name}' for alias in node.names}
  return found


def _modules(folder: str = '') -> list[pathlib.Path]:
  return sorted((PACKAGE / folder).rglob('*.py'))


def test_the_import_checker_sees_a_job_importing_a_job(tmp_path):
  leaky = tmp_path / 'leaky.py'
  leaky.write_text('from badnet.jobs import defend as defend_job\nimport badnet.jobs.ablate\n')
  assert {'badnet.jobs.defend', 'badnet.jobs.ablate'} <= _imports(leaky)


def test_no_job_imports_a_job_and_no_library_module_imports_one():
  for path in _modules():
    jobs = {name for name in _imports(path) if name.startswith('badnet.jobs.')}
    assert not jobs, f'{path.relative_to(REPO)} imports {sorted(jobs)}'


# What jobs import from badnet.defences: shared pieces only, no defence (ablate's
# grid: base, goodnet, sweep; classify's GoodNet of a run's nets: goodnet).
# Every defence, pruning and fine_pruning included, is reached via defences.get.
JOB_DEFENCE_IMPORTS = frozenset({'base', 'goodnet', 'sweep'})


def _defence_modules(path: pathlib.Path) -> set[str]:
  """The modules of badnet/defences that ``path`` imports by name."""
  return {name.split('.')[2] for name in _imports(path)
          if name.startswith('badnet.defences.')}


def test_the_import_checker_sees_a_job_importing_a_defence_by_name(tmp_path):
  leaky = tmp_path / 'leaky.py'
  leaky.write_text('from badnet.defences import anp, base\nimport badnet.defences.strip\n'
                   'from badnet.defences.rnp import Settings\nfrom badnet import defences\n')
  assert _defence_modules(leaky) == {'anp', 'base', 'strip', 'rnp'}


def test_no_job_imports_a_defence_by_name():
  """Jobs reach a defence via defences.get; only the shared pieces above are imported."""
  assert not JOB_DEFENCE_IMPORTS & set(defences.names())
  imported = set()
  for path in _modules('jobs'):
    found = _defence_modules(path)
    assert found <= JOB_DEFENCE_IMPORTS, (
        f'{path.relative_to(REPO)} imports {sorted(found - JOB_DEFENCE_IMPORTS)}')
    imported |= found
  assert imported == JOB_DEFENCE_IMPORTS


def test_no_defence_imports_attack_code():
  for path in _modules('defences'):
    attacks = {name for name in _imports(path) if name.startswith('badnet.benchmark.attacks')}
    assert not attacks, f'{path.relative_to(REPO)} imports {sorted(attacks)}'


@pytest.mark.parametrize('folder, below', [
    ('benchmark', ('badnet.benchmark', 'badnet.io', 'badnet.core', 'badnet.errors')),
    ('io', ('badnet.io', 'badnet.core', 'badnet.errors'))])
def test_dependencies_point_one_way_benchmark_io_core(folder, below):
  """benchmark -> io -> core, never back; so no benchmark module imports a defence."""
  for path in _modules(folder):
    above = {name for name in _imports(path) if name.startswith('badnet.')
             and not name.startswith(below)}
    assert not above, f'{path.relative_to(REPO)} imports {sorted(above)}'


def test_the_core_imports_nothing_above_it():
  for path in _modules('core'):
    above = {name for name in _imports(path) if name.startswith('badnet.')
             and not name.startswith(('badnet.core', 'badnet.errors'))}
    assert not above, f'{path.relative_to(REPO)} imports {sorted(above)}'


def test_every_job_declares_its_fields_and_every_config_names_a_job():
  assert runner.job_names() == ('ablate', 'classify', 'defend', 'evaluate', 'train_badnet')
  for name in runner.job_names():
    job = runner.load_job(name)
    assert callable(job.run) and isinstance(job.FIELDS, dict), name
  defence_configs = set()
  for config_file in sorted((REPO / 'configs').glob('[!_]*.py')):
    config = importlib.import_module(f'configs.{config_file.stem}').get_config()
    assert config.job in runner.job_names(), config_file
    # The shipped defaults pass their declared checks.
    config_lib.check(config, runner.load_job(config.job).FIELDS)
    if config.job == 'defend':
      # ... and the defence's own, declared once on its Settings (config.<defence>).
      defence_configs.add(config.defence)
      assert config.defence in config, config_file
      settings = defend.settings_of(config)
      assert settings == defences.get(config.defence).Settings(), config_file
  # Every defence has its shipped config.
  assert defence_configs == set(defences.names())


def test_an_unknown_job_is_one_clear_error():
  with pytest.raises(ConfigError, match="config.job: unknown job 'prnue'; expected one of "
                                        'ablate, classify, defend, evaluate, train_badnet$'):
    runner.run(ml_collections.ConfigDict({'job': 'prnue'}))


def test_defences_are_found_by_name_with_their_interface():
  assert defences.names() == ('anp', 'fine_pruning', 'neural_cleanse', 'pruning', 'rnp',
                              'strip')
  for name in defences.names():
    defence = defences.get(name)
    assert defence.NAME == name, name
    assert callable(defence.defend) and callable(defence.report), name
    assert callable(defence.markdown), name
    # Settings: a frozen dataclass whose every field has a default, its checks in FIELDS.
    assert dataclasses.is_dataclass(defence.Settings), name
    assert defence.Settings.__dataclass_params__.frozen, name
    defaults = defence.Settings()
    assert isinstance(defence.Settings.FIELDS, dict), name
    # Each declared check names a field of the settings (dotted: a nested block's).
    block = config_lib.block(defaults)
    for field in defence.Settings.FIELDS:
      section, _, key = field.rpartition('.')
      assert key in (block[section] if section else block), (name, field)
    assert config_lib.build(defence.Settings, block, f'{name}.') == defaults, name
  with pytest.raises(ConfigError, match="unknown defence 'stirp'"):
    defences.get('stirp')


CONFIG = ml_collections.ConfigDict({'a': 3, 'b': 0.5, 'c': 'y', 'flag': True, 'axis': (1, 2),
                                    'kinds': ('p',),
                                    'nested': {'epochs': 4, 'warmup': 1.0}})


@pytest.mark.parametrize('field, spec, value, message', [
    ('a', config_lib.Integer(1), 0, 'config.a must be a positive integer, got 0'),
    ('a', config_lib.Integer(1), True, 'config.a must be a positive integer, got True'),
    ('a', config_lib.Integer(2), 1, 'config.a must be an integer >= 2, got 1'),
    ('a', config_lib.Integer(), 1.5, 'config.a must be an integer, got 1.5'),
    ('b', config_lib.Number(0, 1, low_open=True, high_open=True), 1.0,
     r'config.b must be in \(0, 1\), got 1.0'),
    ('b', config_lib.Number(0, 1, high_open=True), math.nan, r'config.b must be in \[0, 1\)'),
    ('b', config_lib.Number(0, math.inf, low_open=True, high_open=True), 0.0,
     'config.b must be positive, got 0.0'),
    ('b', config_lib.Number(0, math.inf, high_open=True), -1.0,
     'config.b must be zero or positive, got -1.0'),
    ('nested.warmup', config_lib.Number(0, lambda c: c.nested.epochs), 5.0,
     r'config.nested.warmup must be in \[0, 4\], got 5.0'),
    ('c', config_lib.Choice(('y', 'z'), 'letter'), 'x',
     "config.c: unknown letter 'x'; expected one of y, z"),
    ('flag', config_lib.Boolean(), 1, 'config.flag must be True or False, got 1'),
    ('axis', config_lib.Each(config_lib.Integer(0)), (1, -2),
     'config.axis: -2 is not a whole number >= 0'),
    ('kinds', config_lib.Each(config_lib.Choice(('p', 'q'), 'kind')), ('p', 'r'),
     "config.kinds: unknown kind 'r'; expected some of p, q"),
    ('axis', config_lib.Each(config_lib.Integer()), (), 'config.axis is empty; give at least'),
])
def test_a_declared_field_names_itself_its_rule_and_the_value(field, spec, value, message):
  config = ml_collections.ConfigDict(CONFIG.to_dict(), type_safe=False)
  section, _, key = field.rpartition('.')
  (config[section] if section else config)[key] = value
  with pytest.raises(ConfigError, match=message):
    config_lib.check(config, {field: spec})
  config_lib.check(CONFIG, {field: spec})  # the good value passes


def test_each_accepts_one_value_for_a_tuple():
  config_lib.check(ml_collections.ConfigDict({'x': 2.0}),
                   {'x': config_lib.Each(config_lib.Number(0, 100, low_open=True))})


def test_bind_gives_one_object_per_arguments():
  def step(x, *, layer, precision):
    return x, layer, precision
  first = cache.bind(step, layer='conv_3', precision='highest')
  assert cache.bind(step, precision='highest', layer='conv_3') is first
  assert cache.bind(step, layer='conv_2', precision='highest') is not first
  assert first(1) == (1, 'conv_3', 'highest')


def test_markdown_table_by_hand():
  assert tables.markdown(['a', 'b'], [[1, 'x'], ['—', 2.5]], 'lr') == [
      '| a | b |', '|---|---:|', '| 1 | x |', '| — | 2.5 |']


def test_csv_round_trip(tmp_path):
  rows = [{'step': 0, 'channel': ''}, {'step': 1, 'channel': 7}]
  tables.write_csv(tmp_path / 'x.csv', ('step', 'channel'), rows)
  assert (tmp_path / 'x.csv').read_text() == 'step,channel\n0,\n1,7\n'
  assert tables.read_csv(tmp_path / 'x.csv') == [{'step': '0', 'channel': ''},
                                                 {'step': '1', 'channel': '7'}]
  assert tables.read_csv(tmp_path / 'none.csv') == []


def test_prune_layer_under_vmap_stacks_only_that_layer():
  params = helpers.random_params(5, seed=3)
  level_masks = masks.prefix_masks(np.arange(60))[[0, 20, 59]]
  stacked = jax.vmap(masks.prune_layer, in_axes=(None, 0))(params['conv_3'], level_masks)
  assert stacked['kernel'].shape == (3, 3, 3, 40, 60)
  for index, mask in enumerate(level_masks):
    np.testing.assert_array_equal(stacked['bias'][index],
                                  masks.prune(params, mask)['conv_3']['bias'])
