"""Training DeepID with optax, and the two attacks that plant a backdoor.

* BadNets (Gu et al.): a fraction of the training images get the trigger and
  the attacker's target label; the net is trained on the mix.
* The pruning-aware attack (Liu et al., Fine-Pruning, 2018): train on clean
  data; prune the conv_3 channels that are dormant on clean data; train the
  pruned net on poisoned data, so the backdoor has to live in the channels
  that clean inputs use too; then put the pruned channels back with their bias
  lowered so they stay dormant. A defender who prunes dormant channels first
  removes the decoys before anything that carries the backdoor.

Training runs a jitted step over the ``data`` mesh of evaluate.data_mesh()
(batch split across devices, params and optimizer state replicated) with a
fixed batch size, so it compiles once and runs unchanged on a CPU, a GPU or a
TPU host.
"""

import dataclasses
import functools
import sys
import time
from collections.abc import Callable

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from badnet import evaluate, model, prune, triggers

Params = model.Params


def csaw_init(num_classes: int, seed: int) -> Params:
  """Initial params as the CSAW Keras config has them: kernels ~ TruncatedNormal(0, 0.01), zero biases.

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


OPTIMIZERS = ('adam', 'adamw', 'sgd')
SCHEDULES = ('cosine', 'constant')


@dataclasses.dataclass(frozen=True)
class Recipe:
  """How to train: the optimiser, its schedule and the batches (hashable, so steps are cached).

  Attributes:
    optimizer: 'adam', 'adamw' (decoupled weight decay) or 'sgd' (momentum 0.9).
    learning_rate: the peak rate.
    schedule: 'cosine' (decay to 1 % of the peak over all steps) or 'constant'.
    warmup_epochs: epochs of linear warm-up from 0 to the peak (may be fractional).
    epochs: passes over the training images.
    batch_size: images per step over all devices; the last partial batch of
      each (seeded) shuffle is dropped so the step compiles once.
    weight_decay: adamw: decoupled decay; adam and sgd: an L2 term added to the
      gradient.
    seed: the shuffling seed.
  """
  optimizer: str = 'adam'
  learning_rate: float = 1e-3
  schedule: str = 'cosine'
  warmup_epochs: float = 0.0
  epochs: int = 10
  batch_size: int = 32
  weight_decay: float = 0.0
  seed: int = 0


def make_optimizer(recipe: Recipe, steps_per_epoch: int) -> optax.GradientTransformation:
  """The optax optimiser of ``recipe`` for ``steps_per_epoch`` steps in each epoch."""
  total = recipe.epochs * steps_per_epoch
  warmup = int(round(recipe.warmup_epochs * steps_per_epoch))
  peak = recipe.learning_rate
  if recipe.schedule == 'cosine' and warmup:
    rate = optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(total, warmup + 1),
                                              end_value=0.01 * peak)
  elif recipe.schedule == 'cosine':
    # To 1 % of the peak: the last epochs settle instead of jittering.
    rate = optax.cosine_decay_schedule(peak, total, alpha=0.01)
  elif recipe.schedule == 'constant':
    rate = optax.linear_schedule(0.0, peak, warmup) if warmup else peak
  else:
    raise ValueError(f'unknown schedule {recipe.schedule!r}; expected one of {SCHEDULES}')
  decay = recipe.weight_decay
  if recipe.optimizer == 'adamw':
    return optax.adamw(rate, weight_decay=decay)
  if recipe.optimizer == 'adam':
    base = optax.adam(rate)
  elif recipe.optimizer == 'sgd':
    base = optax.sgd(rate, momentum=0.9)
  else:
    raise ValueError(f'unknown optimizer {recipe.optimizer!r}; expected one of {OPTIMIZERS}')
  return optax.chain(optax.add_decayed_weights(decay), base) if decay else base


def loss_fn(params: Params, images: jax.Array, labels: jax.Array, channel_mask: jax.Array,
            layer: str = model.FEATURE_LAYER) -> tuple[jax.Array, jax.Array]:
  """Mean softmax cross-entropy and the batch accuracy, with ``layer``'s channels masked."""
  if layer == model.FEATURE_LAYER:
    logits = model.logits_fn(params, images, channel_mask)
  else:
    logits = model.resume_fn(params, model.observe_fn(params, images, layer), channel_mask, layer)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  return loss, (jnp.argmax(logits, -1) == labels).mean()


def train_step(params: Params, opt_state: optax.OptState, images: jax.Array,
               labels: jax.Array, channel_mask: jax.Array, *,
               optimizer: optax.GradientTransformation, hold_pruned_at_zero: bool = False,
               layer: str = model.FEATURE_LAYER
               ) -> tuple[Params, optax.OptState, jax.Array, jax.Array]:
  """One optimiser step (pure): new params and state, the loss and accuracy.

  With ``hold_pruned_at_zero`` the channels of ``layer`` (conv_3 by
  default) that ``channel_mask`` prunes are set to exactly zero (kernel slice and bias) after the update, so
  no optimiser (momentum, weight decay) can revive them: fine-pruning.
  Without it the mask only silences them in the forward pass, and their
  weights are left as they were (the pruning-aware attack's decoys).
  """
  (loss, accuracy), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      params, images, labels, channel_mask, layer)
  updates, opt_state = optimizer.update(grads, opt_state, params)
  params = optax.apply_updates(params, updates)
  if hold_pruned_at_zero:
    params = prune.prune(params, channel_mask, layer)
  return params, opt_state, loss, accuracy


@functools.cache
def _compiled_step(recipe: Recipe, steps_per_epoch: int, hold_pruned_at_zero: bool,
                   layer: str = model.FEATURE_LAYER
                   ) -> tuple[optax.GradientTransformation, Callable]:
  # One compilation per (recipe, shapes, layer): fine-tuning several masks reuses it.
  optimizer = make_optimizer(recipe, steps_per_epoch)
  step = functools.partial(train_step, optimizer=optimizer,
                           hold_pruned_at_zero=hold_pruned_at_zero, layer=layer)
  return optimizer, jax.jit(step, donate_argnums=(0, 1))


def _progress(epoch: int, epochs: int, step: int, steps: int, loss: float, prefix: str) -> None:
  """A one-line progress bar on stderr, redrawn in place on a terminal."""
  width = 24
  filled = int(width * step / steps)
  line = (f'{prefix}epoch {epoch}/{epochs} [{"#" * filled}{"." * (width - filled)}] '
          f'{step}/{steps} loss {loss:.4f}')
  if sys.stderr.isatty():
    print('\r' + line, end='' if step < steps else '\n', file=sys.stderr, flush=True)


def fit(params: Params, images: np.ndarray, labels: np.ndarray, recipe: Recipe, *,
        channel_mask: np.ndarray | None = None, hold_pruned_at_zero: bool = False,
        holdout: tuple[np.ndarray, np.ndarray] | None = None,
        name: str = 'train', layer: str = model.FEATURE_LAYER) -> tuple[Params, list[dict]]:
  """Trains ``params`` on (images, labels) with ``recipe``, jitted and sharded over the data mesh.

  Args:
    params: initial params (not modified).
    images: uint8 [N, 55, 47, 3] host images; labels: int [N].
    recipe: optimiser, schedule, epochs, batch size and shuffling seed.
    channel_mask: [C] conv_3 channels to hold out (0) of the forward pass.
    hold_pruned_at_zero: also keep the masked channels' conv_3 weights at
      exactly zero (fine-pruning; see ``train_step``).
    holdout: clean (images, labels) scored after every epoch; the params of
      the epoch with the best holdout accuracy are returned (ties: the later
      epoch, which trained longer).
    name: shown in the progress log.
    layer: the layer ``channel_mask`` applies to; other than conv_3 only with
      ``hold_pruned_at_zero`` (the pruned channels are then zero in the params).

  Returns:
    The trained params (numpy) and per-epoch stats (loss, train accuracy,
    seconds, and holdout accuracy if a holdout was given).
  """
  mesh = evaluate.data_mesh()
  batch_size = evaluate.global_batch_size(min(recipe.batch_size, len(labels)), mesh)
  rows, replicated = NamedSharding(mesh, P('data')), NamedSharding(mesh, P())
  steps = len(labels) // batch_size
  if layer != model.FEATURE_LAYER and not hold_pruned_at_zero:
    raise ValueError(f'a mask on {layer} needs hold_pruned_at_zero')
  optimizer, step = _compiled_step(recipe, steps, hold_pruned_at_zero, layer)
  mask = np.ones(model.num_channels(params, layer), np.float32) if channel_mask is None else (
      np.asarray(channel_mask, np.float32))
  if hold_pruned_at_zero:
    params = prune.prune(params, mask, layer)
  # Held-out scoring masks conv_3; another layer's pruned channels are zero in the params.
  holdout_mask = mask if layer == model.FEATURE_LAYER else None
  params = jax.device_put(jax.tree.map(jnp.array, params), replicated)
  opt_state = jax.device_put(optimizer.init(params), replicated)
  mask = jax.device_put(mask, replicated)
  rng = np.random.default_rng(recipe.seed)
  history, best, best_acc = [], None, -1.0
  for epoch in range(1, recipe.epochs + 1):
    start = time.perf_counter()
    order = rng.permutation(len(labels))
    losses, accuracies = [], []
    for index in range(steps):
      batch = order[index * batch_size:(index + 1) * batch_size]
      x, y = jax.device_put((images[batch], labels[batch].astype(np.int32)), rows)
      params, opt_state, loss, accuracy = step(params, opt_state, x, y, mask)
      losses.append(loss)
      accuracies.append(accuracy)
      if (index + 1) % 10 == 0 or index + 1 == steps:
        _progress(epoch, recipe.epochs, index + 1, steps, float(loss), f'{name}: ')
    stats = {'epoch': epoch, 'loss': float(np.mean(jax.device_get(losses))),
             'train_acc': 100 * float(np.mean(jax.device_get(accuracies)))}
    message = ''
    if holdout is not None:
      stats['holdout_acc'] = evaluate.accuracy(params, *holdout, channel_mask=holdout_mask)
      message = f', holdout acc {stats["holdout_acc"]:.2f} %'
      if stats['holdout_acc'] >= best_acc:
        best_acc, best = stats['holdout_acc'], jax.device_get(params)
    stats['seconds'] = time.perf_counter() - start
    history.append(stats)
    logging.info('%s: epoch %d/%d loss %.4f train acc %.2f %%%s (%.1f s)', name, epoch,
                 recipe.epochs, stats['loss'], stats['train_acc'], message, stats['seconds'])
  final = best if holdout is not None else jax.device_get(params)
  return jax.tree.map(np.asarray, final), history


def train_badnets(images: np.ndarray, labels: np.ndarray, num_classes: int, *, trigger: str,
                  target: int, poison_rate: float, recipe: Recipe) -> tuple[Params, dict]:
  """The BadNets attack: train from scratch on a poisoned mix of the training set.

  ``recipe.seed`` seeds the init, the poisoning and the shuffling.
  """
  seed = recipe.seed
  mixed, mixed_labels, poisoned = triggers.poison(images, labels, trigger, target, poison_rate, seed)
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
      lambda p, x: model.features_fn(p, x).max(axis=(1, 2)), lifted, (images,)).max(axis=0)
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
  activations = prune.mean_activations(params, images)
  decoys = prune.pruning_order(activations)[:int(round(prune_fraction * len(activations)))]
  mask = np.ones(len(activations), np.float32)
  mask[decoys] = 0
  logging.info('Pruning-aware: holding %d dormant conv_3 channels at zero: %s',
               len(decoys), decoys.tolist())
  mixed, mixed_labels, poisoned = triggers.poison(images, labels, trigger, target, poison_rate, seed)
  poisoned_recipe = dataclasses.replace(recipe, epochs=poisoned_epochs, seed=seed + 1)
  params, poisoned_history = fit(params, mixed, mixed_labels, poisoned_recipe,
                                 channel_mask=mask, name='aware/poisoned')
  params = lower_bias_until_dormant(params, decoys, mixed)
  return params, {'history': clean_history + poisoned_history,
                  'decoy_channels': [int(c) for c in decoys],
                  'poisoned_images': int(poisoned.sum())}
