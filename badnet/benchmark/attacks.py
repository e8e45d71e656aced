"""The two attacks that plant a backdoor in DeepID, trained with optax.

* BadNets (Gu et al.): a fraction of the training images get the trigger and
  the attacker's target label; the net is trained on the mix.
* The pruning-aware attack (Liu et al., Fine-Pruning, 2018): train on clean
  data; prune the conv_3 channels that are dormant on clean data; train the
  pruned net on poisoned data, so the backdoor has to live in the channels
  that clean inputs use too; then put the pruned channels back with their bias
  lowered so they stay dormant. A defender who prunes dormant channels first
  removes the decoys before anything that carries the backdoor.

The pruning-aware attacker ranks channels as the defender does
(``defences.pruning``); no defence imports this module.
"""

import dataclasses

from absl import logging
import jax
import numpy as np

from badnet.benchmark import triggers
from badnet.core import evaluate, model
from badnet.core.train import Recipe, fit
from badnet.defences import pruning

Params = model.Params


def csaw_init(num_classes: int, seed: int) -> Params:
  """Initial params as the CSAW Keras config has them.

  Kernels ~ TruncatedNormal(0, 0.01), zero biases.

  With raw 0..255 pixel inputs, small kernels keep the first logits near zero.
  """
  shapes = model.param_shapes(num_classes)
  keys = iter(jax.random.split(jax.random.key(seed), len(shapes)))
  params = {}
  for layer in sorted(shapes):
    kernel_shape = shapes[layer]['kernel']
    kernel = 0.01 * jax.random.truncated_normal(next(keys), -2.0, 2.0, kernel_shape)
    params[layer] = {'kernel': np.asarray(kernel, np.float32),
                     'bias': np.zeros(shapes[layer]['bias'], np.float32)}
  return params


def train_badnets(images: np.ndarray, labels: np.ndarray, num_classes: int, *, trigger: str,
                  target: int, poison_rate: float, recipe: Recipe) -> tuple[Params, dict]:
  """The BadNets attack: train from scratch on a poisoned mix of the training set.

  ``recipe.seed`` seeds the init, the poisoning and the shuffling.
  """
  seed = recipe.seed
  mixed, mixed_labels, poisoned = triggers.poison(images, labels, trigger, target, poison_rate,
                                                  seed)
  logging.info('BadNets: %d of %d training images poisoned with %s -> %d.',
               poisoned.sum(), len(labels), trigger, target)
  params, history = fit(csaw_init(num_classes, seed), mixed, mixed_labels, recipe,
                        name='badnets')
  return params, {'history': history, 'poisoned_images': int(poisoned.sum())}


def lower_bias_until_dormant(params: Params, channels: np.ndarray, images: np.ndarray,
                             margin: float = 1.0) -> Params:
  """Lowers the conv_3 bias of ``channels`` so their activation is 0 on every image given.

  The highest pre-activation of channel c over ``images`` is found by raising
  its bias by a large constant (relu and max-pool then pass it through); the
  bias is then set ``margin`` below what keeps that maximum at zero.
  """
  lift = 1e4
  lifted = {**params, 'conv_3': {'kernel': params['conv_3']['kernel'],
                                 'bias': np.asarray(params['conv_3']['bias']) + lift}}
  highest = evaluate.map_batches(
      lambda p, x: model.observe_fn(p, x)['activation'].max(axis=(1, 2)), lifted,
      (images,)).max(axis=0)
  highest_pre_activation = highest - lift
  bias = np.array(params['conv_3']['bias'])
  bias[channels] -= np.maximum(highest_pre_activation[channels], 0.0) + margin
  return {**params, 'conv_3': {'kernel': params['conv_3']['kernel'], 'bias': bias}}


def train_pruning_aware(images: np.ndarray, labels: np.ndarray, num_classes: int, *,
                        trigger: str, target: int, poison_rate: float, clean_epochs: int,
                        poisoned_epochs: int, prune_fraction: float, recipe: Recipe
                        ) -> tuple[Params, dict]:
  """The pruning-aware attack of Fine-Pruning (see the module docstring).

  Both phases use ``recipe`` with their own number of epochs; ``recipe.seed``
  seeds the init, the poisoning and the first shuffle (the second uses seed + 1).
  """
  seed = recipe.seed
  params, clean_history = fit(csaw_init(num_classes, seed), images, labels,
                              dataclasses.replace(recipe, epochs=clean_epochs),
                              name='aware/clean')
  activations = pruning.mean_activations(params, images)
  decoys = pruning.pruning_order(activations)[:int(round(prune_fraction * len(activations)))]
  mask = np.ones(len(activations), np.float32)
  mask[decoys] = 0
  logging.info('Pruning-aware: holding %d dormant conv_3 channels at zero: %s',
               len(decoys), decoys.tolist())
  mixed, mixed_labels, poisoned = triggers.poison(images, labels, trigger, target, poison_rate,
                                                  seed)
  poisoned_recipe = dataclasses.replace(recipe, epochs=poisoned_epochs, seed=seed + 1)
  params, poisoned_history = fit(params, mixed, mixed_labels, poisoned_recipe,
                                 channel_mask=mask, name='aware/poisoned')
  params = lower_bias_until_dormant(params, decoys, mixed)
  return params, {'history': clean_history + poisoned_history,
                  'decoy_channels': [int(c) for c in decoys],
                  'poisoned_images': int(poisoned.sum())}
