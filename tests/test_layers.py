"""Pruning any of conv_1..conv_4: the shared-prefix functions against zeroing the weights."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from badnet.core import evaluate, masks, model
from badnet.defences import goodnet, pruning, sweep
from badnet.io import keras_io
from tests import helpers
from tests.test_prune import _augmented

NUM_CLASSES = 11
CHANNELS = {'conv_1': 20, 'conv_2': 40, 'conv_3': 60, 'conv_4': 80}


@pytest.fixture(scope='module')
def random_net():
  params, images = helpers.random_params(NUM_CLASSES, seed=5), helpers.varied_images(96, seed=0)
  assert len(np.unique(evaluate.predict(params, images))) > 3  # B gives varied classes
  return params, images


def _masks(channels: int, seed: int) -> np.ndarray:
  """All kept, all pruned, and random masks pruning a quarter to three quarters."""
  rng = np.random.default_rng(seed)
  random = [rng.random(channels) > rng.uniform(0.25, 0.75) for _ in range(4)]
  return np.stack([np.ones(channels), np.zeros(channels), *random]).astype(np.float32)


@pytest.mark.parametrize('layer', model.PRUNABLE_LAYERS)
def test_masked_logits_equal_the_net_with_the_layer_zeroed(random_net, layer):
  params, images = random_net
  level_masks = _masks(CHANNELS[layer], seed=len(layer) + int(layer[-1]))
  logits = np.asarray(jax.jit(sweep.masked_logits, static_argnums=3)(params, images, level_masks,
                                                                    layer))
  assert logits.shape == (len(level_masks), len(images), NUM_CLASSES)
  classes = []
  for mask, row in zip(level_masks, logits):
    direct = np.asarray(model.apply(masks.prune(params, mask, layer), images))
    np.testing.assert_allclose(row, direct, rtol=1e-5, atol=1e-4 * np.abs(direct).max())
    np.testing.assert_array_equal(row.argmax(-1), direct.argmax(-1))
    classes.append(direct.argmax(-1))
  assert len({tuple(c) for c in classes}) >= 3, 'the level_masks should change the classes'
  # Row 0 (nothing pruned) is B itself.
  np.testing.assert_array_equal(logits[0].argmax(-1), evaluate.predict(params, images))


@pytest.mark.parametrize('layer', model.PRUNABLE_LAYERS)
def test_gradients_through_a_mask_stop_at_the_pruned_channels(random_net, layer):
  params, images = random_net
  mask = _masks(CHANNELS[layer], seed=3)[2]
  grads = jax.grad(lambda p: sweep.masked_logits(p, images[:16], mask[None], layer).sum())(params)
  kernel_grad = np.asarray(grads[layer]['kernel'])
  assert not kernel_grad[..., mask == 0].any()
  assert not np.asarray(grads[layer]['bias'])[mask == 0].any()
  assert kernel_grad[..., mask == 1].any()


@pytest.mark.parametrize('layer', ['conv_1', 'conv_2', 'conv_4'])
def test_prefix_sweep_of_another_layer_equals_the_naive_loop(random_net, layer):
  params, images = random_net
  features = sweep.features(params, images, batch_size=32, layer=layer)
  # Equal up to the order XLA adds in, which depends on what else a program computes.
  np.testing.assert_allclose(features.mean_activations(),
                             pruning.mean_activations(params, images, 32, layer), rtol=1e-6)
  order = pruning.pruning_order(features.mean_activations())
  np.testing.assert_array_equal(
      order, pruning.pruning_order(pruning.mean_activations(params, images, 32, layer)))
  level_masks = masks.prefix_masks(order)
  fast = sweep.prefix_classes(params, features, order, batch_size=48)
  assert fast.shape == (len(images), CHANNELS[layer] + 1)
  levels = range(0, CHANNELS[layer] + 1, 1 if layer == 'conv_1' else 3)
  for level in levels:
    naive = evaluate.predict(masks.prune(params, level_masks[level], layer), images, batch_size=32)
    np.testing.assert_array_equal(fast[:, level], naive, err_msg=f'{layer} level {level}')
  assert len({tuple(fast[:, level]) for level in levels}) > 3


@pytest.mark.parametrize('layer', ['conv_2', 'conv_4'])
def test_goodnet_sharing_layers_equals_goodnet_with_two_nets(random_net, layer):
  params, images = random_net
  mask = _masks(CHANNELS[layer], seed=8)[3]
  shared = np.asarray(jax.jit(goodnet.goodnet_masked, static_argnums=3)(params, mask, images,
                                                                       layer))
  two_nets = np.asarray(goodnet.goodnet(params, masks.prune(params, mask, layer), images))
  np.testing.assert_array_equal(shared, two_nets)
  assert (shared == NUM_CLASSES).any() and (shared != NUM_CLASSES).any()


def test_unknown_layer_is_refused(random_net):
  params, images = random_net
  with pytest.raises(ValueError, match='unknown layer'):
    sweep.masked_logits(params, images, np.ones((1, 60)), 'fc_1')
  with pytest.raises(ValueError, match='unknown layer'):
    masks.prune(params, np.ones(60), 'pool_3')


def test_conv_2_pruning_equals_keras_on_the_lab3_net(csaw_dir, real_faces):
  """Keras with conv_2's kernel slices and biases zeroed gives our classes, image by image."""
  from tests import keras_oracle
  faces = np.concatenate([_augmented(real_faces['clean'], 6, seed=11),
                          _augmented(real_faces['poisoned'], 6, seed=12)])
  params = keras_io.read_params(csaw_dir / 'lab3_bd_weights.h5')
  features = sweep.features(params, faces, batch_size=60, layer='conv_2')
  order = pruning.pruning_order(features.mean_activations())
  levels = [0, 5, 10, 20, 30, 35, 40]
  ours = sweep.prefix_classes(params, features, order, levels, batch_size=60)
  masked = np.asarray(sweep.masked_classes(params, faces, masks.prefix_masks(order)[levels],
                                           'conv_2'))
  np.testing.assert_array_equal(masked.T, ours)

  net = keras_oracle.build_csaw_keras_model(model.CSAW_NUM_CLASSES)
  net.load_weights(csaw_dir / 'lab3_bd_weights.h5')
  conv_2 = net.get_layer('conv_2')
  kernel, bias = (np.array(w) for w in conv_2.get_weights())
  for column, level in enumerate(levels):
    pruned = order[:level]
    kernel[..., pruned] = 0
    bias[pruned] = 0
    conv_2.set_weights([kernel, bias])
    keras_classes = net.predict(faces.astype(np.float32), verbose=0).argmax(1)
    np.testing.assert_array_equal(ours[:, column], keras_classes, f'conv_2 level {level}')
  assert len({tuple(ours[:, c]) for c in range(len(levels))}) >= 3  # pruning conv_2 moved them


# --- the one apply ---


class _FlaxDeepID(nn.Module):
  """DeepID written with Flax's own Conv and Dense: the oracle of init_params and apply."""
  num_classes: int

  @nn.compact
  def __call__(self, images):
    conv = lambda features, size, name: nn.Conv(features, (size, size), padding='VALID',
                                                precision='highest', name=name)
    x = jnp.asarray(images, jnp.float32)
    for name, features, size in (('conv_1', 20, 4), ('conv_2', 40, 3), ('conv_3', 60, 3)):
      x = nn.max_pool(nn.relu(conv(features, size, name)(x)), (2, 2), (2, 2))
    fc_1 = nn.Dense(160, precision='highest', name='fc_1')(x.reshape(len(x), -1))
    conv_4 = nn.relu(conv(80, 2, 'conv_4')(x))
    fc_2 = nn.Dense(160, precision='highest', name='fc_2')(conv_4.reshape(len(x), -1))
    return nn.Dense(self.num_classes, precision='highest', name='output')(nn.relu(fc_1 + fc_2))


def test_init_params_are_flax_conv_and_dense_init_and_apply_is_their_net(random_net):
  _, images = random_net
  oracle = _FlaxDeepID(NUM_CLASSES)
  expected = oracle.init(jax.random.key(4), images[:1])['params']
  params = model.init_params(NUM_CLASSES, seed=4)
  assert list(params) == list(expected)  # the order tests' random biases are drawn in
  jax.tree.map(np.testing.assert_array_equal, params, expected)
  assert model.param_shapes(NUM_CLASSES) == jax.tree.map(np.shape, dict(sorted(params.items())))
  biased = helpers.random_params(NUM_CLASSES, seed=5)
  ours = np.asarray(jax.jit(model.apply)(biased, images))
  theirs = np.asarray(jax.jit(oracle.apply)({'params': biased}, images))
  np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-4 * np.abs(theirs).max())
  np.testing.assert_array_equal(ours.argmax(-1), theirs.argmax(-1))


@pytest.mark.parametrize('layer', model.PRUNABLE_LAYERS)
def test_apply_started_where_it_stopped_is_the_whole_net_bit_for_bit(random_net, layer):
  params, images = random_net
  mask = _masks(CHANNELS[layer], seed=7)[3]
  whole = jax.jit(lambda p, x, m: model.apply(p, x, m, layer))(params, images, mask)
  state = jax.jit(lambda p, x: model.apply(p, x, stop=layer))(params, images)
  assert set(state) == ({'activation', 'fc_1'} if layer == 'conv_4' else {'activation'})
  resumed = jax.jit(lambda p, s, m: model.apply(p, s, m, start=layer))(params, state, mask)
  np.testing.assert_array_equal(resumed, whole)
  assert (np.asarray(whole) != np.asarray(model.apply(params, images))).any()  # the mask acts


def test_unit_neuron_scales_and_conv_4_as_matmul_are_the_plain_net(random_net):
  params, images = random_net
  ones = {layer: (np.ones(params[layer]['bias'].shape, np.float32),) * 2
          for layer in model.NEURON_LAYERS}
  plain = np.asarray(model.apply(params, images))
  np.testing.assert_array_equal(model.apply(params, images, neurons=ones), plain)
  as_matmul = np.asarray(model.apply(params, images, conv_4_as_matmul=True))
  np.testing.assert_allclose(as_matmul, plain, rtol=1e-5, atol=1e-4 * np.abs(plain).max())
  # A bias scale of 0 drops exactly that layer's bias.
  no_bias = {'fc_2': (ones['fc_2'][0], np.zeros(160, np.float32))}
  by_hand = {**params, 'fc_2': {**params['fc_2'], 'bias': np.zeros(160, np.float32)}}
  np.testing.assert_array_equal(model.apply(params, images, neurons=no_bias),
                                model.apply(by_hand, images))
  assert (np.asarray(model.apply(by_hand, images)) != plain).any()


def test_apply_refuses_a_mask_it_cannot_place_and_unknown_layers(random_net):
  params, images = random_net
  state = model.apply(params, images[:2], stop='conv_2')
  with pytest.raises(ValueError, match='cannot apply to a net started after conv_2'):
    model.apply(params, state, np.ones(20, np.float32), 'conv_1', start='conv_2')
  with pytest.raises(ValueError, match="unknown layer 'pool_3'"):
    model.apply(params, images[:2], stop='pool_3')
