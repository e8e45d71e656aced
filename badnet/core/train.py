"""Training DeepID with optax: recipes, the pure train step, and ``fit``.

Training runs a jitted step over the ``data`` mesh of evaluate.data_mesh()
(batch split across devices, params and optimizer state replicated) with a
fixed batch size, so it compiles once and runs unchanged on a CPU, a GPU or a
TPU host. The attacks that use it live in ``badnet.benchmark.attacks``.
"""

import dataclasses
import functools
import sys
import time
from collections.abc import Callable

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm
from jax.sharding import NamedSharding, PartitionSpec as P

from badnet.core import evaluate, masks, model
from badnet.errors import DataError, TrainingError

Params = model.Params


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

  @classmethod
  def from_config(cls, tune: ml_collections.ConfigDict, epochs: int | None = None) -> 'Recipe':
    """A config's ``finetune`` section as a Recipe (``epochs`` overrides ``tune.epochs``)."""
    return cls(optimizer=tune.optimizer, learning_rate=float(tune.learning_rate),
               schedule=tune.schedule, warmup_epochs=float(tune.warmup_epochs),
               epochs=tune.epochs if epochs is None else epochs, batch_size=tune.batch_size,
               weight_decay=float(tune.weight_decay), seed=tune.seed)


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
  logits = model.logits_fn(params, images, channel_mask, layer=layer)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  return loss, (jnp.argmax(logits, -1) == labels).mean()


def train_step(params: Params, opt_state: optax.OptState, images: jax.Array,
               labels: jax.Array, channel_mask: jax.Array,
               held: dict[str, jax.Array] | None = None, *,
               optimizer: optax.GradientTransformation, hold_pruned_at_zero: bool = False,
               layer: str = model.FEATURE_LAYER
               ) -> tuple[Params, optax.OptState, jax.Array, jax.Array]:
  """One optimiser step (pure): new params and state, the loss and accuracy.

  With ``hold_pruned_at_zero`` the channels of ``layer`` (conv_3 by
  default) that ``channel_mask`` prunes are set to exactly zero (kernel slice and bias)
  after the update, so no optimiser (momentum, weight decay) can revive them: fine-pruning.
  Without it the mask only silences them in the forward pass, and their
  weights are left as they were (the pruning-aware attack's decoys).
  ``held`` ({layer: 0/1 mask}) holds the neurons of several layers at zero the
  same way (a learned-mask defence's pruned net, fine-tuned).
  """
  (loss, accuracy), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      params, images, labels, channel_mask, layer)
  updates, opt_state = optimizer.update(grads, opt_state, params)
  params = optax.apply_updates(params, updates)
  if hold_pruned_at_zero:
    params = masks.prune(params, channel_mask, layer)
  for held_layer, held_mask in (held or {}).items():  # any hidden layer, dense ones too
    params = {**params, held_layer: masks.prune_layer(params[held_layer], held_mask, held_layer)}
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


def _progress_bar(name: str, epoch: int, epochs: int, steps: int) -> tqdm.tqdm:
  """An epoch's progress bar on stderr, shown on a terminal only (logs get absl lines)."""
  return tqdm.tqdm(total=steps, desc=f'{name}: epoch {epoch}/{epochs}', unit='step',
                   leave=False, file=sys.stderr, disable=not sys.stderr.isatty())


# Held-out accuracy at chance (at most twice chance plus a point) and this many
# points below where it started means training wrecked the net: a learning rate
# far too high for raw 0..255 pixels leaves a net that predicts one class or
# none. One such epoch can be a dip a net recovers from (a small, untrained-like
# net can); two in a row, or a run that never climbs out, is a collapse.
COLLAPSE_POINTS = 10.0
COLLAPSE_EPOCHS = 2


def collapsed(holdout_acc: float, start_acc: float, num_classes: int) -> bool:
  """Whether held-out accuracy fell from ``start_acc`` to about chance."""
  return (holdout_acc < start_acc - COLLAPSE_POINTS
          and holdout_acc <= 2 * 100.0 / num_classes + 1.0)


def _diverged(name: str, epoch: int, recipe: Recipe, why: str) -> TrainingError:
  return TrainingError(
      f'{name}: training diverged in epoch {epoch} of {recipe.epochs} ({why}) with '
      f'{recipe.optimizer} at learning rate {recipe.learning_rate:g}; stopped. Try a lower '
      f'learning rate (config.finetune.learning_rate for fine-tuning)')


def fit(params: Params, images: np.ndarray, labels: np.ndarray, recipe: Recipe, *,
        channel_mask: np.ndarray | None = None, hold_pruned_at_zero: bool = False,
        holdout: tuple[np.ndarray, np.ndarray] | None = None,
        name: str = 'train', layer: str = model.FEATURE_LAYER,
        held: dict[str, np.ndarray] | None = None) -> tuple[Params, list[dict]]:
  """Trains ``params`` on (images, labels) with ``recipe``, jitted and sharded over the data mesh.

  Args:
    params: initial params (not modified).
    images: uint8 [N, 55, 47, 3] host images; labels: int [N].
    recipe: optimiser, schedule, epochs, batch size and shuffling seed.
    channel_mask: [C] channels of ``layer`` to hold out (0) of the forward pass.
    hold_pruned_at_zero: also keep the masked channels' weights at exactly
      zero (fine-pruning; see ``train_step``).
    holdout: clean (images, labels) scored after every epoch; the params of
      the epoch with the best holdout accuracy are returned (ties: the later
      epoch, which trained longer).
    name: shown in the progress log.
    layer: the layer ``channel_mask`` applies to (conv_3 by default).
    held: {layer: 0/1 mask}: neurons of any layers held at exactly zero through
      training (see ``train_step``).

  Returns:
    The trained params (numpy) and per-epoch stats (loss, train accuracy,
    seconds, and holdout accuracy if a holdout was given).

  Raises:
    TrainingError: after an epoch whose mean loss is not finite, or the
      ``COLLAPSE_EPOCHS``-th epoch in a row whose held-out accuracy has
      ``collapsed`` to chance from where it started (or at the end, if no
      epoch climbed out): training stops, and the job with it.
  """
  if not len(labels) or len(images) != len(labels):
    raise DataError(f'{name}: {len(images)} training images and {len(labels)} labels; '
                    f'training needs at least one image and a label for each')
  mesh = evaluate.data_mesh()
  batch_size = evaluate.global_batch_size(min(recipe.batch_size, len(labels)), mesh)
  rows, replicated = NamedSharding(mesh, P('data')), NamedSharding(mesh, P())
  steps = len(labels) // batch_size
  optimizer, step = _compiled_step(recipe, steps, hold_pruned_at_zero, layer)
  mask = np.ones(model.num_channels(params, layer), np.float32) if channel_mask is None else (
      np.asarray(channel_mask, np.float32))
  if hold_pruned_at_zero:
    params = masks.prune(params, mask, layer)
  held = None if held is None else {k: np.asarray(v, np.float32) for k, v in held.items()}
  for held_layer, held_mask in (held or {}).items():
    params = {**params, held_layer: masks.prune_layer(params[held_layer], held_mask, held_layer)}
  params = jax.device_put(jax.tree.map(jnp.array, params), replicated)
  opt_state = jax.device_put(optimizer.init(params), replicated)
  mask = jax.device_put(mask, replicated)
  held = jax.device_put(held, replicated)  # once, not a host copy every step
  rng = np.random.default_rng(recipe.seed)
  history, best, best_acc = [], None, -1.0
  # Where held-out accuracy starts, so that an epoch that wrecks it is noticed.
  start_acc = None if holdout is None else evaluate.accuracy(
      params, *holdout, channel_mask=mask, layer=layer)
  num_classes, streak = model.num_classes_of(params), 0
  for epoch in range(1, recipe.epochs + 1):
    start = time.perf_counter()
    order = rng.permutation(len(labels))
    losses, accuracies = [], []
    with _progress_bar(name, epoch, recipe.epochs, steps) as bar:
      for index in range(steps):
        batch = order[index * batch_size:(index + 1) * batch_size]
        x, y = jax.device_put((images[batch], labels[batch].astype(np.int32)), rows)
        params, opt_state, loss, accuracy = step(params, opt_state, x, y, mask, held)
        losses.append(loss)
        accuracies.append(accuracy)
        if not bar.disable and ((index + 1) % 10 == 0 or index + 1 == steps):
          bar.set_postfix(loss=f'{float(loss):.4f}', refresh=False)
          bar.update(index + 1 - bar.n)
    stats = {'epoch': epoch, 'loss': float(np.mean(jax.device_get(losses))),
             'train_acc': 100 * float(np.mean(jax.device_get(accuracies)))}
    message = ''
    if holdout is not None:
      stats['holdout_acc'] = evaluate.accuracy(params, *holdout, channel_mask=mask,
                                               layer=layer)
      message = f', holdout acc {stats["holdout_acc"]:.2f} %'
      if stats['holdout_acc'] >= best_acc:
        best_acc, best = stats['holdout_acc'], jax.device_get(params)
    stats['seconds'] = time.perf_counter() - start
    history.append(stats)
    logging.info('%s: epoch %d/%d loss %.4f train acc %.2f %%%s (%.1f s)', name, epoch,
                 recipe.epochs, stats['loss'], stats['train_acc'], message, stats['seconds'])
    if not np.isfinite(stats['loss']):
      raise _diverged(name, epoch, recipe, f'the loss is {stats["loss"]}')
    if start_acc is not None:
      streak = streak + 1 if collapsed(stats['holdout_acc'], start_acc, num_classes) else 0
      if streak >= COLLAPSE_EPOCHS or (epoch == recipe.epochs
                                       and collapsed(best_acc, start_acc, num_classes)):
        raise _diverged(name, epoch, recipe,
                        f'held-out clean accuracy fell from {start_acc:.2f} % to '
                        f'{stats["holdout_acc"]:.2f} %, chance level, for {streak} epoch'
                        f'{"s" if streak > 1 else ""}')
  final = best if holdout is not None else jax.device_get(params)
  return jax.tree.map(np.asarray, final), history
