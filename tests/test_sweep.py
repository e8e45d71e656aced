"""The fast sweep (features once, the head only where a level changes an image) vs naive loops."""

import jax
import numpy as np
import pytest

from badnet.core import backend, evaluate, masks, model
from badnet.defences import pruning, sweep
from tests import helpers

NUM_CLASSES = 11
DEAD = [3, 8, 21, 40, 41, 55]  # conv_3 channels the fixture silences on every image


@pytest.fixture(scope='module')
def sparse_net():
  """A random net with non-zero biases whose conv_3 has dead and sparse channels, as lab3's has."""
  params = helpers.random_params(NUM_CLASSES, seed=9)
  bias = np.array(params['conv_3']['bias'])
  bias[DEAD] = -1e4  # relu(x - 1e4) = 0 for these images: dead channels
  params = {**params, 'conv_3': {**params['conv_3'], 'bias': bias}}
  images = helpers.varied_images(160, seed=3)
  return params, images, sweep.features(params, images, batch_size=48)


def test_effective_levels_hand_worked():
  # Image 0: the channels pruned at levels 1 and 4 are active; image 1: none is.
  active = np.array([[True, False, False, True], [False, False, False, False]])
  np.testing.assert_array_equal(sweep.effective_levels(active, np.arange(5)),
                                [[0, 1, 1, 1, 4], [0, 0, 0, 0, 0]])
  np.testing.assert_array_equal(sweep.effective_levels(active, np.array([3, 0, 4])),
                                [[1, 0, 4], [0, 0, 0]])


def test_features_give_pool_3_and_the_ranking_statistic(sparse_net):
  params, images, features = sparse_net
  # Jitted as every badnet computation is: eager ops compile with jax's default CPU options.
  observe = backend.jit(lambda p, x: model.apply(p, x, stop='conv_3')['activation'])
  np.testing.assert_array_equal(features.pool_3, observe(params, images))
  # Bit for bit the statistic pruning.mean_activations ranks by: the same order, ties included.
  np.testing.assert_array_equal(features.mean_activations(),
                                pruning.mean_activations(params, images, batch_size=48))
  active = features.active()
  assert not active[:, DEAD].any()
  per_image = active.sum(axis=1)
  assert per_image.min() > 0 and per_image.max() < 60 - len(DEAD)  # sparse, not all on


@pytest.mark.parametrize('order_name', ['increasing', 'decreasing', 'random'])
def test_fast_sweep_equals_the_naive_loop_at_every_level(sparse_net, order_name):
  """Image by image at all 61 levels, against zero-the-channels-and-predict."""
  params, images, features = sparse_net
  order = pruning.pruning_order(features.mean_activations(), order_name, seed=4)
  level_masks = masks.prefix_masks(order)
  fast = sweep.prefix_classes(params, features.pool_3, order, batch_size=64)
  assert fast.shape == (len(images), 61) and fast.dtype == np.int32
  assert len({tuple(column) for column in fast.T}) > 10, 'the levels should differ'
  if order_name == 'increasing':
    for level in range(61):
      naive = evaluate.predict(masks.prune(params, level_masks[level]), images, batch_size=64)
      np.testing.assert_array_equal(fast[:, level], naive, err_msg=f'level {level}')
  else:  # the scan sweep equals the naive loop (test_prune); cheaper to compare with
    np.testing.assert_array_equal(
        fast, evaluate.sweep_predictions(params, level_masks, images, batch_size=64))


def test_selected_levels_are_columns_of_the_full_sweep(sparse_net):
  params, _, features = sparse_net
  order = pruning.pruning_order(features.mean_activations())
  full = sweep.prefix_classes(params, features.pool_3, order)
  levels = [0, 45, 3, 60, 45]
  np.testing.assert_array_equal(sweep.prefix_classes(params, features.pool_3, order, levels),
                                full[:, levels])


def test_bad_order_or_levels_are_refused(sparse_net):
  params, _, features = sparse_net
  with pytest.raises(ValueError, match='permutation'):
    sweep.prefix_classes(params, features.pool_3, np.zeros(60, int))
  with pytest.raises(ValueError, match='levels must lie in'):
    sweep.prefix_classes(params, features.pool_3, np.arange(60), [0, 61])


def test_a_second_sweep_of_the_same_shapes_compiles_nothing(sparse_net):
  params, images, _ = sparse_net
  other = helpers.random_params(NUM_CLASSES, seed=10)

  def run(net, pixels, seed):
    features = sweep.features(net, pixels, batch_size=40)
    order = pruning.pruning_order(features.mean_activations(), 'random', seed)
    sweep.prefix_classes(net, features.pool_3, order, batch_size=40)
    sweep.prefix_classes(net, features.pool_3, order, [0, 7, 50], batch_size=40)

  first = helpers.count_compilations(lambda: run(params, images, 0))
  assert first > 0  # the counter sees compilations
  # Other weights, other images, another order: the same shapes, nothing new to compile.
  assert helpers.count_compilations(lambda: run(other, helpers.varied_images(160, 8), 1)) == 0


def test_every_layer_runs_at_the_requested_precision():
  params = helpers.random_params(NUM_CLASSES, seed=1)
  images = np.zeros((2, *model.IMAGE_SHAPE), np.uint8)
  for precision, expected in (('highest', jax.lax.Precision.HIGHEST),
                              ('default', jax.lax.Precision.DEFAULT)):
    jaxpr = jax.make_jaxpr(lambda p, x: model.apply(p, x, precision=precision))(params, images)
    products = [eqn for eqn in jaxpr.jaxpr.eqns
                if eqn.primitive.name in ('conv_general_dilated', 'dot_general')]
    assert len(products) == 7  # 4 convolutions, 3 dense layers
    for eqn in products:
      # dot_general holds (lhs, rhs) precisions, conv_general_dilated the same pair.
      assert tuple(eqn.params['precision']) == (expected, expected), eqn
  with pytest.raises(ValueError, match='unknown precision'):
    model.check_precision('tf32')


# --- narrow heads: each row reads only the live channels its level keeps ---


def test_head_widths():
  assert sweep.head_widths(60) == (8, 16, 32, 60)
  assert sweep.head_widths(20) == (8, 16, 20)
  assert sweep.head_widths(6) == (6,)


def _head_logits(params, pool_3, mask):
  return model.apply(params, {'activation': pool_3}, mask, start='conv_3', conv_4_as_matmul=True)


def test_a_narrow_head_gives_the_full_heads_logits_when_the_rest_is_zero():
  """narrow_params + the channels' slice of pool_3 = the full head, the other channels zeroed."""
  params = helpers.random_params(NUM_CLASSES, seed=2)
  rng = np.random.default_rng(0)
  pool_3 = rng.gamma(1.0, 3.0, (64, 5, 4, 60)).astype(np.float32)
  channels = rng.permutation(60)[:16]
  kept = np.zeros(60, np.float32)
  kept[channels] = 1
  level_masks = (rng.random((64, 16)) < 0.7).astype(np.float32)
  full_masks = np.zeros((64, 60), np.float32)
  full_masks[:, channels] = level_masks
  narrow = _head_logits(sweep.narrow_params(params, channels), pool_3[..., channels],
                             level_masks)
  full = _head_logits(params, pool_3, full_masks)
  np.testing.assert_allclose(narrow, full, rtol=1e-4, atol=1e-3 * np.abs(full).max())
  np.testing.assert_array_equal(np.argmax(narrow, -1), np.argmax(full, -1))
  # The same with the other channels merely zero (no mask): what the sweep relies on.
  zeroed = _head_logits(params, pool_3 * kept, np.ones(60, np.float32))
  np.testing.assert_allclose(_head_logits(sweep.narrow_params(params, channels),
                                               pool_3[..., channels], np.ones(16, np.float32)),
                             zeroed, rtol=1e-4, atol=1e-3 * np.abs(zeroed).max())


def test_the_sparse_net_sweep_runs_every_head_width(sparse_net, caplog):
  """The equality tests above cover all four widths, not only the full one."""
  params, _, features = sparse_net
  order = pruning.pruning_order(features.mean_activations(), 'increasing')
  with caplog.at_level('DEBUG', logger='absl'):  # the job logs it at debug level
    sweep.prefix_classes(params, features.pool_3, order, batch_size=64)
  line, = [r.getMessage() for r in caplog.records if 'by channels read' in r.getMessage()]
  counts = dict(pair.split(':') for pair in line.rstrip('.').split(': ', 1)[1].split())
  assert set(counts) == {'8', '16', '32', '60'}
  assert all(int(rows) > 0 for rows in counts.values()), line


def test_a_file_with_every_channel_dead_sweeps_like_the_naive_loop(sparse_net):
  """No live channel: every head reads zeros, as the naive loop's net sees them."""
  params, images, _ = sparse_net
  bias = np.full(60, -1e6, np.float32)  # relu(conv_3 - 1e6) = 0 everywhere
  dead = {**params, 'conv_3': {**params['conv_3'], 'bias': bias}}
  features = sweep.features(dead, images[:40], batch_size=40)
  assert not features.active().any()
  order = np.random.default_rng(1).permutation(60)
  classes = sweep.prefix_classes(dead, features.pool_3, order, batch_size=16)
  naive = evaluate.predict(dead, images[:40], batch_size=40)
  np.testing.assert_array_equal(classes, np.repeat(naive[:, None], 61, axis=1))
