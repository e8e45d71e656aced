"""The attacks that plant a backdoor in DeepID: BadNets (Gu et al.; with the blended trigger,
Chen et al.) and pruning-aware; and the clean net, trained without poisoning, as their control.

Pruning-aware (Liu et al., Fine-Pruning, 2018) trains on clean data, masks the conv_3 channels
dormant on it, trains on poisoned data so the backdoor lives in channels clean inputs use, then
unmasks them with lowered biases: decoys for a defender who prunes dormant channels first.
"""

import dataclasses

from absl import logging
import jax
import numpy as np

from badnet.benchmark import triggers
from badnet.core import evaluate, model
from badnet.core.train import Recipe, fit

Params = model.Params


def csaw_init(num_classes: int, seed: int) -> Params:
  """The CSAW Keras init: kernels ~ TruncatedNormal(0, 0.01), zero biases.

  Small kernels keep the first logits near zero for raw 0..255 pixels.
  """
  shapes = model.param_shapes(num_classes)
  keys = iter(jax.random.split(jax.random.key(seed), len(shapes)))
  params = {}
  for layer in sorted(shapes):
    kernel = 0.01 * jax.random.truncated_normal(next(keys), -2.0, 2.0, shapes[layer]['kernel'])
    params[layer] = {'kernel': np.asarray(kernel, np.float32),
                     'bias': np.zeros(shapes[layer]['bias'], np.float32)}
  return params


def train_clean(images: np.ndarray, labels: np.ndarray, num_classes: int, *,
                recipe: Recipe) -> tuple[Params, dict]:
  """A net trained as BadNets trains, on clean data only: the negative control."""
  params, history = fit(csaw_init(num_classes, recipe.seed), images, labels, recipe,
                        name='clean')
  return params, {'history': history, 'poisoned_images': 0}


def train_badnets(images: np.ndarray, labels: np.ndarray, num_classes: int, *, trigger: str,
                  target: int, poison_rate: float, recipe: Recipe) -> tuple[Params, dict]:
  """BadNets: train from scratch on a poisoned mix; ``recipe.seed`` seeds all randomness."""
  mixed, mixed_labels, poisoned = triggers.poison(images, labels, trigger, target, poison_rate,
                                                  recipe.seed)
  logging.info('BadNets: %d of %d training images poisoned with %s -> %d.',
               poisoned.sum(), len(labels), trigger, target)
  params, history = fit(csaw_init(num_classes, recipe.seed), mixed, mixed_labels, recipe,
                        name='badnets')
  return params, {'history': history, 'poisoned_images': int(poisoned.sum())}


def lower_bias_until_dormant(params: Params, channels: np.ndarray, images: np.ndarray,
                             margin: float = 1.0) -> Params:
  """Lowers the conv_3 bias of ``channels`` so their activation is 0 on every image given.

  Each channel's highest pre-activation is found by lifting its bias by a large
  constant (so relu and max-pooling pass it); the bias is set ``margin`` below that.
  """
  lift = 1e4
  lifted = {**params, 'conv_3': {'kernel': params['conv_3']['kernel'],
                                 'bias': np.asarray(params['conv_3']['bias']) + lift}}
  pool_3_maxima = lambda p, x: model.apply(p, x, stop='conv_3')['activation'].max(axis=(1, 2))
  highest_pre_activation = evaluate.map_batches(pool_3_maxima, lifted, (images,)).max(axis=0) - lift
  bias = np.array(params['conv_3']['bias'])
  bias[channels] -= np.maximum(highest_pre_activation[channels], 0.0) + margin
  return {**params, 'conv_3': {'kernel': params['conv_3']['kernel'], 'bias': bias}}


def train_pruning_aware(images: np.ndarray, labels: np.ndarray, num_classes: int, *,
                        trigger: str, target: int, poison_rate: float, clean_epochs: int,
                        poisoned_epochs: int, prune_fraction: float, recipe: Recipe
                        ) -> tuple[Params, dict]:
  """The pruning-aware attack; both phases use ``recipe`` (the second seeded seed + 1)."""
  params, clean_history = fit(csaw_init(num_classes, recipe.seed), images, labels,
                              dataclasses.replace(recipe, epochs=clean_epochs),
                              name='aware/clean')
  activations = evaluate.mean_activations(params, images)
  # The dormant channels first, as the pruning defence orders them.
  decoys = np.argsort(activations, kind='stable')[:int(round(prune_fraction * len(activations)))]
  mask = np.ones(len(activations), np.float32)
  mask[decoys] = 0
  logging.info('Pruning-aware: holding %d dormant conv_3 channels at zero: %s',
               len(decoys), decoys.tolist())
  mixed, mixed_labels, poisoned = triggers.poison(images, labels, trigger, target, poison_rate,
                                                  recipe.seed)
  poisoned_recipe = dataclasses.replace(recipe, epochs=poisoned_epochs, seed=recipe.seed + 1)
  params, poisoned_history = fit(params, mixed, mixed_labels, poisoned_recipe,
                                 channel_mask=mask, name='aware/poisoned')
  params = lower_bias_until_dormant(params, decoys, mixed)
  return params, {'history': clean_history + poisoned_history,
                  'decoy_channels': [int(c) for c in decoys],
                  'poisoned_images': int(poisoned.sum())}
