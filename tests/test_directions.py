"""Each optimisation goes the way its method says: a sign flipped in the code fails a test here.

One small net and batch for all: a random DeepID whose output layer is scaled down so that its
logits spread over a few units (the random net's own saturate the softmax, and its gradients with
it), 16 images and labels that are not its classes (a clean loss of ~7 nats). Where a step is
small, the first-order change of its objective is known: a step -lr * g changes it by about
-lr * |g|^2. The tests ask for half of that change (or, for signed steps, a third of
eps * |g|_1): the flipped sign gives about minus the whole, and float32 rounds a loss of a few nats
by ~1e-6, far below any of these margins.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from badnet.core import model, train
from badnet.defences import learned_masks
from badnet.defences import neural_cleanse as nc
from tests import helpers

LAYERS = model.NEURON_LAYERS
PRECISION = model.DEFAULT_PRECISION
OPTIMIZER = learned_masks.MaskOptimizer(learning_rate=0.05, momentum=0.9)
anp_step = jax.jit(functools.partial(learned_masks.anp_step, optimizer=OPTIMIZER,
                                     precision=PRECISION))
masked_loss = jax.jit(learned_masks.masked_loss)
mask_gradient = jax.jit(jax.grad(learned_masks.masked_loss, argnums=1))


@pytest.fixture(scope='module')
def net():
  """Params with logits of a few units, 16 images and labels that are not the net's classes."""
  params = helpers.random_params(11, seed=4)
  params['output'] = {name: value / 20 for name, value in params['output'].items()}
  images = helpers.varied_images(16, seed=3)
  labels = np.arange(len(images), dtype=np.int32) % 11
  return params, images, labels


def _square(tree) -> float:
  return sum(float(jnp.vdot(leaf, leaf)) for leaf in jax.tree.leaves(tree))


def _interior_mask(params):
  """Masks in (0.3, 0.9): a step either way stays inside [0, 1], unclipped."""
  rng = np.random.default_rng(0)
  return {layer: jnp.asarray(rng.uniform(0.3, 0.9, m.shape), jnp.float32)
          for layer, m in learned_masks.init_masks(params, LAYERS).items()}


def test_anp_s_perturbation_raises_the_clean_loss(net):
  """With alpha = 0 the step's value is the loss under its noise: the noise, a signed step of
  eps up the loss's gradient from a uniform start in [-eps, eps] (clipped back into it), raises
  the loss by ~0.75 eps |g|_1 (g at no noise: the start's step averages 0.75 eps); descent would
  lower it as much. The bar: a rise of eps |g|_1 / 3."""
  params, images, labels = net
  ones = learned_masks.init_masks(params, LAYERS)
  eps = 0.05
  natural = float(masked_loss(params, ones, images, labels))
  zeros = jax.tree.map(jnp.zeros_like, ones)
  noise_gradient = jax.grad(lambda noise: learned_masks.masked_loss(
      params, ones, images, labels, noise))((zeros, zeros))
  first_order = eps * sum(float(jnp.abs(leaf).sum()) for leaf in jax.tree.leaves(noise_gradient))
  _, _, robust = anp_step(params, ones, OPTIMIZER.init(ones), images, labels, jax.random.key(0),
                          jnp.float32(eps), jnp.float32(0.0))
  assert float(robust) - natural > first_order / 3, (float(robust), natural, first_order)


@pytest.mark.parametrize('alpha, eps', [(1.0, 0.4), (0.0, 0.0)], ids=['natural', 'robust'])
def test_anp_s_mask_step_lowers_the_loss_it_descends(net, alpha, eps):
  """alpha = 1: the natural term alone; alpha = 0 with eps = 0 (no noise): the robust term alone,
  which is then the natural loss. Either way one step lowers L(m) by ~lr |g|^2."""
  params, images, labels = net
  mask = _interior_mask(params)
  before = float(masked_loss(params, mask, images, labels))
  first_order = OPTIMIZER.learning_rate * _square(mask_gradient(params, mask, images, labels))
  stepped, _, value = anp_step(params, mask, OPTIMIZER.init(mask), images, labels,
                               jax.random.key(0), jnp.float32(eps), jnp.float32(alpha))
  assert float(value) == pytest.approx(before, rel=1e-6)  # the objective, at the step's start
  after = float(masked_loss(params, stepped, images, labels))
  assert before - after > first_order / 2, (before, after, first_order)


def test_rnp_s_recovery_step_lowers_the_masked_loss(net):
  """The step descends alpha L(m): L falls by ~alpha lr |g|^2."""
  params, images, labels = net
  mask, alpha = _interior_mask(params), 0.2
  before = float(masked_loss(params, mask, images, labels))
  first_order = alpha * OPTIMIZER.learning_rate * _square(
      mask_gradient(params, mask, images, labels))
  stepped, _, value = jax.jit(functools.partial(
      learned_masks.recover_step, alpha=alpha, optimizer=OPTIMIZER, precision=PRECISION))(
          params, mask, OPTIMIZER.init(mask), images, labels)
  assert float(value) == pytest.approx(alpha * before, rel=1e-6)
  after = float(masked_loss(params, stepped, images, labels))
  assert before - after > first_order / 2, (before, after, first_order)


def test_rnp_s_unlearning_lowers_clean_accuracy(net):
  """Labelled with its own classes, the net starts 100 % accurate; one step of the default
  unlearning (the whole batch) ascends the clean loss and takes it to 0 % here, where descent
  would keep it at 100 %. The bar, 50 %, is 8 images from either."""
  params, images, _ = net
  own = np.asarray(model.apply(params, images)).argmax(1).astype(np.int32)
  settings = learned_masks.RnpSettings(clean_threshold=0.0, max_unlearning_epochs=1,
                                       batch_size=len(images))
  before_loss, before_acc = train.loss_fn(params, images, own, jnp.ones(60))
  unlearned, history = learned_masks.unlearn(params, images, own, settings)
  after_loss, after_acc = train.loss_fn(unlearned, images, own, jnp.ones(60))
  assert float(before_acc) == 1.0 and history[0]['train_acc'] == 100.0
  assert float(after_acc) <= 0.5, float(after_acc)
  assert float(after_loss) > 10 * float(before_loss), (float(before_loss), float(after_loss))


def test_neural_cleanse_s_reversal_lowers_its_trigger_loss(net):
  """Three steps of Adam (rate 0.1 in tanh space) from the random start. lambda stays 0
  (patience 1000), so the objective is the attack loss alone; on the 16 images it falls from
  16.3 to 8.9 nats for label 0 (which the net gives none of them). The bar: a quarter of the
  start lower; ascent would raise it."""
  params, images, _ = net
  label = 0
  settings = nc.Reversal(steps=3, batch_size=len(images), batches_per_step=1, patience=1000,
                         early_stop_patience=0)
  found = jax.jit(nc.reverse_engineer, static_argnums=(4, 5))(params, images, label, 0, settings,
                                                              PRECISION)
  assert int(found.steps) == 3 and float(found.cost) == 0.0

  def attack(mask, pattern):
    logits = model.apply(params, nc.stamp(images, mask, pattern))
    return float(nc.attack_loss(logits, label))

  before = attack(*nc.to_image_space(nc.initial_trigger(0, label)))
  after = attack(found.mask, found.pattern)
  assert after < 0.75 * before, (before, after)


def test_fine_tuning_lowers_the_training_loss(net):
  """One step of SGD (rate 1e-6, the whole batch) from fit lowers the batch's loss by
  ~lr |g|^2 (momentum adds nothing to a first step)."""
  params, images, labels = net
  recipe = train.Recipe(optimizer='sgd', learning_rate=1e-6, schedule='constant', epochs=1,
                        batch_size=len(images))
  loss = lambda p: train.loss_fn(p, images, labels, jnp.ones(60))[0]
  before, gradient = jax.value_and_grad(loss)(params)
  tuned, history = train.fit(params, images, labels, recipe)
  after = float(loss(tuned))
  first_order = recipe.learning_rate * _square(gradient)
  assert history[0]['loss'] == pytest.approx(float(before), rel=1e-5)
  assert float(before) - after > first_order / 2, (float(before), after, first_order)


def test_a_masked_neuron_with_a_positive_bias_has_a_mask_gradient(net):
  """ANP and RNP (as published) scale a neuron's weights by its mask, not its bias: at m = 0 the
  neuron outputs relu(b) = b > 0, ReLU's linear part, and m still moves it by its weighted input,
  so d loss / d m is not 0. With the bias gated too, the neuron is relu(0) and it is 0 exactly.
  One neuron of each conv layer (its largest bias) masked to 0; the dense layers are left out,
  as fc_1 and fc_2 share one ReLU and a masked neuron there need not be in its linear part."""
  params, images, labels = net
  mask = learned_masks.init_masks(params, LAYERS)
  neurons = {layer: int(np.argmax(params[layer]['bias'])) for layer in model.PRUNABLE_LAYERS}
  for layer, neuron in neurons.items():
    assert params[layer]['bias'][neuron] > 0
    mask[layer] = mask[layer].at[neuron].set(0.0)
  gradient = mask_gradient(params, mask, images, labels)
  for layer, neuron in neurons.items():
    # A hundredth of the layer's largest mask gradient: no rounding of an exact 0 reaches it.
    largest = float(jnp.abs(gradient[layer]).max())
    assert abs(float(gradient[layer][neuron])) > 0.01 * largest, (layer, gradient[layer][neuron])
