"""Training and the two attacks, on a small synthetic task."""

import numpy as np
import pytest

from badnet.benchmark import attacks, faces, triggers
from badnet.core import evaluate, masks, model, train
from badnet.defences import pruning

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
