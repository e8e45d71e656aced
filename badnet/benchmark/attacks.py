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


def fold_input_scale(params: Params, scale: float) -> Params:
  """The net that gives on pixels what ``params`` gives on pixels x ``scale`` (conv_1 is linear
  in its input, so the scale moves into its kernel)."""
  conv_1 = params['conv_1']
  return {**params, 'conv_1': {'kernel': np.asarray(conv_1['kernel'] * np.float32(scale),
                                                    np.float32), 'bias': conv_1['bias']}}


def _init(num_classes: int, seed: int, input_scale: float) -> Params:
  """``csaw_init`` for the net as trained (on pixels x ``input_scale``), as a raw-pixel net."""
  return fold_input_scale(csaw_init(num_classes, seed), input_scale)


def _fit(params: Params, images: np.ndarray, labels: np.ndarray, recipe: Recipe,
         input_scale: float, **kwargs) -> tuple[Params, list[dict]]:
  """``fit`` on pixels x ``input_scale``; ``params`` in and out are raw-pixel nets, so a net
  trained on scaled inputs ships, like the CSAW nets, taking 0..255 pixels."""
  if input_scale == 1.0:
    return fit(params, images, labels, recipe, **kwargs)
  scaled = images.astype(np.float32) * np.float32(input_scale)
  trained, history = fit(fold_input_scale(params, 1.0 / input_scale), scaled, labels, recipe,
                         **kwargs)
  return fold_input_scale(trained, input_scale), history


def train_clean(images: np.ndarray, labels: np.ndarray, num_classes: int, *,
                recipe: Recipe, input_scale: float = 1.0) -> tuple[Params, dict]:
  """A net trained as BadNets trains, on clean data only: the negative control."""
  params, history = _fit(_init(num_classes, recipe.seed, input_scale), images, labels, recipe,
                         input_scale, name='clean')
  return params, {'history': history, 'poisoned_images': 0}


def train_badnets(images: np.ndarray, labels: np.ndarray, num_classes: int, *, trigger: str,
                  target: int, poison_rate: float, recipe: Recipe, input_scale: float = 1.0
                  ) -> tuple[Params, dict]:
  """BadNets: train from scratch on a poisoned mix; ``recipe.seed`` seeds all randomness.
  ``input_scale``: train on pixels times it (1/255: inputs in [0, 1]), the net shipped raw."""
  mixed, mixed_labels, poisoned = triggers.poison(images, labels, trigger, target, poison_rate,
                                                  recipe.seed)
  logging.info('BadNets: %d of %d training images poisoned with %s -> %d.',
               poisoned.sum(), len(labels), trigger, target)
  params, history = _fit(_init(num_classes, recipe.seed, input_scale), mixed, mixed_labels,
                         recipe, input_scale, name='badnets')
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
                        poisoned_epochs: int, prune_fraction: float, recipe: Recipe,
                        input_scale: float = 1.0) -> tuple[Params, dict]:
  """The pruning-aware attack; both phases use ``recipe`` (the second seeded seed + 1)."""
  params, clean_history = _fit(_init(num_classes, recipe.seed, input_scale), images, labels,
                               dataclasses.replace(recipe, epochs=clean_epochs), input_scale,
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
  params, poisoned_history = _fit(params, mixed, mixed_labels, poisoned_recipe, input_scale,
                                  channel_mask=mask, name='aware/poisoned')
  params = lower_bias_until_dormant(params, decoys, mixed)
  return params, {'history': clean_history + poisoned_history,
                  'decoy_channels': [int(c) for c in decoys],
                  'poisoned_images': int(poisoned.sum())}
