"""Neural Cleanse: the anomaly index, the lambda schedule, vmapped labels, the job, the triggers."""

import json
import math

import jax
import ml_collections
import numpy as np
import pytest

from badnet import defend, inputs, runner
from badnet.benchmark import triggers
from badnet.core import model
from badnet.defences import base
from badnet.defences import neural_cleanse as nc
from badnet.errors import ConfigError
from badnet.io import data, keras_io
from configs import neural_cleanse as nc_config
from tests import helpers


def test_the_anomaly_index_by_hand():
  # Sorted: 2, 10, 11, 12, 13, 14: median (11 + 12) / 2 = 11.5; absolute deviations
  # 9.5, 1.5, 0.5, 0.5, 1.5, 2.5, whose median is 1.5; MAD = 1.4826 x 1.5.
  norms = np.array([2.0, 14.0, 10.0, 11.0, 13.0, 12.0])
  index, median, mad = nc.anomaly_index(norms)
  assert median == 11.5
  assert mad == pytest.approx(1.4826 * 1.5)
  assert index[0] == pytest.approx(9.5 / (1.4826 * 1.5))        # 4.27: flagged
  assert index[1] == pytest.approx(-2.5 / (1.4826 * 1.5))       # above the median: negative
  assert index[2] == pytest.approx(1.5 / (1.4826 * 1.5))        # 0.67
  assert nc.flag(index).tolist() == [True, False, False, False, False, False]
  # A norm far above the median is not a backdoor: only small masks are flagged.
  assert not nc.flag(nc.anomaly_index(np.array([10.0, 11, 12, 13, 90]))[0]).any()


def test_a_mad_of_zero_gives_zero_at_the_median_and_infinity_elsewhere():
  index, median, mad = nc.anomaly_index(np.array([5.0, 5.0, 5.0, 1.0]))
  assert (median, mad) == (5.0, 0.0)
  assert index.tolist() == [0.0, 0.0, 0.0, math.inf]


def _reference_schedule(steps, settings):
  """The authors' bookkeeping after each step, transcribed loop by loop (float64).

  Returns (lambda, best norm) after each step, and the step it stopped early at (or None).
  """
  cost, set_count, up, down, went_up, went_down = 0.0, 0, 0, 0, False, False
  best, stale, stale_best = math.inf, 0, math.inf
  trace = []
  for step, (success, norm) in enumerate(steps):
    ok = success >= settings.attack_threshold
    if ok and norm < best:
      best = norm
    if best < math.inf:
      stale = stale + 1 if best >= settings.early_stop_threshold * stale_best else 0
    stale_best = min(best, stale_best)
    if went_up and went_down and stale >= settings.early_stop_patience:
      trace.append((cost, best))
      return trace, step
    if cost == 0 and ok:
      set_count += 1
      if set_count >= settings.patience:
        cost, up, down, went_up, went_down = settings.init_cost, 0, 0, False, False
    else:
      set_count = 0
    up, down = (up + 1, 0) if ok else (0, down + 1)
    if up >= settings.patience:
      up, cost, went_up = 0, cost * settings.cost_multiplier, True
    elif down >= settings.patience:
      down, cost, went_down = 0, cost / settings.cost_multiplier ** 1.5, True
    trace.append((cost, best))
  return trace, None


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_the_lambda_schedule_and_early_stop_follow_the_authors_loop(seed):
  settings = nc.Reversal(steps=200, batch_size=20, batches_per_step=2, patience=3,
                         early_stop_patience=6)
  rng = np.random.default_rng(seed)
  # Runs of successes and failures, norms drifting down with noise.
  success = np.repeat(rng.random(40) < 0.6, rng.integers(1, 8, 40))[:150]
  steps = [(1.0 if ok else 0.5, 300.0 - 2 * i + rng.normal(0, 5))
           for i, ok in enumerate(success)]
  expected, stop = _reference_schedule(steps, settings)
  state = nc.init_state(0, 0, settings)
  end = jax.jit(nc._end_of_step, static_argnums=1)  # pylint: disable=protected-access
  for step, (rate, norm) in enumerate(steps):
    hits = int(round(rate * settings.batches_per_step * settings.batch_size))
    state = end(state._replace(hits=np.int32(hits), norms=np.float32(norm * 2)), settings)
    want_cost, want_best = expected[step]
    assert float(state.cost) == pytest.approx(want_cost, rel=1e-5), step
    assert float(state.best_norm) == pytest.approx(want_best, rel=1e-5), step
    assert bool(state.stopped) == (step == stop), step
    if stop is not None and step == stop:
      break
  assert stop is not None and stop < len(steps) - 1  # the schedule went up, down and stopped
  costs = [cost for cost, _ in expected]
  assert any(later > earlier > 0 for earlier, later in zip(costs, costs[1:]))  # up
  assert any(earlier > later > 0 for earlier, later in zip(costs, costs[1:]))  # down


@pytest.fixture(scope='module')
def small():
  """A random net with non-zero biases (11 classes) and images that vary its classes."""
  return helpers.random_params(11, seed=4), helpers.varied_images(40, seed=3)


# Few, small steps; a lower bar for success and short patience, so that lambda goes up and
# down and some label stops early. (Longer runs amplify float rounding, which differs with
# the batch's shape, through Adam's normalised steps: after ~14 such steps the masks of a
# label alone and in a batch differ by 1e-2 here, by 5e-6 at 12.)
SMALL = nc.Reversal(steps=12, batch_size=6, batches_per_step=2, attack_threshold=0.8,
                    patience=1, early_stop_patience=2)


def test_labels_optimised_together_equal_each_label_alone(small):
  """Five labels sharing two slots (a label that ends hands its slot on) against the loop."""
  params, images = small
  labels = [3, 0, 7, 10, 5]
  together = nc.reverse_engineer_labels(params, images, labels, seed=2, settings=SMALL, slots=2)
  for row, label in enumerate(labels):  # the oracle: one label at a time
    alone = nc.reverse_engineer_labels(params, images, [label], seed=2, settings=SMALL, slots=1)
    np.testing.assert_allclose(together['mask'][row], alone['mask'][0], atol=5e-5)
    # Where the mask is ~0 the pattern's gradient is ~0 too, and Adam's normalised steps move
    # it on rounding noise; what is stamped, mask x pattern, agrees closely.
    stamped = lambda found, i: found['mask'][i][..., None] * found['pattern'][i]
    np.testing.assert_allclose(stamped(together, row), stamped(alone, 0), atol=0.02)
    np.testing.assert_allclose(together['pattern'][row], alone['pattern'][0], atol=1.0)  # of 255
    assert together['l1'][row] == pytest.approx(alone['l1'][0], rel=1e-5)
    assert together['steps'][row] == alone['steps'][0]
    assert together['found'][row] == alone['found'][0]
    assert together['cost'][row] == pytest.approx(alone['cost'][0], rel=1e-5)
  # The run exercised what it should: lambda up and down, one label stopped early.
  assert (together['cost'] > SMALL.init_cost).any() and (together['cost'] < SMALL.init_cost).any()
  assert 0 < (together['steps'] < SMALL.steps).sum() < len(labels)
  assert ((together['mask'] >= 0) & (together['mask'] <= 1)).all()
  assert ((together['pattern'] >= 0) & (together['pattern'] <= 255)).all()


def test_the_pure_function_under_jit_and_vmap_gives_the_same_triggers(small):
  params, images = small
  labels = np.array([0, 7])
  stacked = jax.jit(jax.vmap(nc.reverse_engineer, in_axes=(None, None, 0, None, None, None)),
                    static_argnums=(4, 5))(params, images, labels, 2, SMALL, 'highest')
  driven = nc.reverse_engineer_labels(params, images, labels, seed=2, settings=SMALL, slots=2)
  np.testing.assert_allclose(np.asarray(stacked.mask), driven['mask'], atol=5e-5)
  np.testing.assert_array_equal(np.asarray(stacked.steps), driven['steps'])


def _job(root, **fields):
  config = nc_config.get_config()
  config.model, config.data.dir = str(root / 'bd_weights.h5'), str(root / 'data')
  config.batch_size = 64
  settings = {'neural_cleanse.steps': 4, 'neural_cleanse.batch_size': 8,
              'neural_cleanse.slots': 3, 'neural_cleanse.unlearning.epochs': 1,
              'neural_cleanse.unlearning.batch_size': 32, **fields}
  helpers.set_fields(config, settings)
  return config


@pytest.fixture(scope='module')
def job_run(world, tmp_path_factory):
  """The job on the random net, a low anomaly threshold so that some label is flagged."""
  root, _ = world
  out = tmp_path_factory.mktemp('nc')
  return out, runner.run(_job(root, **{'neural_cleanse.anomaly_threshold': 1e-3}), out)


def test_the_job_writes_triggers_a_user_can_stamp(world, job_run):
  root, params = world
  out, results = job_run
  assert json.loads((out / 'results.json').read_text()) == results
  for name in ('results.md', 'triggers.npz', 'plots/l1_norms.png', 'plots/triggers.png',
               'models/defended.h5'):
    assert (out / name).is_file(), name
  labels = list(range(11))
  assert results['labels'] == labels
  assert sorted(results['l1_norms']) == sorted(map(str, labels))
  assert results['flagged'] and results['defended']['candidate'] == 'unlearned'
  with np.load(out / 'triggers.npz') as saved:
    assert saved['labels'].tolist() == labels
    masks, patterns = saved['masks'], saved['patterns']
    assert masks.shape == (11, 55, 47) and patterns.shape == (11, 55, 47, 3)
    assert masks.min() >= 0 and masks.max() <= 1 and patterns.max() > 1  # pixel units
    np.testing.assert_allclose(masks.sum(axis=(1, 2)),
                               [results['l1_norms'][str(k)] for k in labels], rtol=1e-4)
    assert saved['flagged'].tolist() == [k in results['flagged'] for k in labels]
  # The reported success of a trigger is B's share of the held-out clean images of other labels
  # that it sends to its label once stamped.
  clean = data.load_csaw_h5(root / 'data' / 'cl' / 'valid.h5')
  settings = defend.settings_of(_job(root))
  _, held = base.split_for_fine_tuning(clean.labels, settings.holdout_fraction, settings.seed)
  by_hand = []
  for label in labels:
    others = clean.images[held][clean.labels[held] != label]
    stamped = nc.stamp(others, masks[label], patterns[label])
    by_hand.append(100 * np.mean(np.asarray(model.apply(params, stamped)).argmax(1) == label))
  np.testing.assert_allclose([results['trigger_success'][str(k)] for k in labels], by_hand,
                             atol=1e-3)
  assert np.ptp(by_hand) > 0  # the labels' figures differ: one for another would show
  saved = keras_io.read_params(out / results['model_file'])
  assert any(not np.array_equal(saved[k]['kernel'], params[k]['kernel']) for k in params)


def test_the_job_reads_no_poisoned_file_before_it_is_done(world, tmp_path, monkeypatch):
  root, _ = world
  events = []
  real_load, real_defend = data.load_csaw_h5, nc.defend
  monkeypatch.setattr(data, 'load_csaw_h5',
                      lambda path, *a, **k: events.append(str(path)) or real_load(path, *a, **k))
  monkeypatch.setattr(nc, 'defend',
                      lambda *a, **k: (real_defend(*a, **k), events.append('defended'))[0])
  runner.run(_job(root, **{'neural_cleanse.anomaly_threshold': 1e-3}), tmp_path / 'run')
  done = events.index('defended')
  assert events[:done] and not any('/bd/' in event for event in events[:done]), events
  assert any('/bd/' in event for event in events[done:]), events


def test_a_subset_of_labels_and_no_unlearning(world, tmp_path):
  root, _ = world
  results = runner.run(_job(root, **{'neural_cleanse.labels': (4, 1, 9),
                                      'neural_cleanse.unlearning.epochs': 0}),
                       tmp_path / 'run')
  assert results['labels'] == [4, 1, 9] and results['defended'] is None
  assert not (tmp_path / 'run' / 'models').exists()


@pytest.mark.parametrize('field, value, message', [
    ('neural_cleanse.labels', (), 'config.neural_cleanse.labels is empty; give at least one '
     'label'),
    ('neural_cleanse.labels', (0, 11),
     r'config.neural_cleanse.labels: 11 is not a label of the net \(it has 11 labels'),
    ('neural_cleanse.labels', (-1,), 'config.neural_cleanse.labels: -1 is not a whole number >= 0'),
    ('neural_cleanse.labels', (2, 2), 'config.neural_cleanse.labels: .* names a label twice'),
    ('neural_cleanse.steps', 0, 'config.neural_cleanse.steps must be a positive integer, got 0'),
    ('neural_cleanse.batch_size', -3,
     'config.neural_cleanse.batch_size must be a positive integer, got -3'),
    ('neural_cleanse.learning_rate', 0.0,
     'config.neural_cleanse.learning_rate must be positive, got 0.0'),
    ('neural_cleanse.attack_threshold', 1.5,
     r'config.neural_cleanse.attack_threshold must be in \(0, 1\]'),
    ('neural_cleanse.unlearning.trigger_fraction', 0.0,
     r'config.neural_cleanse.unlearning.trigger_fraction must be in'),
])
def test_bad_values_stop_before_any_work(world, tmp_path, field, value, message):
  root, _ = world
  config = ml_collections.ConfigDict(_job(root).to_dict(), type_safe=False)
  helpers.set_fields(config, {field: value})
  with pytest.raises(ConfigError, match=message):
    runner.run(config, tmp_path / 'run')
  assert not (tmp_path / 'run').exists()


@pytest.fixture(scope='module')
def shipped_triggers():
  """The default settings on the shipped BadNets net for labels 0 (the target), 1 and 2."""
  model_path, data_dir = inputs.shipped_benchmark('badnets', quiet=True)
  params = keras_io.read_params(model_path)
  clean = data.load_csaw_h5(data_dir / 'cl' / 'valid.h5')
  settings = defend.settings_of(nc_config.get_config())
  fit_rows, held_rows = base.split_for_fine_tuning(clean.labels, settings.holdout_fraction,
                                                   settings.seed)
  found = nc.reverse_engineer_labels(params, clean.images[fit_rows], [0, 1, 2], settings.seed,
                                     settings.reversal(), settings.slots)
  success = nc.trigger_success(params, clean.images[held_rows], clean.labels[held_rows],
                               [0, 1, 2], found['mask'], found['pattern'])
  return found, success


def test_the_shipped_target_gets_a_smaller_trigger_that_works_on_held_out_faces(
    shipped_triggers):
  found, success = shipped_triggers
  assert found['l1'][0] < 0.6 * found['l1'][1:].min(), found['l1']
  assert (success > 90).all(), success
  # (Flagging needs every label's norm: the job on both shipped nets is in WORKSPACE.md,
  # "Neural Cleanse"; on them label 0 is not flagged.)


@pytest.mark.xfail(strict=True, reason='measured: on the shipped BadNets net the default run '
                   'puts most of label 0\'s mask elsewhere than the sunglasses (WORKSPACE.md, '
                   '"Neural Cleanse"); strict, so that this test says so when it changes')
def test_the_shipped_target_s_trigger_lies_on_the_sunglasses(shipped_triggers):
  found, _ = shipped_triggers
  region = triggers.region('sunglasses')
  grown = np.zeros_like(region)  # grown by two pixels: the mask is soft
  for dy in range(-2, 3):
    for dx in range(-2, 3):
      grown |= np.roll(region, (dy, dx), axis=(0, 1))
  mask = found['mask'][0]
  assert mask[grown].sum() > 0.5 * mask.sum(), (mask[grown].sum(), mask.sum())
