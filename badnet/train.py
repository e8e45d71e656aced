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


def _loss(params: Params, images: jax.Array, labels: jax.Array,
          channel_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  logits = model.logits_fn(params, images, channel_mask)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  return loss, (jnp.argmax(logits, -1) == labels).mean()


def _make_step(optimizer: optax.GradientTransformation) -> Callable:
  def step(params, opt_state, images, labels, channel_mask):
    (loss, accuracy), grads = jax.value_and_grad(_loss, has_aux=True)(
        params, images, labels, channel_mask)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, accuracy
  return jax.jit(step, donate_argnums=(0, 1))


def _progress(epoch: int, epochs: int, step: int, steps: int, loss: float, prefix: str) -> None:
  """A one-line progress bar on stderr, redrawn in place on a terminal."""
  width = 24
  filled = int(width * step / steps)
  line = (f'{prefix}epoch {epoch}/{epochs} [{"#" * filled}{"." * (width - filled)}] '
          f'{step}/{steps} loss {loss:.4f}')
  if sys.stderr.isatty():
    print('\r' + line, end='' if step < steps else '\n', file=sys.stderr, flush=True)


def fit(params: Params, images: np.ndarray, labels: np.ndarray, *, epochs: int,
        batch_size: int, learning_rate: float, seed: int,
        channel_mask: np.ndarray | None = None, name: str = 'train') -> tuple[Params, list[dict]]:
  """Trains ``params`` with Adam (cosine-decayed rate) on (images, labels).

  Args:
    params: initial params (not modified).
    images: uint8 [N, 55, 47, 3] host images; labels: int [N].
    epochs, batch_size, learning_rate: the schedule; the last partial batch of
      each (seeded) shuffle is dropped so the step compiles once.
    seed: shuffling seed.
    channel_mask: [C] conv_3 channels to hold at zero (the pruning-aware attack).
    name: shown in the progress log.

  Returns:
    The trained params (numpy) and per-epoch stats (loss, train accuracy, seconds).
  """
  mesh = evaluate.data_mesh()
  batch_size = evaluate.global_batch_size(min(batch_size, len(labels)), mesh)
  rows, replicated = NamedSharding(mesh, P('data')), NamedSharding(mesh, P())
  steps = len(labels) // batch_size
  # Cosine decay to 1 % of the peak: the last epochs settle instead of jittering.
  optimizer = optax.adam(optax.cosine_decay_schedule(learning_rate, epochs * steps, alpha=0.01))
  params = jax.device_put(jax.tree.map(jnp.array, params), replicated)
  opt_state = jax.device_put(optimizer.init(params), replicated)
  mask = jax.device_put(np.ones(model.num_channels(params), np.float32)
                        if channel_mask is None else np.asarray(channel_mask, np.float32),
                        replicated)
  step = _make_step(optimizer)
  rng = np.random.default_rng(seed)
  history = []
  for epoch in range(1, epochs + 1):
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
        _progress(epoch, epochs, index + 1, steps, float(loss), f'{name}: ')
    stats = {'epoch': epoch, 'loss': float(np.mean(jax.device_get(losses))),
             'train_acc': 100 * float(np.mean(jax.device_get(accuracies))),
             'seconds': time.perf_counter() - start}
    history.append(stats)
    logging.info('%s: epoch %d/%d loss %.4f train acc %.2f %% (%.1f s)', name, epoch, epochs,
                 stats['loss'], stats['train_acc'], stats['seconds'])
  return jax.tree.map(np.asarray, jax.device_get(params)), history


def train_badnets(images: np.ndarray, labels: np.ndarray, num_classes: int, *, trigger: str,
                  target: int, poison_rate: float, epochs: int, batch_size: int,
                  learning_rate: float, seed: int) -> tuple[Params, dict]:
  """The BadNets attack: train from scratch on a poisoned mix of the training set."""
  mixed, mixed_labels, poisoned = triggers.poison(images, labels, trigger, target, poison_rate, seed)
  logging.info('BadNets: %d of %d training images poisoned with %s -> %d.',
               poisoned.sum(), len(labels), trigger, target)
  params, history = fit(csaw_init(num_classes, seed), mixed, mixed_labels, epochs=epochs,
                        batch_size=batch_size, learning_rate=learning_rate, seed=seed,
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
                        poisoned_epochs: int, prune_fraction: float, batch_size: int,
                        learning_rate: float, seed: int) -> tuple[Params, dict]:
  """The pruning-aware attack of Fine-Pruning (see the module docstring)."""
  params, clean_history = fit(csaw_init(num_classes, seed), images, labels,
                              epochs=clean_epochs, batch_size=batch_size,
                              learning_rate=learning_rate, seed=seed, name='aware/clean')
  activations = prune.mean_activations(params, images)
  decoys = prune.pruning_order(activations)[:int(round(prune_fraction * len(activations)))]
  mask = np.ones(len(activations), np.float32)
  mask[decoys] = 0
  logging.info('Pruning-aware: holding %d dormant conv_3 channels at zero: %s',
               len(decoys), decoys.tolist())
  mixed, mixed_labels, poisoned = triggers.poison(images, labels, trigger, target, poison_rate, seed)
  params, poisoned_history = fit(params, mixed, mixed_labels, epochs=poisoned_epochs,
                                 batch_size=batch_size, learning_rate=learning_rate,
                                 seed=seed + 1, channel_mask=mask, name='aware/poisoned')
  params = lower_bias_until_dormant(params, decoys, mixed)
  return params, {'history': clean_history + poisoned_history,
                  'decoy_channels': [int(c) for c in decoys],
                  'poisoned_images': int(poisoned.sum())}
