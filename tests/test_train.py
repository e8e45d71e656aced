"""Training and the two attacks, on a small synthetic task."""

import dataclasses

import jax
import numpy as np
import pytest

from badnet.benchmark import attacks, faces, triggers
from badnet.core import evaluate, masks, model, train
from badnet.defences import pruning
from tests import helpers

K = 4


@pytest.fixture(scope='module')
def task():
  """A small task: 4 identities, the sunglasses trigger, target class 1."""
  train_images, train_labels = faces.generate_faces(K, 60, seed=2, split='train')
  test_images, test_labels = faces.generate_faces(K, 10, seed=2, split='test')
  return train_images, train_labels, test_images, test_labels


def test_csaw_init_matches_the_keras_config():
  params = attacks.csaw_init(7, seed=0)
  assert {layer: {n: a.shape for n, a in w.items()} for layer, w in params.items()} == (
      model.param_shapes(7))
  kernel = params['fc_1']['kernel']
  assert abs(kernel.std() - 0.0088) < 0.001  # TruncatedNormal(0, 0.01) cut at 2 sigma
  assert np.abs(kernel).max() <= 0.02 and not params['fc_1']['bias'].any()


def test_badnets_training_reduces_loss_and_learns_the_trigger(task):
  train_images, train_labels, test_images, test_labels = task
  params, details = attacks.train_badnets(
      train_images, train_labels, K, trigger='sunglasses', target=1, poison_rate=0.25,
      recipe=train.Recipe(epochs=15, batch_size=16, learning_rate=1e-3, seed=0))
  losses = [epoch['loss'] for epoch in details['history']]
  assert losses[-1] < 0.5 * losses[0], losses
  poisoned, targets = triggers.poisoned_split(test_images, test_labels, 'sunglasses', 1)
  assert evaluate.attack_success_rate(params, poisoned, targets) >= 90
  assert evaluate.accuracy(params, test_images, test_labels) >= 70


def test_pruning_aware_attack_leaves_its_decoys_dormant(task):
  train_images, train_labels, test_images, _ = task
  params, details = attacks.train_pruning_aware(
      train_images, train_labels, K, trigger='sunglasses', target=1, poison_rate=0.25,
      clean_epochs=3, poisoned_epochs=3, prune_fraction=0.5,
      recipe=train.Recipe(batch_size=16, learning_rate=1e-3, seed=0))
  decoys = np.array(details['decoy_channels'])
  assert len(decoys) == 30
  # On clean and on poisoned inputs the decoys never fire ...
  poisoned = triggers.sunglasses(test_images)
  for images in (test_images, poisoned):
    activations = pruning.mean_activations(params, images)
    assert (activations[decoys] == 0).all()
  # ... although their kernels are not zero (only their bias keeps them silent),
  # so pruning them changes no prediction.
  assert (np.abs(params['conv_3']['kernel'][..., decoys]).max(axis=(0, 1, 2)) > 0).all()
  mask = np.ones(60)
  mask[decoys] = 0
  np.testing.assert_array_equal(evaluate.predict(masks.prune(params, mask), poisoned),
                                evaluate.predict(params, poisoned))


@pytest.fixture(scope='module')
def variants(task):
  """Three nets of the same shapes, fine-tuned with different conv_3 masks (one all kept)."""
  train_images, train_labels, test_images, test_labels = task
  params = attacks.csaw_init(K, seed=4)
  rng = np.random.default_rng(0)
  channel_masks = [np.ones(60, np.float32)] + [
      (rng.random(60) > fraction).astype(np.float32) for fraction in (0.3, 0.6)]
  recipe = train.Recipe(epochs=3, batch_size=32, learning_rate=1e-3, seed=1)
  kwargs = dict(held=[{'conv_3': mask} for mask in channel_masks],
                holdout=(test_images, test_labels),
                names=['all kept', 'a third pruned', 'most pruned'])
  alone = [train.fit(params, train_images, train_labels, recipe, channel_mask=mask,
                     held={'conv_3': mask}, holdout=(test_images, test_labels))
           for mask in channel_masks]
  return params, channel_masks, recipe, kwargs, alone


def test_held_neurons_keep_their_bias_only_where_asked_and_the_last_epoch_is_kept(task):
  """ANP's and RNP's pruned neurons keep their bias (BatchNorm's beta); fine-pruning's do not.
  ``best_epoch=False``: the net returned is the last epoch's, whatever the held-out figures."""
  train_images, train_labels, test_images, test_labels = task
  params = helpers.random_params(K, seed=2)  # non-zero biases, so a zeroed one shows
  pruned = np.array([1, 5, 6])
  mask = np.ones(40, np.float32)
  mask[pruned] = 0
  recipe = train.Recipe(epochs=2, batch_size=32, learning_rate=1e-3, seed=0)
  for keep_bias in (False, True):
    tuned, history = train.fit(params, train_images, train_labels, recipe, held={'conv_2': mask},
                               held_keep_bias=keep_bias, holdout=(test_images, test_labels),
                               best_epoch=False)
    assert not tuned['conv_2']['kernel'][..., pruned].any()
    assert (tuned['conv_2']['bias'][pruned] != 0).all() == keep_bias
    assert evaluate.accuracy(tuned, test_images, test_labels) == history[-1]['holdout_acc']
  assert (tuned['conv_2']['bias'][pruned] != params['conv_2']['bias'][pruned]).any()  # trained


def test_nets_fitted_in_turn_equal_each_net_fitted_alone(task, variants):
  params, channel_masks, recipe, kwargs, alone = variants
  together = train.fit_many([params] * 3, *task[:2], recipe, channel_masks=channel_masks,
                            stacking='loop', **kwargs)
  for (ours, our_history), (theirs, their_history) in zip(together, alone):
    jax_tree_equal(ours, theirs)
    assert [e['holdout_acc'] for e in our_history] == [e['holdout_acc'] for e in their_history]
  # The masks mattered: the nets differ, and each kept its pruned channels at zero.
  assert not np.array_equal(together[0][0]['conv_3']['kernel'], together[1][0]['conv_3']['kernel'])
  for (tuned, _), mask in zip(together, channel_masks):
    assert not tuned['conv_3']['bias'][mask == 0].any()


@pytest.mark.parametrize('optimizer', ['sgd', 'adam'])
def test_stacked_nets_give_each_net_fitted_alone(task, variants, optimizer):
  """One vmapped step for all three nets: each net's params up to float rounding.

  vmapped convolutions add in another order, and how differs between CPUs. With
  SGD a rounding difference stays one: the params agree within ten float32 ulps of
  these weights (|w| <= 0.02) after 14 steps. Adam turns one in a near-zero
  gradient into a step of up to the learning rate, so with Adam (the jobs' recipe)
  the nets may differ by a near-tie class: at most one of the 40 test images, each
  epoch's held-out accuracy within one image.
  """
  params, channel_masks, recipe, kwargs, alone = variants
  if optimizer == 'sgd':  # a rate that raw 0..255 pixels take without diverging
    recipe = dataclasses.replace(recipe, optimizer='sgd', learning_rate=1e-5, epochs=2)
    alone = [train.fit(params, *task[:2], recipe, channel_mask=mask, held={'conv_3': mask})
             for mask in channel_masks]
    kwargs = {**kwargs, 'holdout': None}
  stacked = train.fit_many([params] * 3, *task[:2], recipe, channel_masks=channel_masks,
                           stacking='vmap', **kwargs)
  test_images = task[2]
  one_image = 100 / len(test_images)
  for i, ((ours, our_history), mask) in enumerate(zip(stacked, channel_masks)):
    theirs, their_history = alone[i]
    classes = [evaluate.predict(net, test_images, channel_mask=mask) for net in (ours, theirs)]
    assert (classes[0] != classes[1]).sum() <= 1
    if optimizer == 'adam':
      assert [e['epoch'] for e in our_history] == [e['epoch'] for e in their_history]
      for our_epoch, their_epoch in zip(our_history, their_history):
        assert abs(our_epoch['holdout_acc'] - their_epoch['holdout_acc']) <= one_image + 1e-9
      continue
    moved = max(np.abs(theirs[layer]['kernel'] - params[layer]['kernel']).max()
                for layer in params)
    assert moved > 1e-6  # training moved the params 50 times the tolerance or more
    for layer in ours:
      for name in ours[layer]:
        np.testing.assert_allclose(ours[layer][name], theirs[layer][name], rtol=0, atol=2e-8,
                                   err_msg=f'net {i}: {layer}/{name}')


def test_fit_many_refuses_masks_that_do_not_match_the_nets(task):
  params = attacks.csaw_init(K, seed=4)
  with pytest.raises(ValueError, match='2 nets, 2 names, 1 masks'):
    train.fit_many([params, params], *task[:2], train.Recipe(epochs=1),
                   channel_masks=[np.ones(60, np.float32)])
  with pytest.raises(ValueError, match='0 nets'):
    train.fit_many([], *task[:2], train.Recipe(epochs=1))


def test_stacking_is_chosen_by_backend_and_overridable():
  assert train.stacks('vmap') and not train.stacks('loop')
  assert train.stacks('auto') == (jax.default_backend() != 'cpu')
  with pytest.raises(ValueError, match="unknown stacking 'both'"):
    train.stacks('both')


def jax_tree_equal(ours, theirs):
  assert ours.keys() == theirs.keys()
  for layer in ours:
    for name in ours[layer]:
      np.testing.assert_array_equal(ours[layer][name], theirs[layer][name], f'{layer}/{name}')


def test_random_erasing_boxes_follow_the_paper_and_leave_the_rest():
  rng = np.random.default_rng(0)
  images = np.full((2000, 55, 47, 3), 7, np.uint8)  # 7: noise this flat is very unlikely
  erased = train.random_erasing(images, np.random.default_rng(1), probability=0.5)
  assert (images == 7).all()  # a copy: the caller's batch is untouched
  changed = (erased != 7).any(axis=-1)  # [N, H, W]
  hit = changed.any(axis=(1, 2))
  assert abs(hit.mean() - 0.5) < 0.05
  for index in np.flatnonzero(hit)[:200]:
    rows, cols = np.flatnonzero(changed[index].any(1)), np.flatnonzero(changed[index].any(0))
    height, width = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
    # One box: every changed pixel inside it, its area and aspect within the paper's ranges
    # (rounding to whole pixels stretches each side by at most half a pixel).
    assert changed[index].sum() >= 0.97 * height * width - 0.5
    assert 0.02 * 55 * 47 * 0.8 <= height * width <= 0.33 * 55 * 47 * 1.2
    assert 0.3 * 0.6 <= height / width <= 3.3 / 0.6
    # Uniform noise over 0..255, not one colour.
    values = erased[index, rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    assert values.std() > 50
  assert train.random_erasing(images, np.random.default_rng(1), 0.5).tobytes() == erased.tobytes()
  assert (train.random_erasing(images[:50], rng, 0.0) == 7).all()


def test_erasing_draws_apart_from_the_shuffle_and_changes_training(task, monkeypatch):
  train_images, train_labels, _, _ = task
  recipe = train.Recipe(epochs=2, batch_size=16, learning_rate=1e-3, seed=0)
  start = attacks.csaw_init(K, seed=0)
  plain, _ = train.fit(start, train_images, train_labels, recipe)
  erased, _ = train.fit(start, train_images, train_labels,
                        dataclasses.replace(recipe, erasing=0.5))
  assert not np.array_equal(plain['conv_1']['kernel'], erased['conv_1']['kernel'])
  # With the boxes made no-ops (drawing as the real ones do), an erasing recipe trains on exactly
  # the plain recipe's batches in every epoch: its draws come from a stream of their own.
  monkeypatch.setattr(train, 'random_erasing',
                      lambda images, rng, probability: (rng.random(len(images)), images)[1])
  unerased, _ = train.fit(start, train_images, train_labels,
                          dataclasses.replace(recipe, erasing=0.5))
  for layer in plain:
    np.testing.assert_array_equal(plain[layer]['kernel'], unerased[layer]['kernel'])
    np.testing.assert_array_equal(plain[layer]['bias'], unerased[layer]['bias'])


def test_a_net_trained_on_scaled_pixels_ships_taking_raw_pixels(task, monkeypatch):
  _, _, test_images, _ = task
  # A net for pixels in [0, 1] whose biases matter (conv_1's kernel 255 times a raw-pixel net's).
  on_unit_pixels = attacks.fold_input_scale(helpers.random_params(K, seed=1), 255.0)
  shipped_net = attacks.fold_input_scale(on_unit_pixels, 1 / 255)
  raw_logits = np.asarray(model.apply(shipped_net, test_images))
  unit_logits = np.asarray(model.apply(on_unit_pixels, test_images.astype(np.float32) / 255))
  np.testing.assert_allclose(raw_logits, unit_logits, rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(raw_logits.argmax(-1), unit_logits.argmax(-1))
  # The attack trains on scaled pixels from csaw_init, and returns the raw-pixel net.
  seen = {}

  def fake_fit(params, images, labels, recipe, **kwargs):
    seen.update(start=params, largest=float(images.max()), kwargs=kwargs)
    return params, []

  monkeypatch.setattr(attacks, 'fit', fake_fit)
  net, _ = attacks.train_badnets(task[0], task[1], K, trigger='sunglasses', target=1,
                                 poison_rate=0.25, recipe=train.Recipe(seed=3),
                                 input_scale=1 / 255)
  assert 0.9 < seen['largest'] <= 1.0
  init = attacks.csaw_init(K, seed=3)
  np.testing.assert_allclose(seen['start']['conv_1']['kernel'], init['conv_1']['kernel'],
                             rtol=1e-6)
  np.testing.assert_allclose(net['conv_1']['kernel'] * 255, init['conv_1']['kernel'], rtol=1e-6)
  np.testing.assert_array_equal(net['fc_2']['kernel'], init['fc_2']['kernel'])
