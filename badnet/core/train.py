"""Training DeepID with optax: recipes, the pure train step, and ``fit``: a jitted step over
``evaluate.data_mesh()`` (batch split, params and optimiser state replicated) with a fixed batch
size, so it compiles once, on any backend."""

import dataclasses
import functools
import sys
import time
from collections.abc import Callable, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm
from jax.sharding import NamedSharding, PartitionSpec as P

from badnet.core import backend, evaluate, interrupts, masks, model
from badnet.errors import DataError, TrainingError

Params = model.Params
OPTIMIZERS = ('adam', 'adamw', 'sgd')
SCHEDULES = ('cosine', 'constant')
STACKING = ('auto', 'vmap', 'loop')  # see stacks()


@dataclasses.dataclass(frozen=True)
class Recipe:
  """How to train: the optimiser, its schedule and the batches (hashable, so steps are cached)."""
  optimizer: str = 'adam'     # 'adam', 'adamw' or 'sgd' (momentum 0.9)
  learning_rate: float = 1e-3
  schedule: str = 'cosine'    # 'cosine' (from the peak learning_rate to 1 % of it) or 'constant'
  warmup_epochs: float = 0.0  # of linear warm-up from 0 to the peak (may be fractional)
  epochs: int = 10
  batch_size: int = 32        # over all devices; each shuffle's last partial batch is dropped
  weight_decay: float = 0.0   # decoupled for adamw; an L2 term in the gradient for adam and sgd
  erasing: float = 0.0        # each training image's chance of a random erasing, in each batch
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


# Random erasing (Zhong et al., AAAI 2020; torchvision's defaults): a box of 2-33 % of the
# image, aspect ratio 0.3-3.3 (log-uniform), filled with uniform noise over the pixel range.
ERASE_AREA = (0.02, 0.33)
ERASE_ASPECT = (0.3, 3.3)
_ERASE_TRIES = 10


def random_erasing(images: np.ndarray, rng: np.random.Generator, probability: float
                   ) -> np.ndarray:
  """A copy of ``images`` ([N, H, W, C] uint8) where each image, with ``probability``, has one
  box of noise; an image whose box does not fit in ``_ERASE_TRIES`` draws is left whole."""
  erased = images.copy()
  count, height, width, depth = images.shape
  for index in np.flatnonzero(rng.random(count) < probability):
    for _ in range(_ERASE_TRIES):
      area = rng.uniform(*ERASE_AREA) * height * width
      aspect = np.exp(rng.uniform(*np.log(ERASE_ASPECT)))
      box_height = int(round(np.sqrt(area * aspect)))
      box_width = int(round(np.sqrt(area / aspect)))
      if 0 < box_height <= height and 0 < box_width <= width:
        top = rng.integers(0, height - box_height + 1)
        left = rng.integers(0, width - box_width + 1)
        erased[index, top:top + box_height, left:left + box_width] = rng.integers(
            0, 256, (box_height, box_width, depth)).astype(images.dtype)
        break
  return erased


def loss_fn(params: Params, images: jax.Array, labels: jax.Array, channel_mask: jax.Array,
            layer: str = model.FEATURE_LAYER) -> tuple[jax.Array, jax.Array]:
  """Mean softmax cross-entropy and the batch accuracy, with ``layer``'s channels masked."""
  logits = model.apply(params, images, channel_mask, layer)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  return loss, (jnp.argmax(logits, -1) == labels).mean()


def train_step(params: Params, opt_state: optax.OptState, images: jax.Array, labels: jax.Array,
               channel_mask: jax.Array, held: dict[str, jax.Array] | None = None, *,
               optimizer: optax.GradientTransformation, layer: str = model.FEATURE_LAYER,
               held_keep_bias: bool = False
               ) -> tuple[Params, optax.OptState, jax.Array, jax.Array]:
  """One optimiser step (pure): new params and state, the loss and accuracy. ``channel_mask``
  silences ``layer``'s channels in the forward pass only (the pruning-aware attack's decoys keep
  their weights). ``held`` ({layer: 0/1 mask}, any hidden layers) zeroes those neurons' weights
  after the update, so momentum or weight decay cannot revive them: the one way a pruned net is
  trained (fine-pruning, learned-mask candidates); their biases too unless ``held_keep_bias``."""
  (loss, accuracy), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      params, images, labels, channel_mask, layer)
  updates, opt_state = optimizer.update(grads, opt_state, params)
  params = optax.apply_updates(params, updates)
  for held_layer, held_mask in (held or {}).items():  # any hidden layer, dense ones too
    params = {**params, held_layer: masks.prune_layer(params[held_layer], held_mask, held_layer,
                                                      held_keep_bias)}
  return params, opt_state, loss, accuracy


@functools.cache
def _compiled_step(recipe: Recipe, steps_per_epoch: int, layer: str = model.FEATURE_LAYER,
                   stacked: bool = False, held_keep_bias: bool = False
                   ) -> tuple[optax.GradientTransformation, Callable]:
  # One compilation per (recipe, shapes, layer): fine-tuning several masks reuses it.
  optimizer = make_optimizer(recipe, steps_per_epoch)
  step = functools.partial(train_step, optimizer=optimizer, layer=layer,
                           held_keep_bias=held_keep_bias)
  if stacked:  # nets stacked on a leading axis (params, state, masks); one batch for all
    step = jax.vmap(step, in_axes=(0, 0, None, None, 0, 0))
  return optimizer, backend.jit(step, donate_argnums=(0, 1))


def stacks(stacking: str) -> bool:
  """Whether ``fit_many`` trains its nets in one vmapped step: 'vmap' yes, 'loop' no. 'auto'
  stacks on a GPU or TPU, where one wide step keeps the chip busy, not on a CPU, where vmapped
  convolutions are slower than one net after another."""
  if stacking not in STACKING:
    raise ValueError(f'unknown stacking {stacking!r}; expected one of {", ".join(STACKING)}')
  return stacking == 'vmap' or (stacking == 'auto' and jax.default_backend() != 'cpu')


# Held-out accuracy at about chance and this many points below its start means
# training wrecked the net (a learning rate far too high for raw 0..255 pixels).
# One such epoch can be a dip; two in a row, or never climbing out, a collapse.
COLLAPSE_POINTS = 10.0
COLLAPSE_EPOCHS = 2
# Fewer held-out images cannot tell a collapse from a dip (at 100 an accuracy's standard error is
# at most sqrt(0.25 / 100) = 5 points, half COLLAPSE_POINTS): then only a non-finite loss stops.
COLLAPSE_HOLDOUT_IMAGES = 100


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
        channel_mask: np.ndarray | None = None,
        holdout: tuple[np.ndarray, np.ndarray] | None = None,
        name: str = 'train', layer: str = model.FEATURE_LAYER,
        held: dict[str, np.ndarray] | None = None, held_keep_bias: bool = False,
        best_epoch: bool = True) -> tuple[Params, list[dict]]:
  """Trains ``params`` on (images, labels) with ``recipe``: the params (numpy) and epoch stats.

  images: uint8 [N, 55, 47, 3]; channel_mask: [C], 0 where a channel of ``layer`` is held out of the
  forward pass; held, held_keep_bias: as in ``train_step``; holdout: clean (images, labels) scored
  each epoch, the best epoch's params returned (ties: the later) if ``best_epoch``, else the last
  epoch's (then the held-out figure is not a maximum, and can be compared with a budget).
  Raises TrainingError on a non-finite epoch loss, or held-out accuracy (of at least
  ``COLLAPSE_HOLDOUT_IMAGES`` images) ``collapsed`` for ``COLLAPSE_EPOCHS`` epochs in a row (or
  at the end)."""
  return fit_many([params], images, labels, recipe, channel_masks=[channel_mask],
                  holdout=holdout, names=[name], layer=layer, held=[held],
                  held_keep_bias=held_keep_bias, best_epoch=best_epoch, stacking='loop')[0]


def fit_many(params: Sequence[Params], images: np.ndarray, labels: np.ndarray, recipe: Recipe,
             *, channel_masks: Sequence[np.ndarray | None] | None = None,
             holdout: tuple[np.ndarray, np.ndarray] | None = None,
             names: Sequence[str] | None = None, layer: str = model.FEATURE_LAYER,
             held: Sequence[dict[str, np.ndarray] | None] | None = None,
             held_keep_bias: bool = False, best_epoch: bool = True,
             stacking: str = 'auto') -> list[tuple[Params, list[dict]]]:
  """``fit`` for several nets of the same shapes on the same batches; a (params, history) each.
  Net i starts from ``params[i]`` with ``channel_masks[i]`` and ``held[i]`` (the same layers for
  every net) and sees the batches ``fit`` would give it alone."""
  count = len(params)
  names = list(names) if names is not None else [f'train {i}' for i in range(count)]
  channel_masks = list(channel_masks) if channel_masks is not None else [None] * count
  held = list(held) if held is not None else [None] * count
  if not count or not len(names) == len(channel_masks) == len(held) == count:
    raise ValueError(f'fit_many: {count} nets, {len(names)} names, {len(channel_masks)} masks '
                     f'and {len(held)} held-mask sets; give one of each for every net')
  if not len(labels) or len(images) != len(labels):
    raise DataError(f'{names[0]}: {len(images)} training images and {len(labels)} labels; '
                    f'training needs at least one image and a label for each')
  stacked = stacks(stacking) and count > 1
  mesh = evaluate.data_mesh()
  batch_size = evaluate.global_batch_size(min(recipe.batch_size, len(labels)), mesh)
  rows, replicated = NamedSharding(mesh, P('data')), NamedSharding(mesh, P())
  steps = len(labels) // batch_size
  optimizer, step = _compiled_step(recipe, steps, layer, stacked, held_keep_bias)
  starts, masks_, held_ = zip(*[_start(p, m, h, layer, held_keep_bias)
                                for p, m, h in zip(params, channel_masks, held)])
  states = [jax.tree.map(jnp.array, net) for net in starts]
  stack = lambda trees: [jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)]
  # Stacked: one leading axis over the nets. Put once, not a host copy every step.
  weights, device_masks, device_held = jax.device_put(
      [stack(trees) if stacked else list(trees) for trees in (states, masks_, held_)], replicated)
  opt_states = jax.device_put([jax.vmap(optimizer.init)(w) if stacked else optimizer.init(w)
                               for w in weights], replicated)
  trackers = [_Tracker(name, recipe, holdout, layer, mask, net, best_epoch)
              for name, mask, net in zip(names, masks_, starts)]
  label = names[0] if count == 1 else f'{names[0]} (+{count - 1})'
  rng = np.random.default_rng(recipe.seed)
  # Its own stream, so a recipe without erasing shuffles exactly as before erasing existed.
  erase_rng = np.random.default_rng([recipe.seed, 1])
  for epoch in range(1, recipe.epochs + 1):
    start = time.perf_counter()
    order = rng.permutation(len(labels))
    losses, accuracies = [], []
    # Shown on a terminal only (logs get absl lines).
    with tqdm.tqdm(total=steps, desc=f'{label}: epoch {epoch}/{recipe.epochs}', unit='step',
                   leave=False, file=sys.stderr, disable=not sys.stderr.isatty()) as bar:
      for index in range(steps):
        interrupts.check()
        batch = order[index * batch_size:(index + 1) * batch_size]
        batch_images = images[batch]
        if recipe.erasing:
          batch_images = random_erasing(batch_images, erase_rng, recipe.erasing)
        x, y = jax.device_put((batch_images, labels[batch].astype(np.int32)), rows)
        for i, weight in enumerate(weights):  # one stacked step, or each net's in turn
          weights[i], opt_states[i], loss, accuracy = step(weight, opt_states[i], x, y,
                                                           device_masks[i], device_held[i])
          losses.append(loss)
          accuracies.append(accuracy)
        if not bar.disable and ((index + 1) % 10 == 0 or index + 1 == steps):
          bar.set_postfix(loss=f'{float(jnp.mean(losses[-1])):.4f}', refresh=False)
          bar.update(index + 1 - bar.n)
    # [steps, nets]: each net's loss and accuracy per step
    losses, accuracies = (np.asarray(jax.device_get(values)).reshape(steps, count)
                          for values in (losses, accuracies))
    seconds = (time.perf_counter() - start) / count
    for i, tracker in enumerate(trackers):
      net = jax.tree.map(lambda leaf, i=i: leaf[i], weights[0]) if stacked else weights[i]
      tracker.end_epoch(epoch, losses[:, i], accuracies[:, i], net, seconds)
  return [tracker.result() for tracker in trackers]


def _start(params: Params, channel_mask: np.ndarray | None, held: dict | None,
           layer: str, keep_bias: bool) -> tuple[Params, np.ndarray, dict | None]:
  """A net's starting params (pruned where held at zero), its mask and held masks (float32)."""
  mask = np.ones(model.num_channels(params, layer), np.float32) if channel_mask is None else (
      np.asarray(channel_mask, np.float32))
  held = None if held is None else {k: np.asarray(v, np.float32) for k, v in held.items()}
  for held_layer, held_mask in (held or {}).items():
    params = {**params, held_layer: masks.prune_layer(params[held_layer], held_mask, held_layer,
                                                      keep_bias)}
  return params, mask, held


def summary(history: list[dict], name: str = 'holdout_acc', best_epoch: bool = True) -> dict:
  """The epoch chosen on held-out accuracy (ties: the later; the last if not ``best_epoch``),
  its accuracy (as ``name``) and the history without timings (so results files are
  reproducible)."""
  best = max(history, key=lambda epoch: (epoch['holdout_acc'], epoch['epoch'])) if best_epoch else (
      history[-1])
  return {'chosen_epoch': best['epoch'], name: best['holdout_acc'],
          'history': [{k: v for k, v in epoch.items() if k != 'seconds'} for epoch in history]}


class _Tracker:
  """One net's epochs: its history, the best held-out epoch's params, and collapse checks."""

  def __init__(self, name: str, recipe: Recipe, holdout: tuple[np.ndarray, np.ndarray] | None,
               layer: str, mask: np.ndarray, params: Params, best_epoch: bool = True):
    self.name, self.recipe, self.holdout, self.layer, self.mask = name, recipe, holdout, layer, mask
    self.best_epoch = best_epoch
    self.history, self.best, self.best_acc, self.streak, self.last = [], None, -1.0, 0, None
    self.num_classes = model.num_classes_of(params)
    # Where held-out accuracy starts, so that an epoch that wrecks it is noticed.
    self.start_acc = None if holdout is None or len(holdout[1]) < COLLAPSE_HOLDOUT_IMAGES else (
        evaluate.accuracy(params, *holdout, channel_mask=mask, layer=layer))

  def end_epoch(self, epoch: int, losses: np.ndarray, accuracies: np.ndarray, params: Params,
                seconds: float) -> None:
    """Records an epoch (the net's params after it); raises TrainingError where it diverged."""
    recipe, self.last = self.recipe, params
    stats = {'epoch': epoch, 'loss': float(np.mean(losses)),
             'train_acc': 100 * float(np.mean(accuracies))}
    message = ''
    if self.holdout is not None:
      stats['holdout_acc'] = evaluate.accuracy(params, *self.holdout, channel_mask=self.mask,
                                               layer=self.layer)
      message = f', holdout acc {stats["holdout_acc"]:.2f} %'
      if stats['holdout_acc'] >= self.best_acc:
        self.best_acc = stats['holdout_acc']
        self.best = jax.device_get(params) if self.best_epoch else None
    stats['seconds'] = seconds
    self.history.append(stats)
    logging.info('%s: epoch %d/%d loss %.4f train acc %.2f %%%s (%.1f s)', self.name, epoch,
                 recipe.epochs, stats['loss'], stats['train_acc'], message, seconds)
    if not np.isfinite(stats['loss']):
      raise _diverged(self.name, epoch, recipe, f'the loss is {stats["loss"]}')
    if self.start_acc is not None:
      self.streak = self.streak + 1 if collapsed(stats['holdout_acc'], self.start_acc,
                                                 self.num_classes) else 0
      if self.streak >= COLLAPSE_EPOCHS or (
          epoch == recipe.epochs and collapsed(self.best_acc, self.start_acc, self.num_classes)):
        raise _diverged(self.name, epoch, recipe,
                        f'held-out clean accuracy fell from {self.start_acc:.2f} % to '
                        f'{stats["holdout_acc"]:.2f} %, chance level, for {self.streak} epoch'
                        f'{"s" if self.streak > 1 else ""}')

  def result(self) -> tuple[Params, list[dict]]:
    final = self.best if self.holdout is not None and self.best_epoch else (
        jax.device_get(self.last))
    return jax.tree.map(np.asarray, final), self.history
