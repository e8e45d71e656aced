"""STRIP: entropies by hand and against each blend run alone, the threshold, the job."""

import json
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from badnet import defend, defences, runner
from badnet.core import evaluate, masks, model
from badnet.defences import base, strip
from badnet.errors import ConfigError
from badnet.io import data, keras_io
from configs import strip as strip_config
from tests import helpers


def _constant_net(probabilities: list[float]) -> model.Params:
  """A net whose logits are log(probabilities) for every image: all weights and biases zero
  but the output bias (each ReLU then passes zeros)."""
  params = jax.tree.map(np.zeros_like, model.init_params(len(probabilities), seed=0))
  params['output']['bias'] = np.log(np.asarray(probabilities, np.float32))
  return params


def test_the_entropy_of_known_distributions_by_hand():
  two_bits = strip.prediction_entropy(jnp.zeros((1, 4)))  # uniform over 4
  three_to_one = strip.prediction_entropy(jnp.log(jnp.array([[3.0, 1.0]])))  # (3/4, 1/4)
  certain = strip.prediction_entropy(jnp.array([[1000.0, 0.0, -1000.0]]))  # p = (1, 0, 0)
  np.testing.assert_allclose(two_bits, [2.0], rtol=1e-6)
  np.testing.assert_allclose(three_to_one, [-(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25))],
                             rtol=1e-6)
  assert float(certain[0]) == 0.0  # 0 log 0 = 0, not nan


@pytest.mark.parametrize('blend', strip.BLENDS)
def test_a_net_of_known_logits_gives_its_entropy_on_every_path(blend):
  # softmax = (1/2, 1/4, 1/8, 1/8): H = 1/2 * 1 + 1/4 * 2 + 2 * 1/8 * 3 = 1.75 bits.
  params = _constant_net([0.5, 0.25, 0.125, 0.125])
  images, pool = helpers.varied_images(5, seed=1), helpers.varied_images(7, seed=2)
  direct = strip.entropy(params, images, pool[:3], blend)
  batched = strip.entropies(params, images, pool, strip.Blending(3, blend, batch_size=6))
  np.testing.assert_allclose(direct, 1.75, rtol=1e-6)
  np.testing.assert_allclose(batched, 1.75, rtol=1e-6)


def test_superimposing_by_hand():
  image = np.array([[200, 100, 0]], np.uint8)
  overlay = np.array([[100, 50, 30]], np.uint8)
  np.testing.assert_array_equal(strip.superimpose(image, overlay, 'add'), [[300, 150, 30]])
  np.testing.assert_array_equal(strip.superimpose(image, overlay, 'saturate'), [[255, 150, 30]])
  np.testing.assert_array_equal(strip.superimpose(image, overlay, 'average'), [[150, 75, 15]])
  with pytest.raises(ValueError, match="unknown blend 'max'"):
    strip.superimpose(image, overlay, 'max')


@pytest.fixture(scope='module')
def net():
  """A random net (11 classes), inputs and a pool of overlays.

  The output layer is scaled down so that the logits spread over a few units:
  the random net's own are so large that every entropy underflows to ~0.
  """
  params = helpers.random_params(11, seed=4)
  params['output'] = {name: value / 20 for name, value in params['output'].items()}
  return params, helpers.varied_images(6, seed=3), helpers.varied_images(9, seed=5)


def _one_at_a_time(params, images, overlays, blend):
  """Each blend alone through the net, its entropy in float64 on the host, averaged per input."""
  means = []
  for image, own in zip(images, overlays):
    values = []
    for overlay in own:
      blended = np.asarray(strip.superimpose(image[None], overlay[None], blend))
      logits = np.asarray(model.apply(params, blended), np.float64)[0]
      p = np.exp(logits - logits.max())
      p /= p.sum()
      values.append(-np.sum(p[p > 0] * np.log2(p[p > 0])))
    means.append(np.mean(values))
  return np.array(means)


@pytest.mark.parametrize('blend', strip.BLENDS)
def test_batched_entropies_equal_each_blend_run_alone(net, blend):
  params, images, pool = net
  settings = strip.Blending(overlays=4, blend=blend, seed=3, batch_size=8)  # 2 inputs a step
  draws = strip.draw_overlays(len(images), len(pool), 4, seed=3)
  expected = _one_at_a_time(params, images, pool[draws], blend)
  assert np.ptp(expected) > 0.01  # the inputs differ, so a mixed-up order would show
  np.testing.assert_allclose(strip.entropy(params, images, pool[draws], blend), expected,
                             atol=2e-5)
  np.testing.assert_allclose(strip.entropies(params, images, pool, settings), expected,
                             atol=2e-5)


def test_the_averaged_path_equals_the_direct_one_and_works_under_vmap(net):
  params, images, pool = net
  overlays = np.stack([pool[:4], pool[4:8]])  # two stacks of [N=4] overlays
  inputs = np.stack([images[:3], images[3:]])  # [2, B=3, ...]
  direct = jax.jit(jax.vmap(lambda x, o: strip.entropy(params, x, o, 'average')))(
      inputs, overlays)
  terms = lambda x: model.linear(params, 'conv_1', x)
  averaged = jax.jit(jax.vmap(lambda x, o: strip.linear_blend_entropy(
      params, terms(x), jnp.broadcast_to(terms(o), (3, *terms(o).shape)), 'average')))(
          inputs, overlays)
  np.testing.assert_allclose(averaged, direct, atol=2e-5)
  for stack in range(2):
    np.testing.assert_allclose(direct[stack], strip.entropy(params, inputs[stack],
                                                            overlays[stack], 'average'),
                               atol=1e-6)


@pytest.mark.parametrize('frr', [1.0, 5.0, 20.0])
def test_the_threshold_rejects_the_chosen_rate_of_what_it_was_fitted_to(frr):
  entropies = np.random.default_rng(0).normal(1.5, 0.2, 40_000)  # normal, as the rule assumes
  cut, mean, std = strip.threshold(entropies, frr)
  assert mean == pytest.approx(1.5, abs=0.01) and std == pytest.approx(0.2, abs=0.01)
  assert 100 * np.mean(strip.flag(entropies, cut)) == pytest.approx(frr, abs=0.3)
  skewed = np.random.default_rng(1).exponential(1.0, 5_000)  # no shape assumed: exact
  cut, _, _ = strip.threshold(skewed, frr, 'quantile')
  assert 100 * np.mean(strip.flag(skewed, cut)) == pytest.approx(frr, abs=100 / 5_000)


def test_the_threshold_by_hand():
  # Values 1 and 3: mean 2, population std 1; a 50 % rate cuts at the mean,
  # 15.87 % (the normal's mass below mean - 1 std) at 1.
  assert strip.threshold([1.0, 3.0], 50.0) == pytest.approx((2.0, 2.0, 1.0))
  assert strip.threshold([1.0, 3.0], 15.865525)[0] == pytest.approx(1.0, abs=1e-6)
  assert strip.threshold([0.7, 0.7], 1.0)[0] == 0.7  # no spread: nothing is below
  assert not strip.flag([0.7], 0.7).any()


def _config(root, **fields) -> ml_collections.ConfigDict:
  config = strip_config.get_config()
  config.model, config.data.dir = str(root / 'bd_weights.h5'), str(root / 'data')
  config.strip.overlays, config.batch_size = 4, 64
  helpers.set_fields(config, fields)
  return config


@pytest.fixture(scope='module')
def strip_run(world, tmp_path_factory):
  root, _ = world
  out = tmp_path_factory.mktemp('strip')
  return out, runner.run(_config(root), out)


def test_strip_is_a_defence_plugin_whose_detector_the_job_scores(world, strip_run):
  root, params = world
  out, results = strip_run
  assert defences.get('strip') is strip
  clean = data.load_csaw_h5(root / 'data' / 'cl' / 'valid.h5')
  config = _config(root)
  outcome = strip.defend(params, base.Clean(clean.labels, clean.images, config.batch_size,
                                            config.precision), defend.settings_of(config))
  # STRIP repairs no net of its own: its only candidate is GoodNet's second net (B'_X by
  # pruning on clean data, here), and it recommends none.
  assert list(outcome.candidates) == (['repaired'] if results['goodnet']['reached'] else [])
  assert outcome.recommended is None
  assert outcome.figures['threshold'] == pytest.approx(results['strip']['threshold'], rel=1e-5)
  # The fitting inputs and the overlays are disjoint parts of the clean split.
  fit_rows, pool_rows = outcome.figures['fit_rows'], outcome.figures['pool_rows']
  assert sorted(fit_rows + pool_rows) == list(range(len(clean)))
  # The job's flags are the detector's on the test files.
  with np.load(out / results['entropies_file']) as saved:
    scores = {key: saved[key] for key in saved.files}
  for key, rate in (('clean_test', 'false_rejection_rate'),
                    ('poisoned_test', 'false_acceptance_rate')):
    images = data.load_csaw_h5(root / 'data' / ('cl/test.h5' if key == 'clean_test'
                                                else 'bd/bd_test.h5')).images
    flags = outcome.detector(images)
    assert flags.dtype == bool and flags.shape == (len(images),)
    np.testing.assert_array_equal(flags, scores[key] < outcome.detector.threshold)
    expected = 100 * (flags.mean() if key == 'clean_test' else (~flags).mean())
    assert results['test']['STRIP'][rate] == pytest.approx(expected, abs=1e-4)
  # The realised rate on the fitting inputs is what the threshold gives them.
  assert results['strip']['valid_frr'] == pytest.approx(
      100 * np.mean(scores['clean_valid_fit'] < results['strip']['threshold']), abs=1e-4)


def test_the_job_writes_a_consistent_report(strip_run):
  out, results = strip_run
  assert json.loads((out / 'results.json').read_text()) == results
  for name in ('results.md', 'entropies.npz', 'plots/entropy.png'):
    assert (out / name).is_file(), name
  assert (out / 'plots' / 'entropy.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  assert set(results['data']) == {'clean_valid', 'clean_test', 'poisoned_test'}
  assert results['goodnet']['pruning_x'] == 2.0  # the default GoodNet, from clean data
  assert list(results['test']) == ['STRIP', 'GoodNet', 'STRIP or GoodNet']
  assert 'STRIP or GoodNet' in (out / 'results.md').read_text()


def test_the_composed_detector_flags_what_either_flags(world, tmp_path):
  root, params = world
  repaired = masks.prune(params, masks.prefix_masks(np.arange(60))[20])  # 20 channels pruned
  keras_io.write_keras(tmp_path / 'repaired.h5', repaired, full_model=True)
  results = runner.run(_config(root, **{'strip.repaired': str(tmp_path / 'repaired.h5')}),
                       tmp_path / 'run')
  with np.load(tmp_path / 'run' / 'entropies.npz') as saved:
    scores = {key: saved[key] for key in saved.files}
  for key, rate in (('clean_test', 'false_rejection_rate'),
                    ('poisoned_test', 'false_acceptance_rate')):
    images = data.load_csaw_h5(root / 'data' / ('cl/test.h5' if key == 'clean_test'
                                                else 'bd/bd_test.h5')).images
    goodnet = evaluate.predict(params, images) != evaluate.predict(repaired, images)
    either = goodnet | (scores[key] < results['strip']['threshold'])
    assert goodnet.any() and not goodnet.all()  # the test needs a GoodNet that flags some
    for name, flags in (('GoodNet', goodnet), ('STRIP or GoodNet', either)):
      expected = 100 * (flags.mean() if key == 'clean_test' else (~flags).mean())
      assert results['test'][name][rate] == pytest.approx(expected, abs=1e-4)
  assert results['goodnet']['repaired'].endswith('repaired.h5')


def test_the_job_reads_no_poisoned_file_before_the_detector_is_fixed(world, tmp_path,
                                                                       monkeypatch):
  root, _ = world
  events = []
  real_load, real_defend = data.load_csaw_h5, strip.defend
  monkeypatch.setattr(data, 'load_csaw_h5',
                      lambda path, *a, **k: events.append(str(path)) or real_load(path, *a, **k))
  monkeypatch.setattr(strip, 'defend',
                      lambda *a, **k: (real_defend(*a, **k), events.append('defended'))[0])
  runner.run(_config(root), tmp_path / 'run')
  done = events.index('defended')
  assert not any('/bd/' in event for event in events[:done]), events
  assert any('bd_test' in event for event in events[done:]), events
  assert not any('bd_valid' in event for event in events), events  # never needed


def test_two_runs_give_identical_results(world, strip_run, tmp_path):
  root, _ = world
  out, _ = strip_run
  runner.run(_config(root), tmp_path / 'again')
  assert (tmp_path / 'again' / 'results.json').read_text() == (out / 'results.json').read_text()


@pytest.mark.parametrize('field, value, message', [
    ('strip.overlays', 0, 'config.strip.overlays must be a positive integer, got 0'),
    ('strip.frr', 0.0, r'config.strip.frr must be in \(0, 100\), got 0.0'),
    ('strip.frr', 100.0, r'config.strip.frr must be in \(0, 100\), got 100.0'),
    ('strip.blend', 'multiply', "config.strip.blend: unknown blend 'multiply'; expected one of "
                                'add, saturate, average'),
    ('strip.threshold', 'median', "config.strip.threshold: unknown threshold rule 'median'"),
    ('strip.overlay_fraction', 1.0, r'config.strip.overlay_fraction must be in \(0, 1\)'),
    ('strip.goodnet_x', -1.0, r'config.strip.goodnet_x must be in \[0, 100\], got -1.0'),
    ('strip.repaired', 'nowhere.h5', "config.strip.repaired: no such file 'nowhere.h5'"),
])
def test_bad_values_stop_before_any_work(world, tmp_path, field, value, message):
  root, _ = world
  config = ml_collections.ConfigDict(_config(root).to_dict(), type_safe=False)
  helpers.set_fields(config, {field: value})
  with pytest.raises(ConfigError, match=message):
    runner.run(config, tmp_path / 'run')
  assert not (tmp_path / 'run').exists()
