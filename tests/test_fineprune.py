"""Fine-pruning: the pure step, the held-out split, the job, its files and its config checks."""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from badnet.core import evaluate, train
from badnet.defences import base, fine_pruning, goodnet
from badnet.io import data, keras_io
from badnet.io import workdir as workdir_lib
from badnet import defences, defend, runner
from badnet.errors import ConfigError
from configs import fine_prune as fine_prune_config
from tests import conftest, helpers

NUM_CLASSES = conftest.WORLD_CLASSES
PRUNED = [0, 17, 31, 59]


def _mask() -> np.ndarray:
  mask = np.ones(60, np.float32)
  mask[PRUNED] = 0
  return mask


def _labelled_batch(params, count: int = 32, seed: int = 9):
  images = helpers.varied_images(count, seed)
  return images, evaluate.predict(params, images)


def _add_one() -> optax.GradientTransformation:
  """An 'optimiser' that pushes every weight up by 1 each step, pruned ones included."""
  return optax.GradientTransformation(
      lambda params: optax.EmptyState(),
      lambda updates, state, params=None: (jax.tree.map(jnp.ones_like, updates), state))


@pytest.mark.parametrize('optimizer', [
    optax.adamw(1e-2, weight_decay=0.1),
    optax.chain(optax.add_decayed_weights(0.1), optax.sgd(1e-2, momentum=0.9)),
    _add_one()], ids=['adamw', 'sgd_l2', 'add_one'])
def test_train_step_holds_pruned_channels_at_exactly_zero(optimizer):
  """From an unpruned net, one step leaves the pruned conv_3 slices zero and moves the rest."""
  params = helpers.random_params(NUM_CLASSES, seed=4)
  images, labels = _labelled_batch(params)
  state = optimizer.init(params)
  new, _, loss, _ = train.train_step(params, state, images, labels, _mask(),
                                     {'conv_3': _mask()}, optimizer=optimizer)
  assert np.isfinite(loss)
  kernel, bias = np.asarray(new['conv_3']['kernel']), np.asarray(new['conv_3']['bias'])
  assert not kernel[..., PRUNED].any() and not bias[PRUNED].any()
  keep = _mask().astype(bool)
  assert (kernel[..., keep] != np.asarray(params['conv_3']['kernel'])[..., keep]).any()
  # Without holding, the same step leaves the pruned slices where the optimiser put them.
  loose, _, _, _ = train.train_step(params, optimizer.init(params), images, labels, _mask(),
                                    optimizer=optimizer)
  assert np.asarray(loose['conv_3']['kernel'])[..., PRUNED].any()


def test_train_step_is_pure():
  params = helpers.random_params(NUM_CLASSES, seed=4)
  before = jax.tree.map(np.array, params)
  images, labels = _labelled_batch(params)
  optimizer = optax.adam(1e-3)
  step = jax.jit(lambda p, s, x, y, m: train.train_step(p, s, x, y, m, {'conv_3': m},
                                                        optimizer=optimizer))
  first = step(params, optimizer.init(params), images, labels, _mask())
  second = step(params, optimizer.init(params), images, labels, _mask())
  jax.tree.map(np.testing.assert_array_equal, first[0], second[0])
  jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, params))


def test_holdout_split_is_stratified_disjoint_and_seeded():
  labels = np.repeat(np.arange(5), [10, 10, 5, 2, 1])
  fit_rows, holdout_rows = base.holdout_split(labels, 0.2, seed=3)
  assert sorted([*fit_rows, *holdout_rows]) == list(range(len(labels)))
  # 20 % of each class, at least one where a class has two images, none from a singleton.
  assert [int((labels[holdout_rows] == c).sum()) for c in range(5)] == [2, 2, 1, 1, 0]
  again = base.holdout_split(labels, 0.2, seed=3)
  np.testing.assert_array_equal(again[1], holdout_rows)
  assert not np.array_equal(base.holdout_split(labels, 0.2, seed=4)[1], holdout_rows)


@pytest.mark.parametrize('optimizer', ['adam', 'adamw', 'sgd'])
def test_fine_prune_keeps_pruned_channels_zero_and_returns_the_best_epoch(optimizer):
  """Weight decay on, a few epochs: pruned slices exactly zero; the chosen epoch is the best."""
  params = helpers.random_params(NUM_CLASSES, seed=5)
  images = helpers.varied_images(100, seed=11)
  labels = evaluate.predict(params, images)
  recipe = train.Recipe(optimizer=optimizer, learning_rate=1e-3, epochs=4, batch_size=16,
                        weight_decay=0.05, seed=1)
  tuned, history = fine_pruning.fine_prune(params, _mask(), images, labels, recipe, 0.25)
  kernel, bias = tuned['conv_3']['kernel'], tuned['conv_3']['bias']
  assert not kernel[..., PRUNED].any() and not bias[PRUNED].any()
  keep = _mask().astype(bool)
  assert (kernel[..., keep] != np.asarray(params['conv_3']['kernel'])[..., keep]).any()
  assert [epoch['epoch'] for epoch in history] == [1, 2, 3, 4]
  _, holdout_rows = base.holdout_split(labels, 0.25, seed=1)
  scored = evaluate.accuracy(tuned, images[holdout_rows], labels[holdout_rows])
  assert scored == max(epoch['holdout_acc'] for epoch in history)


def test_recommend_takes_the_deepest_x_within_the_clean_drop_in_whole_images():
  # name -> ((channels pruned, X), held-out clean accuracy) on 200 images (one is 0.5 points);
  # B: 199 right. X=95 was never reached.
  results = {'2': ((40, 2.0), 99.0), '30': ((45, 30.0), 97.5), '85': ((49, 85.0), 96.5)}
  assert fine_pruning.recommend(results, 99.5, 3.0, 200) == '85'  # 6 lost of 6 allowed
  assert fine_pruning.recommend(results, 99.5, 2.9, 200) == '30'  # 5 allowed: 4 lost
  assert fine_pruning.recommend(results, 99.5, 0.5, 200) == '2'   # 1 allowed: 1 lost
  assert fine_pruning.recommend(results, 99.5, 0.4, 200) is None  # 0.8 of an image: none
  # Figures off the image grid (float rounding) count as the nearest whole image.
  assert fine_pruning.recommend({'2': ((40, 2.0), 99.0 - 1e-9)}, 99.5, 0.5, 200) == '2'


def _config(world_root, workdir_poisoned=None, **finetune) -> 'ml_collections.ConfigDict':
  """The fine-prune config on the world; ``finetune``: fields of config.fine_pruning.finetune
  (holdout_fraction and max_clean_drop, of config.fine_pruning itself)."""
  config = fine_prune_config.get_config()
  config.model = str(world_root / 'bd_weights.h5')
  config.data.dir = str(world_root / 'data')
  if workdir_poisoned is not None:
    config.data.poisoned_valid = str(workdir_poisoned / 'bd_valid.h5')
    config.data.poisoned_test = str(workdir_poisoned / 'bd_test.h5')
  config.fine_pruning.thresholds = (2.0, 10.0, 95.0)
  config.batch_size = 64
  config.fine_pruning.finetune.epochs = 2
  config.fine_pruning.finetune.batch_size = 32
  config.fine_pruning.finetune.weight_decay = 1e-3
  for key, value in finetune.items():
    block = ('fine_pruning' if key in ('holdout_fraction', 'max_clean_drop')
             else 'fine_pruning.finetune')
    helpers.set_fields(config, {f'{block}.{key}': value})
  return config


@pytest.fixture(scope='module')
def fine_pruned(world, tmp_path_factory):
  """One run of the fine-prune job on the random world."""
  root, _ = world
  workdir = tmp_path_factory.mktemp('fine_prune')
  return workdir, runner.run(_config(root), str(workdir))


def test_fine_prune_job_writes_consistent_results(world, fine_pruned):
  root, params = world
  workdir, results = fine_pruned
  for name in ('sweep.csv', 'results.json', 'results.md', 'plots/fine_prune.png',
               'models/repaired_X=2.h5', 'models/fine_pruned_X=2.h5',
               'models/fine_pruned_X=10.h5'):
    assert (workdir / name).is_file(), name
  assert not (workdir / 'models' / 'fine_pruned_X=95.h5').exists()
  assert json.loads((workdir / 'results.json').read_text()) == json.loads(json.dumps(results))
  assert results['thresholds']['95']['fine_pruned'] is None
  clean = data.load_csaw_h5(root / 'data' / 'cl' / 'test.h5')
  poisoned = data.load_csaw_h5(root / 'data' / 'bd' / 'bd_test.h5')
  for x in ('2', '10'):
    entry = results['thresholds'][x]
    tuned = keras_io.read_params(workdir / entry['fine_pruned_model_file'])
    # The file holds B'_X's pruning: exactly its channels are zero, and no others.
    zeroed = np.flatnonzero((tuned['conv_3']['bias'] == 0)
                            & ~tuned['conv_3']['kernel'].reshape(-1, 60).any(axis=0))
    assert sorted(zeroed.tolist()) == sorted(entry['pruned_channels'])
    # The figures are those of a direct evaluation of the file, and of GoodNet with B.
    # (results.json holds figures at 6 significant digits: workdir.tidy.)
    assert entry['fine_pruned']['clean_acc'] == workdir_lib.tidy(evaluate.accuracy(
        tuned, clean.images, clean.labels))
    assert entry['fine_pruned']['asr'] == workdir_lib.tidy(evaluate.attack_success_rate(
        tuned, poisoned.images, poisoned.labels))
    assert entry['goodnet_fine_pruned'] == workdir_lib.tidy(goodnet.metrics(
        goodnet.predict(params, tuned, clean.images), clean.labels,
        goodnet.predict(params, tuned, poisoned.images), poisoned.labels, NUM_CLASSES))
    assert 1 <= entry['fine_pruned']['chosen_epoch'] <= 2
  only = results['fine_tuned_only']
  assert set(only) >= {'clean_acc', 'asr', 'chosen_epoch', 'history'}
  assert 'Fine-pruning: adam' in (workdir / 'results.md').read_text()


def test_fine_prune_job_is_deterministic_and_never_trains_on_poisoned_files(
    world, fine_pruned, tmp_path):
  """A second run, with other images in the poisoned files, fine-tunes to the same nets.

  Only the reported ASR figures may change: nothing poisoned reaches training.
  """
  root, _ = world
  first_dir, first = fine_pruned
  other = tmp_path / 'other_poison'
  for split, seed in (('valid', 41), ('test', 42)):
    source = data.load_csaw_h5(root / 'data' / 'bd' / f'bd_{split}.h5')
    data.write_csaw_h5(other / f'bd_{split}.h5', helpers.varied_images(60, seed),
                       source.labels)
  second = runner.run(_config(root, other), str(tmp_path / 'second'))
  for x in ('2', '10'):
    name = first['thresholds'][x]['fine_pruned_model_file']
    ours = keras_io.read_params(first_dir / name)
    theirs = keras_io.read_params(tmp_path / 'second' / name)
    jax.tree.map(np.testing.assert_array_equal, ours, theirs)
    assert (first['thresholds'][x]['fine_pruned']['clean_acc']
            == second['thresholds'][x]['fine_pruned']['clean_acc'])
  # The same inputs give the same results.json, byte for byte.
  third_dir = tmp_path / 'third'
  runner.run(_config(root), str(third_dir))
  assert (third_dir / 'results.json').read_text().replace(str(third_dir), '') == (
      (first_dir / 'results.json').read_text().replace(str(first_dir), ''))


def test_fine_pruned_file_reloads_in_keras_with_the_same_predictions(world, fine_pruned):
  import keras  # the oracle: the file as the CSAW eval script loads it
  root, _ = world
  workdir, results = fine_pruned
  path = workdir / results['thresholds']['2']['fine_pruned_model_file']
  images = data.load_csaw_h5(root / 'data' / 'cl' / 'test.h5').images
  net = keras.models.load_model(path, compile=False)
  keras_classes = net.predict(images.astype(np.float32), verbose=0).argmax(1)
  ours = evaluate.predict(keras_io.read_params(path), images)
  assert len(np.unique(ours)) > 1
  np.testing.assert_array_equal(keras_classes, ours)


@pytest.mark.parametrize('field, value, message', [
    ('epochs', -1, r'config\.fine_pruning\.finetune\.epochs must be a positive integer'),
    ('epochs', 0, r'config\.fine_pruning\.finetune\.epochs must be a positive integer'),
    ('learning_rate', 0.0, r'config\.fine_pruning\.finetune\.learning_rate must be positive'),
    ('learning_rate', -1e-3, r'config\.fine_pruning\.finetune\.learning_rate must be positive'),
    ('holdout_fraction', 0.0, r'config\.fine_pruning\.holdout_fraction must be in \(0, 1\)'),
    ('holdout_fraction', 1.0, r'config\.fine_pruning\.holdout_fraction must be in \(0, 1\)'),
    ('optimizer', 'adagrad', r"config\.fine_pruning\.finetune\.optimizer: unknown optimizer "
                             r"'adagrad'"),
    ('schedule', 'step', r"config\.fine_pruning\.finetune\.schedule: unknown schedule 'step'"),
    ('weight_decay', -0.1,
     r'config\.fine_pruning\.finetune\.weight_decay must be zero or positive'),
    ('batch_size', 0, r'config\.fine_pruning\.finetune\.batch_size must be a positive integer'),
])
def test_bad_finetune_values_stop_the_job_before_any_work(world, tmp_path, field, value,
                                                          message):
  root, _ = world
  with pytest.raises(ConfigError, match=message):
    runner.run(_config(root, **{field: value}), str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()


def test_a_validation_split_too_small_to_hold_out_is_one_clear_error(world, tmp_path):
  """One image per class: nothing can be held out, so the job says so instead of crashing."""
  root, _ = world
  clean = data.load_csaw_h5(root / 'data' / 'cl' / 'valid.h5')
  first = np.unique(clean.labels, return_index=True)[1]
  data.write_csaw_h5(tmp_path / 'one_each.h5', clean.images[first], clean.labels[first])
  config = _config(root)
  config.data.clean_valid = str(tmp_path / 'one_each.h5')
  # The message names the file and the field.
  with pytest.raises(ConfigError, match=r'one_each.h5: \d+ clean validation '
                                        r'images leave .*\(config\.fine_pruning\.'
                                        r'holdout_fraction\)'):
    runner.run(config, str(tmp_path / 'run'))


def test_the_fine_pruning_plugin_gives_the_job_s_nets_and_choice(world, fine_pruned):
  """defences.get('fine_pruning').defend on the clean split = the job's fine-pruned files."""
  root, params = world
  workdir, results = fine_pruned
  config = _config(root)
  clean = data.load_csaw_h5(root / 'data' / 'cl' / 'valid.h5')
  outcome = defences.get('fine_pruning').defend(
      params, base.Clean(clean.labels, clean.images, config.batch_size, config.precision),
      defend.settings_of(config))
  reached = [x for x, entry in results['thresholds'].items() if entry['reached']]
  # B fine-tuned alone (the job's fine_tuned_only), then B'_X for each X reached.
  assert list(outcome.candidates) == [fine_pruning.BASELINE, *(f'X={x}' for x in reached)]
  assert reached
  baseline = outcome.candidates[fine_pruning.BASELINE]
  assert baseline.figures['chosen_epoch'] == results['fine_tuned_only']['chosen_epoch']
  for x in reached:
    candidate, entry = outcome.candidates[f'X={x}'], results['thresholds'][x]
    assert candidate.pruned['conv_3'].tolist() == entry['pruned_channels']
    assert candidate.figures['chosen_epoch'] == entry['fine_pruned']['chosen_epoch']
    saved = keras_io.read_params(workdir / entry['fine_pruned_model_file'])
    for layer, weights in saved.items():
      for name, value in weights.items():
        np.testing.assert_array_equal(np.asarray(candidate.params[layer][name]), value)
  chosen = results['recommended']
  assert outcome.recommended == (None if chosen is None else f'X={chosen["x"]}')
  if chosen:
    assert outcome.figures['b_holdout_acc'] == chosen['b_holdout_acc']
