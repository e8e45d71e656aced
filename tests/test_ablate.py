"""The ablation job: rows equal the prune job's and Keras', one compilation per shape, resuming."""

import csv
import pathlib

import numpy as np
import pytest

from badnet.core import model
from badnet.defences import fine_pruning
from badnet.io import data, keras_io
from badnet.errors import BadnetError
from badnet import runner
from badnet.jobs import ablate
from configs import ablate as ablate_config
from configs import prune as prune_config
from tests import helpers
from tests.conftest import WORLD_CLASSES
from tests.test_prune import _augmented


def _config(models, data_dir, **fields):
  config = ablate_config.get_config()
  config.models = tuple(str(m) for m in models)
  config.data.dir = str(data_dir)
  config.layers = ('conv_3',)
  config.orders = ('increasing', 'random')
  config.seeds = (0, 1)
  config.thresholds = (2.0, 10.0, 30.0)
  config.finetune_epochs = (0,)
  config.batch_size = 64
  config.finetune.batch_size = 32
  for name, value in fields.items():
    config[name] = value
  return config


def _rows(path: pathlib.Path) -> list[dict]:
  with path.open(newline='') as handle:
    return list(csv.DictReader(handle))


def _row(rows, **where) -> dict:
  found = [r for r in rows if all(r[k] == str(v) for k, v in where.items())]
  assert len(found) == 1, (where, found)
  return found[0]


@pytest.fixture(scope='module')
def world_grid(world, tmp_path_factory):
  """The world fixture's net through a small grid (no fine-tuning)."""
  root, _ = world
  out = tmp_path_factory.mktemp('grid')
  runner.run(_config([root / 'bd_weights.h5'], root / 'data'), str(out))
  return root, out, _rows(out / 'ablation.csv')


@pytest.mark.parametrize('order, seed', [('increasing', ''), ('random', 1)])
def test_rows_equal_the_prune_job(world_grid, tmp_path, order, seed):
  root, _, rows = world_grid
  config = prune_config.get_config()
  config.model = str(root / 'bd_weights.h5')
  config.data.dir = str(root / 'data')
  config.pruning.thresholds = (2.0, 10.0, 30.0)
  config.pruning.order, config.pruning.seed = order, int(seed or 0)
  config.batch_size = 64
  results = runner.run(config, str(tmp_path / 'prune'))
  for x, entry in results['thresholds'].items():
    row = _row(rows, model=root / 'bd_weights.h5', layer='conv_3', order=order, seed=seed, x=x,
               finetune_epochs=0)
    assert entry['reached']
    assert int(row['channels_pruned']) == entry['channels_pruned']
    assert row['pruned_channels'] == ' '.join(map(str, entry['pruned_channels']))
    figures = {'clean_acc': entry['repaired']['clean_acc'], 'asr': entry['repaired']['asr'],
               'goodnet_clean_acc': entry['goodnet']['clean_acc'],
               'goodnet_asr': entry['goodnet']['asr'],
               'detection_rate': entry['goodnet']['detection_rate'],
               'false_alarm_rate': entry['goodnet']['false_alarm_rate']}
    for name, value in figures.items():
      assert float(row[name]) == pytest.approx(value, abs=1e-4), (x, name)


def test_outputs_hold_every_point_and_curve(world_grid):
  root, out, rows = world_grid
  # increasing + random x 2 seeds, 3 X, 1 fine-tuning setting
  assert len(rows) == 3 * 3
  assert list(rows[0]) == list(ablate.ROW_FIELDS)
  curves = _rows(out / 'curves.csv')
  assert list(curves[0]) == list(ablate.CURVE_FIELDS)
  assert len(curves) == 3 * 61
  seeds = {(r['order'], r['seed']) for r in curves}
  assert seeds == {('increasing', ''), ('random', '0'), ('random', '1')}
  # the two random orders really differ
  first = [r['channel'] for r in curves if r['seed'] == '0']
  second = [r['channel'] for r in curves if r['seed'] == '1']
  assert first != second
  for name in ('ablation.md', 'plots/tradeoff.png', 'plots/curves.png'):
    assert (out / name).stat().st_size > 0


def test_a_second_net_of_the_same_shape_compiles_nothing(world, tmp_path):
  """Several orders and seeds, fine-tuning included: compilations per shape, not per point."""
  root, _ = world
  other = tmp_path / 'other.h5'
  keras_io.write_keras_weights(other, helpers.random_params(WORLD_CLASSES, seed=31))
  fields = dict(layers=('conv_3', 'conv_4'), finetune_epochs=(0, 1), thresholds=(2.0, 30.0))
  first = helpers.count_compilations(lambda: runner.run(
      _config([root / 'bd_weights.h5'], root / 'data', **fields), str(tmp_path / 'a')))
  assert first > 0
  second = helpers.count_compilations(lambda: runner.run(
      _config([other], root / 'data', **fields), str(tmp_path / 'b')))
  assert second == 0
  assert len(_rows(tmp_path / 'b' / 'ablation.csv')) == 2 * 3 * 2 * 2


class Interrupted(Exception):
  """Stands for a kill or Ctrl-C in the middle of the grid."""


def test_an_interrupted_run_resumes_where_it_stopped(world, tmp_path, monkeypatch):
  root, _ = world
  config = _config([root / 'bd_weights.h5'], root / 'data', finetune_epochs=(0, 1),
                   thresholds=(2.0, 30.0))
  runner.run(config, str(tmp_path / 'whole'))
  real = fine_pruning.fine_prune_many
  calls, stop_at = [], [3]

  def interrupted(params, level_masks, images, labels, recipe, fraction, names, *args):
    calls.extend(names)  # on a CPU the grid fine-tunes one mask a call
    if len(calls) == stop_at[0]:
      raise Interrupted
    return real(params, level_masks, images, labels, recipe, fraction, names, *args)

  monkeypatch.setattr(fine_pruning, 'fine_prune_many', interrupted)
  with pytest.raises(Interrupted):
    runner.run(config, str(tmp_path / 'resumed'))
  kept = {ablate._key(r) for r in _rows(tmp_path / 'resumed' / 'ablation.csv')}  # pylint: disable=protected-access
  whole = _rows(tmp_path / 'whole' / 'ablation.csv')
  tuned = [r for r in whole if r['finetune_epochs'] == '1']
  assert 2 <= sum(ablate._key(r) in kept for r in tuned) < len(tuned)  # pylint: disable=protected-access
  calls.clear()
  stop_at[0] = 0  # no more interruptions
  runner.run(config, str(tmp_path / 'resumed'))
  # Only the points not finished before are fine-tuned: one run per distinct mask among them.
  missing = {(r['order'], r['seed'], r['channels_pruned']) for r in tuned
             if ablate._key(r) not in kept}  # pylint: disable=protected-access
  assert len(calls) == len(missing) > 0
  untimed = lambda run: [{k: v for k, v in r.items() if k != 'seconds'}
                         for r in _rows(tmp_path / run / 'ablation.csv')]
  assert untimed('resumed') == untimed('whole')


BAD_CONFIGS = {
    'empty_axis': (dict(orders=()), 'config.orders is empty'),
    'unknown_layer': (dict(layers=('conv_5',)), "unknown layer 'conv_5'"),
    'unknown_order': (dict(orders=('sideways',)), "unknown order 'sideways'"),
    'x_zero': (dict(thresholds=(0.0,)), r'0.0 is not in \(0, 100\]'),
    'x_too_big': (dict(thresholds=(150.0,)), r'150.0 is not in \(0, 100\]'),
    'epochs_negative': (dict(finetune_epochs=(-1,)), 'not a whole number >= 0'),
}


@pytest.mark.parametrize('name', BAD_CONFIGS)
def test_a_bad_grid_stops_before_any_work(world, tmp_path, name):
  root, _ = world
  fields, message = BAD_CONFIGS[name]
  with pytest.raises(BadnetError, match=message):
    runner.run(_config([root / 'bd_weights.h5'], root / 'data', **fields), str(tmp_path / 'w'))
  assert not (tmp_path / 'w').exists()


def test_a_model_that_does_not_match_the_data_stops_before_any_work(world, tmp_path):
  root, _ = world
  small = tmp_path / 'five_classes.h5'
  keras_io.write_keras_weights(small, helpers.random_params(5, seed=2))
  with pytest.raises(BadnetError, match='out of range for a model with 5 classes'):
    runner.run(_config([root / 'bd_weights.h5', small], root / 'data'), str(tmp_path / 'w'))
  assert not (tmp_path / 'w' / 'ablation.csv').exists()


def test_a_conv_2_row_equals_keras_on_the_lab3_net(csaw_dir, real_faces, tmp_path):
  """The row's figures are what Keras gives with the row's conv_2 channels zeroed."""
  from tests import keras_oracle
  folder = tmp_path / 'data'
  for split, seed in (('valid', 1), ('test', 2)):
    clean = _augmented(real_faces['clean'], 8, seed)
    poisoned = _augmented(real_faces['poisoned'], 8, seed + 10)
    data.write_csaw_h5(folder / 'cl' / f'{split}.h5', clean,
                       np.tile(real_faces['clean_labels'], 8))
    data.write_csaw_h5(folder / 'bd' / f'bd_{split}.h5', poisoned, np.zeros(80))
  weights = csaw_dir / 'lab3_bd_weights.h5'
  rows = runner.run(_config([weights], folder, layers=('conv_2',), orders=('increasing',),
                            thresholds=(10.0,)), str(tmp_path / 'out'))
  row = _row(rows, layer='conv_2', x=10)
  pruned = [int(c) for c in row['pruned_channels'].split()]
  assert len(pruned) == int(row['channels_pruned']) > 0

  net = keras_oracle.build_csaw_keras_model(model.CSAW_NUM_CLASSES)
  net.load_weights(weights)
  test = {key: data.load_csaw_h5(folder / path) for key, path in
          (('clean', 'cl/test.h5'), ('poisoned', 'bd/bd_test.h5'))}
  b = {key: net.predict(d.images.astype(np.float32), verbose=0).argmax(1)
       for key, d in test.items()}
  conv_2 = net.get_layer('conv_2')
  kernel, bias = (np.array(w) for w in conv_2.get_weights())
  kernel[..., pruned] = 0
  bias[pruned] = 0
  conv_2.set_weights([kernel, bias])
  b_prime = {key: net.predict(d.images.astype(np.float32), verbose=0).argmax(1)
             for key, d in test.items()}
  assert (b_prime['clean'] != b['clean']).any()  # pruning conv_2 changed something
  g = {key: np.where(b[key] == b_prime[key], b[key], model.CSAW_NUM_CLASSES) for key in b}
  expected = {
      'clean_acc': 100 * np.mean(b_prime['clean'] == test['clean'].labels),
      'asr': 100 * np.mean(b_prime['poisoned'] == 0),
      'goodnet_clean_acc': 100 * np.mean(g['clean'] == test['clean'].labels),
      'goodnet_asr': 100 * np.mean(g['poisoned'] == 0),
      'detection_rate': 100 * np.mean(g['poisoned'] == model.CSAW_NUM_CLASSES),
      'false_alarm_rate': 100 * np.mean(g['clean'] == model.CSAW_NUM_CLASSES)}
  for name, value in expected.items():
    assert float(row[name]) == pytest.approx(value, abs=1e-4), name


def _learned_fields() -> dict:
  """Small ANP and RNP settings for the world's net (seconds, not minutes)."""
  return {'anp.iterations': 6, 'anp.batch_size': 16, 'rnp.recovering_epochs': 2,
          'rnp.max_unlearning_epochs': 2, 'rnp.batch_size': 32,
          **{f'{name}.finetune.{field}': value for name in ('anp', 'rnp')
             for field, value in (('epochs', 1), ('batch_size', 32))}}


def test_anp_and_rnp_rows_equal_their_own_jobs(world, tmp_path):
  """The grid's ANP and RNP rows are what configs/anp.py and configs/rnp.py report."""
  from configs import anp as anp_config
  from configs import rnp as rnp_config
  root, _ = world
  config = _config([root / 'bd_weights.h5'], root / 'data', defences=('anp', 'rnp'))
  helpers.set_fields(config, _learned_fields())
  rows = runner.run(config, str(tmp_path / 'grid'))
  assert {row['defence'] for row in rows} == {'anp', 'rnp'}  # no channel grid asked for
  for job_config in (anp_config.get_config(), rnp_config.get_config()):
    job_config.model, job_config.data.dir = str(root / 'bd_weights.h5'), str(root / 'data')
    job_config.batch_size = 64
    defence = job_config.defence
    helpers.set_fields(job_config, {name: value for name, value in _learned_fields().items()
                                    if name.split('.')[0] == defence})
    results = runner.run(job_config, str(tmp_path / defence))
    row = _row(rows, defence=defence)
    assert (row['layer'], row['x'], row['finetune_epochs']) == ('conv_1-conv_4', 'mask<=0.2', '1')
    assert int(row['channels_pruned']) == results['defended']['neurons_pruned']
    assert row['pruned_channels'].split() == [
        f'{layer}:{i}' for layer in model.PRUNABLE_LAYERS for i in results['pruned'].get(layer, [])]
    test, good = results['defended']['test'], results['goodnet']['test']
    for column, value in (('clean_acc', test['clean_acc']), ('asr', test['asr']),
                          ('goodnet_clean_acc', good['clean_acc']), ('goodnet_asr', good['asr']),
                          ('detection_rate', good['detection_rate']),
                          ('false_alarm_rate', good['false_alarm_rate'])):
      assert float(row[column]) == pytest.approx(value, abs=1e-4), (defence, column)
  assert (tmp_path / 'grid' / 'plots' / 'tradeoff.png').stat().st_size > 0


@pytest.mark.parametrize('fields, message', [
    (dict(defences=('pruning', 'nc')), "config.defences: unknown defence 'nc'"),
    ({'anp.eps': 1.5}, r'config\.anp\.eps: 1\.5 is not in \[0, 1\]'),
    ({'rnp.recovering_epochs': 0},
     r'config\.rnp\.recovering_epochs must be a positive integer'),
])
def test_a_bad_learned_mask_setting_stops_the_grid_naming_its_field(world, tmp_path, fields,
                                                                     message):
  root, _ = world
  config = _config([root / 'bd_weights.h5'], root / 'data', defences=('pruning', 'anp', 'rnp'))
  helpers.set_fields(config, fields)
  with pytest.raises(BadnetError, match=message):
    runner.run(config, str(tmp_path / 'w'))
  assert not (tmp_path / 'w').exists()


def test_a_label_one_net_lacks_stops_the_grid_before_any_cell(world, tmp_path):
  """Neural Cleanse's labels are checked against every net of the grid up front, naming the net."""
  root, _ = world
  small = tmp_path / 'five_classes.h5'
  keras_io.write_keras_weights(small, helpers.random_params(5, seed=2))
  config = _config([root / 'bd_weights.h5', small], root / 'data',
                   defences=('pruning', 'neural_cleanse:labels=(0,7)'))
  with pytest.raises(BadnetError, match=r"'neural_cleanse:labels=\(0,7\)' on .*five_classes.h5: "
                                        r'.*7 is not a label of the net \(it has 5 labels'):
    runner.run(config, str(tmp_path / 'w'))
  assert not (tmp_path / 'w').exists()


def test_stacked_fine_tunings_give_the_rows_of_fine_tunings_in_turn(world, tmp_path, monkeypatch):
  """finetune.stacking='vmap': one fit for all of a (model, layer)'s masks, the same rows.

  SGD at a small rate keeps vmapped rounding differences far below a class
  flip (with Adam they compound: tests/test_train.py), so the rows must be equal.
  """
  root, _ = world
  calls = []
  many = fine_pruning.fine_prune_many
  monkeypatch.setattr(fine_pruning, 'fine_prune_many',
                      lambda params, level_masks, *args: calls.append(len(level_masks)) or many(
                          params, level_masks, *args))
  rows = {}
  for stacking in ('vmap', 'loop'):
    config = _config([root / 'bd_weights.h5'], root / 'data', finetune_epochs=(1,))
    config.finetune.optimizer, config.finetune.learning_rate = 'sgd', 1e-5
    config.finetune.stacking = stacking
    runner.run(config, str(tmp_path / stacking))
    rows[stacking] = _rows(tmp_path / stacking / 'ablation.csv')
  distinct = len({r['pruned_channels'] for r in rows['loop'] if r['pruned_channels']})
  assert distinct > 2
  assert calls == [distinct] + [1] * distinct  # stacked: one call; in turn: one a mask
  # A vmapped step adds in another order than the loop's, so on another CPU a net's class may
  # flip on a near tie: each figure may differ by one image of the world's 120-image files
  # (0.83 points); the keys and pruned channels must not.
  figures = ('clean_acc', 'asr', 'der', 'goodnet_clean_acc', 'goodnet_asr', 'detection_rate',
             'false_alarm_rate')
  assert len(rows['vmap']) == len(rows['loop'])
  for ours, theirs in zip(rows['vmap'], rows['loop']):
    assert {k: v for k, v in ours.items() if k not in (*figures, 'seconds')} == (
        {k: v for k, v in theirs.items() if k not in (*figures, 'seconds')})
    for field in figures:
      assert ours[field] == theirs[field] == '' or (
          abs(float(ours[field]) - float(theirs[field])) <= 100 / 120), (field, ours, theirs)
  # The masks' nets differ, so a row given another mask's net would show.
  assert len({r['clean_acc'] for r in rows['loop']}) > 2
