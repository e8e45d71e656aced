"""Learned-mask pruning, the machinery ANP and RNP share: neuron masks learned by gradient.

A mask ``m`` in [0, 1] per conv neuron scales its weight product and leaves its bias
(``model.apply``'s neurons): the originals mask BatchNorm's gamma and leave beta, and DeepID has
no BatchNorm, so its weight product plays gamma and its bias beta. A pruned neuron has its kernel
slice zeroed and keeps its bias, exactly a mask of 0, so learned, pruned and exported nets agree.
Steps are pure, under ``jit`` and ``vmap``: a grid of settings learns its masks together.
"""

import dataclasses
import functools
import math
import pathlib
from collections.abc import Callable, Sequence
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax

from badnet import config as config_lib
from badnet.core import backend, evaluate, interrupts, masks, train
from badnet.core import model as model_lib
from badnet.defences import base
from badnet.errors import TrainingError
from badnet.io import keras_io, report as report_io

Params = model_lib.Params
Masks = dict[str, jax.Array]  # layer -> [C] mask values
REPORT_FILES = ('clean_test', 'poisoned_valid', 'poisoned_test')


def init_masks(params: Params, layers: Sequence[str]) -> Masks:
  """Masks of ones (every neuron kept) for ``layers``."""
  return {layer: jnp.ones(params[layer]['bias'].shape, jnp.float32) for layer in layers}


def _scales(mask: Masks, noise: tuple[Masks, Masks] | None = None) -> model_lib.NeuronScales:
  # ANP's NoisyBatchNorm2d: weight = gamma * (m + delta), bias = beta * (1 + xi)
  # (anp_batchnorm.py:77-82,88); unperturbed, beta * 1. RNP's MaskBatchNorm2d is the same.
  if noise is None:
    return {layer: (m, jnp.ones_like(m)) for layer, m in mask.items()}
  weight_noise, bias_noise = noise
  return {layer: (m + weight_noise[layer], 1 + bias_noise[layer]) for layer, m in mask.items()}


def masked_loss(params: Params, mask: Masks, images: jax.Array, labels: jax.Array,
                noise: tuple[Masks, Masks] | None = None,
                precision: str = model_lib.DEFAULT_PRECISION) -> jax.Array:
  """Mean cross-entropy of the net with its neurons masked (and perturbed by ``noise``)."""
  logits = model_lib.apply(params, images, neurons=_scales(mask, noise), precision=precision)
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


@dataclasses.dataclass(frozen=True)
class MaskOptimizer:
  """SGD with momentum on the masks, clipped to [0, 1] after each step (as ANP and RNP do)."""
  learning_rate: float = 0.2
  momentum: float = 0.9

  def init(self, mask: Masks) -> Masks:
    return jax.tree.map(jnp.zeros_like, mask)

  def step(self, mask: Masks, velocity: Masks, grads: Masks) -> tuple[Masks, Masks]:
    # PyTorch's SGD: v = momentum * v + g; p = p - lr * v.
    velocity = jax.tree.map(lambda v, g: self.momentum * v + g, velocity, grads)
    mask = jax.tree.map(lambda m, v: jnp.clip(m - self.learning_rate * v, 0.0, 1.0), mask,
                        velocity)
    return mask, velocity


def anp_step(params: Params, mask: Masks, velocity: Masks, images: jax.Array, labels: jax.Array,
             key: jax.Array, eps: jax.Array, alpha: jax.Array, *, optimizer: MaskOptimizer,
             precision: str) -> tuple[Masks, Masks, jax.Array]:
  """One ANP iteration (pure): the worst neuron perturbation, then a mask step. The noise (delta
  on the weight products, xi on the biases) starts uniform in [-eps, eps] and takes one
  signed-gradient step of size eps up the clean loss, unclipped as in the original (so within
  [-2 eps, 2 eps]); the masks then descend ``alpha * L(m) + (1 - alpha) * L(m, delta, xi)``."""
  keys = jax.random.split(key, 2 * len(mask))
  start = tuple({layer: jax.random.uniform(keys[2 * i + part], mask[layer].shape,
                                           minval=-eps, maxval=eps)
                 for i, layer in enumerate(mask)} for part in (0, 1))
  ascent = jax.grad(lambda noise: masked_loss(params, mask, images, labels, noise, precision))
  noise = jax.tree.map(lambda n, g: n + eps * jnp.sign(g), start, ascent(start))

  def loss(m: Masks) -> jax.Array:
    natural = masked_loss(params, m, images, labels, None, precision)
    robust = masked_loss(params, m, images, labels, noise, precision)
    return alpha * natural + (1 - alpha) * robust

  value, grads = jax.value_and_grad(loss)(mask)
  return (*optimizer.step(mask, velocity, grads), value)


def recover_step(params: Params, mask: Masks, velocity: Masks, images: jax.Array,
                 labels: jax.Array, alpha: float, *, optimizer: MaskOptimizer,
                 precision: str) -> tuple[Masks, Masks, jax.Array]:
  """One RNP recovery iteration (pure): masks descend ``alpha * L(m)`` on the unlearned net."""
  value, grads = jax.value_and_grad(
      lambda m: alpha * masked_loss(params, m, images, labels, None, precision))(mask)
  return (*optimizer.step(mask, velocity, grads), value)


@functools.cache
def _anp_steps(optimizer: MaskOptimizer, precision: str, stacked: bool):
  step = functools.partial(anp_step, optimizer=optimizer, precision=precision)
  if stacked:  # params shared; masks, momentum, batches, keys and settings per variant
    step = jax.vmap(step, in_axes=(None, 0, 0, 0, 0, 0, 0, 0))
  return backend.jit(step)


@dataclasses.dataclass(frozen=True)
class AnpSettings:
  """One ANP variant: perturbation budget, trade-off and the seed of its batches and noise."""
  eps: float = 0.4
  alpha: float = 0.2
  seed: int = 0


@dataclasses.dataclass(frozen=True)
class Learned:
  """One variant's masks, layer -> [C]: final values in [0, 1] (many exactly 0), and means over
  the steps, which order them (lower throughout, pruned first)."""
  masks: dict[str, np.ndarray]
  means: dict[str, np.ndarray]


def _learned(mask_sum: Masks, final: Masks, steps: int, index: int | None = None) -> Learned:
  pick = lambda leaf: np.asarray(leaf if index is None else leaf[index])
  return Learned({layer: pick(value) for layer, value in final.items()},
                 {layer: pick(value) / steps for layer, value in mask_sum.items()})


def learn_anp(params: Params, images: np.ndarray, labels: np.ndarray,
              variants: Sequence[AnpSettings], layers: Sequence[str] = model_lib.PRUNABLE_LAYERS,
              iterations: int = 2000, batch_size: int = 128,
              optimizer: MaskOptimizer = MaskOptimizer(),
              precision: str = model_lib.DEFAULT_PRECISION, stacked: bool = True) -> list[Learned]:
  """ANP's masks for each of ``variants``, learned on clean (images, labels) only. ``stacked``
  learns every variant in one vmapped step (the params shared), else one after another; both give
  the same masks to float rounding."""
  learn = functools.partial(_learn_anp, evaluate.replicate(params), np.asarray(images),
                            np.asarray(labels, np.int32), layers=layers, iterations=iterations,
                            batch_size=batch_size, optimizer=optimizer, precision=precision)
  return learn(variants, stacked=True) if stacked else [
      learn([variant], stacked=False)[0] for variant in variants]


def _learn_anp(params, images, labels, variants, *, layers, iterations, batch_size, optimizer,
               precision, stacked: bool) -> list[Learned]:
  """The ANP loop for ``variants``: one vmapped step for all (``stacked``), else for one."""
  # Row indices [variant, iteration, batch], drawn with replacement (ANP's random sampler).
  rows = np.stack([np.random.default_rng(v.seed).integers(0, len(labels), (iterations, batch_size))
                   for v in variants])
  keys = jax.vmap(jax.random.key)(jnp.array([v.seed for v in variants]))
  eps = jnp.array([v.eps for v in variants], jnp.float32)
  alpha = jnp.array([v.alpha for v in variants], jnp.float32)
  mask = init_masks(params, layers)
  if stacked:
    mask = jax.tree.map(lambda m: jnp.broadcast_to(m, (len(variants), *m.shape)), mask)
  velocity = mask_sum = jax.tree.map(jnp.zeros_like, mask)
  step = _anp_steps(optimizer, precision, stacked)
  for iteration in range(iterations):
    interrupts.check()
    batch = rows[:, iteration]
    step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, iteration)
    inputs = (images[batch], labels[batch], step_keys, eps, alpha)
    if not stacked:  # the same step, unbatched: the reference the vmapped grid is tested against
      inputs = jax.tree.map(lambda leaf: leaf[0], inputs)
    mask, velocity, _ = step(params, mask, velocity, *inputs)
    mask_sum = jax.tree.map(jnp.add, mask_sum, mask)
  mask, mask_sum = jax.device_get((mask, mask_sum))
  return [_learned(mask_sum, mask, iterations, i if stacked else None)
          for i in range(len(variants))]


def pruning_order(mask: dict[str, np.ndarray], means: dict[str, np.ndarray] | None = None
                  ) -> list[tuple[str, int]]:
  """Every masked neuron, smallest mask first; ties by ``means`` (if given), layer, index."""
  means = means or {layer: np.zeros(len(values)) for layer, values in mask.items()}
  entries = [(float(value), float(mean), index_of_layer, layer, int(neuron))
             for index_of_layer, (layer, values) in enumerate(mask.items())
             for neuron, (value, mean) in enumerate(zip(np.asarray(values),
                                                        np.asarray(means[layer]), strict=True))]
  return [(layer, neuron) for *_, layer, neuron in sorted(entries)]


def pruned_at(order: list[tuple[str, int]], depth: int) -> dict[str, list[int]]:
  """The neurons the first ``depth`` of ``order`` prune, by layer (sorted indices)."""
  pruned: dict[str, list[int]] = {}
  for layer, neuron in order[:depth]:
    pruned.setdefault(layer, []).append(neuron)
  return {layer: sorted(indices) for layer, indices in pruned.items()}


@dataclasses.dataclass(frozen=True)
class RnpSettings:
  """RNP's two stages: unlearn the clean task, then learn masks that recover it, with the
  original's values (bboylyg/RNP main.py; its epochs run 0..20, 21 at most) but one: its
  gradient clip (norm 20) is called before the backward pass, a no-op, where here it clips
  (``clip_norm``; 0: none), because DeepID's ascent on raw pixels, without BatchNorm, overflows
  to NaN within an epoch unclipped."""
  unlearning_lr: float = 0.01
  unlearning_momentum: float = 0.9
  weight_decay: float = 5e-4
  clip_norm: float = 20.0         # 0: no clipping
  unlearning_milestones: tuple[int, ...] = (10, 20)  # epochs after which the lr falls x0.1
  clean_threshold: float = 20.0   # stop unlearning at this clean accuracy (%) or below
  max_unlearning_epochs: int = 21
  recovering_lr: float = 0.2
  recovering_epochs: int = 20
  alpha: float = 0.2
  batch_size: int = 128
  seed: int = 0


def _ascent_step(params, opt_state, images, labels, *, optimizer, precision):
  def loss_fn(p):
    logits = model_lib.apply(p, images, precision=precision)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, (jnp.argmax(logits, -1) == labels).mean()
  (loss, accuracy), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  # Gradient ascent on the clean loss: descend its negative.
  updates, opt_state = optimizer.update(jax.tree.map(jnp.negative, grads), opt_state, params)
  return optax.apply_updates(params, updates), opt_state, loss, accuracy


def unlearning_optimizer(settings: RnpSettings, steps_per_epoch: int
                         ) -> optax.GradientTransformation:
  """RNP's unlearning SGD (of the negated gradient): PyTorch's weight decay and momentum, the
  rate x0.1 from the first step after each milestone epoch, the gradient clipped if asked."""
  rate = optax.piecewise_constant_schedule(settings.unlearning_lr, {
      int(epochs) * steps_per_epoch: 0.1
      for epochs in config_lib.values(settings.unlearning_milestones)})
  clip = [optax.clip_by_global_norm(settings.clip_norm)] if settings.clip_norm else []
  return optax.chain(*clip, optax.add_decayed_weights(settings.weight_decay),
                     optax.sgd(rate, momentum=settings.unlearning_momentum))


def unlearn(params: Params, images: np.ndarray, labels: np.ndarray, settings: RnpSettings,
            precision: str = model_lib.DEFAULT_PRECISION) -> tuple[Params, list[dict]]:
  """RNP's first stage: ascend the clean loss until training accuracy is <= ``clean_threshold`` %;
  the params and per-epoch {epoch, loss, train_acc}."""
  optimizer = unlearning_optimizer(settings, math.ceil(len(labels) / settings.batch_size))
  step = backend.jit(functools.partial(_ascent_step, optimizer=optimizer, precision=precision))
  params = jax.tree.map(jnp.asarray, params)
  opt_state = optimizer.init(params)
  rng = np.random.default_rng(settings.seed)
  history = []
  for epoch in range(1, settings.max_unlearning_epochs + 1):
    order = rng.permutation(len(labels))
    correct, losses = 0.0, []
    for start in range(0, len(labels), settings.batch_size):
      interrupts.check()
      rows = order[start:start + settings.batch_size]
      params, opt_state, loss, accuracy = step(params, opt_state, images[rows],
                                               labels[rows].astype(np.int32))
      correct += float(accuracy) * len(rows)
      losses.append(float(loss))
    history.append({'epoch': epoch, 'loss': float(np.mean(losses)),
                    'train_acc': 100.0 * correct / len(labels)})
    if not np.isfinite(history[-1]['loss']):
      raise TrainingError(f'rnp: unlearning diverged in epoch {epoch} (the loss is '
                          f'{history[-1]["loss"]}); clip its gradient (config.rnp.clip_norm) or '
                          f'lower config.rnp.unlearning_lr')
    if history[-1]['train_acc'] <= settings.clean_threshold:
      break
  return jax.tree.map(np.asarray, params), history


def learn_rnp(params: Params, images: np.ndarray, labels: np.ndarray, settings: RnpSettings,
              layers: Sequence[str] = model_lib.PRUNABLE_LAYERS,
              precision: str = model_lib.DEFAULT_PRECISION) -> tuple[Learned, list[dict]]:
  """RNP's masks, learned on the unlearned net to recover clean loss; the unlearning's history."""
  labels = np.asarray(labels, np.int32)
  unlearned, history = unlearn(params, images, labels, settings, precision)
  optimizer = MaskOptimizer(settings.recovering_lr, 0.9)
  step = backend.jit(functools.partial(recover_step, alpha=settings.alpha, optimizer=optimizer,
                                   precision=precision))
  unlearned = evaluate.replicate(unlearned)
  mask = init_masks(unlearned, layers)
  velocity = optimizer.init(mask)
  mask_sum, steps = jax.tree.map(jnp.zeros_like, mask), 0
  rng = np.random.default_rng([settings.seed, 1])
  for _ in range(settings.recovering_epochs):
    order = rng.permutation(len(labels))
    for start in range(0, len(labels), settings.batch_size):
      interrupts.check()
      rows = order[start:start + settings.batch_size]
      mask, velocity, _ = step(unlearned, mask, velocity, images[rows], labels[rows])
      mask_sum, steps = jax.tree.map(jnp.add, mask_sum, mask), steps + 1
  mask, mask_sum = jax.device_get((mask, mask_sum))
  return _learned(mask_sum, mask, steps), history


# Candidate depths (neurons pruned): fine where a choice is usually made, coarser deeper down.
DEPTHS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
# Without fine-tuning, stop below this fraction of B's held-out accuracy: deeper is of no use.
STOP_FRACTION = 0.5
SELECTIONS = ('threshold', 'holdout')
# The originals' report: every neuron with mask <= t pruned, t = 0, 0.05, ..., 0.9
# (ANP prune_neuron_cifar.py:31-33,83-92; RNP main.py:155-174).
THRESHOLDS = tuple(round(0.05 * step, 2) for step in range(19))


@dataclasses.dataclass(frozen=True)
class Common:
  """The settings ANP and RNP share (each defence's ``Settings`` adds its own).

  ``selection`` 'threshold' (published): prune every neuron whose mask is at most ``threshold``.
  'holdout' (ours): the deepest of ``DEPTHS`` whose held-out clean accuracy loses at most
  ``max_clean_drop`` points of B's, counted in whole held-out images. ``holdout_fraction`` of the
  clean split is held out either way (the masks never see it: it reports each candidate's clean
  accuracy). ``finetune`` (epochs 0, published: none) fine-tunes the chosen net ('threshold') or
  each candidate ('holdout') for a fixed number of epochs, its pruned neurons held at zero."""
  layers: tuple[str, ...] = model_lib.PRUNABLE_LAYERS
  selection: str = 'threshold'
  threshold: float = 0.2
  holdout_fraction: float = 0.2
  max_clean_drop: float = 3.0
  seed: int = 0
  finetune: base.Tuning = base.Tuning(epochs=0)

  FIELDS: ClassVar[config_lib.Fields] = {
      'layers': config_lib.Each(config_lib.Choice(model_lib.NEURON_LAYERS, 'layer')),
      'selection': config_lib.Choice(SELECTIONS, 'selection'),
      'threshold': config_lib.Number(0, 1),
      'holdout_fraction': config_lib.Number(0, 1, low_open=True, high_open=True),
      'max_clean_drop': config_lib.Number(0, 100),
      'seed': config_lib.Integer(),
  }


def method(name: str, settings: Common) -> str:
  """What ran, by name: the published rule, or the options that depart from it."""
  rule = (f'mask <= {settings.threshold:g}' if settings.selection == 'threshold' else
          f'depth on held-out clean data (at most {settings.max_clean_drop:g} points lost)')
  epochs = settings.finetune.epochs
  return f'{name.upper()}, {rule}' + (f', fine-tuned {epochs} epochs' if epochs else '')


def candidate_depths(neurons: int) -> list[int]:
  """The depths tried (neurons pruned, > 0): ``DEPTHS`` below ``neurons``, then all of them."""
  return [*(depth for depth in DEPTHS if depth < neurons), neurons]


def threshold_depths(mask: dict[str, np.ndarray], chosen: float) -> dict[float, int]:
  """Each of ``THRESHOLDS`` and ``chosen`` -> neurons with mask <= it; one threshold per depth
  (the smallest, or ``chosen``)."""
  values = np.concatenate([np.ravel(value) for value in mask.values()])
  by_depth: dict[int, float] = {}
  for threshold in sorted({*THRESHOLDS, chosen}):
    depth = int((values <= threshold).sum())
    if depth not in by_depth or threshold == chosen:
      by_depth[depth] = threshold
  return {threshold: depth for depth, threshold in sorted(by_depth.items())}


def deepest_by_bisection(depths: Sequence[int], within: Callable[[int], bool]) -> None:
  """Bisects ``depths`` for the deepest ``within`` the budget (depth 0 is): calls are costly."""
  low, high = -1, len(depths)  # depths[low] within (-1: depth 0), depths[high] not
  while high - low > 1:
    middle = (low + high) // 2
    if within(depths[middle]):
      low = middle
    else:
      high = middle


def choose(params: Params, clean: base.Clean, fit_rows: np.ndarray, holdout_rows: np.ndarray,
           variant_masks: dict[str, Learned], settings: Common) -> base.Outcome:
  """Candidates for each variant, and the one ``settings.selection`` picks on clean data.

  Neurons are pruned smallest mask first, their kernel slices zeroed and biases kept.
  'threshold': a candidate per threshold of ``THRESHOLDS`` (a report, as the originals'); the
  one at ``settings.threshold`` is chosen (a grid: the variant with the best held-out accuracy).
  'holdout': fine-tuned depths are tried by bisection, as each costs a fine-tuning; without,
  every depth until held-out accuracy is below ``STOP_FRACTION`` of B's; the deepest within the
  budget (ties: more accurate) is chosen. A fine-tuned candidate's figure is its last epoch's,
  never a maximum over epochs, so it can be compared with the budget."""
  fit = clean.images[fit_rows], clean.labels[fit_rows]
  held = clean.images[holdout_rows], clean.labels[holdout_rows]
  accuracy = lambda net: evaluate.accuracy(net, *held, clean.batch_size, precision=clean.precision)
  images = len(holdout_rows)
  b_acc = accuracy(params)
  within = lambda acc: base.within_budget(b_acc, acc, settings.max_clean_drop, images)
  by_threshold, tune = settings.selection == 'threshold', settings.finetune.epochs > 0
  tried, allowed_names = [], []  # (variant index, depth, name, candidate); (depth, value, name)
  for index, (variant, learned) in enumerate(variant_masks.items()):
    order = pruning_order(learned.masks, learned.means)

    def score(depth: int, mask_at_most: float | None, tuned: bool, name: str) -> float:
      pruned = pruned_at(order, depth)
      net = jax.tree.map(np.asarray, masks.prune_neurons(params, pruned, keep_bias=True))
      figures = {'neurons_pruned': depth, 'mask_at_most': mask_at_most,
                 'holdout_clean_acc': accuracy(net)}
      value = figures['holdout_clean_acc']
      if tuned and depth:
        net, figures['fine_tuned'] = fine_tune(net, pruned, *fit, held, settings.finetune)
        value = figures['fine_tuned']['holdout_clean_acc']
      tried.append((index, depth, name, base.Candidate(
          net, {k: np.array(v) for k, v in pruned.items()}, figures)))
      if by_threshold and mask_at_most == settings.threshold or (
          not by_threshold and within(value)):
        allowed_names.append((depth, value, name))
      return value

    def at_depth(depth: int) -> float:
      last = order[depth - 1] if depth else None
      return score(depth, float(learned.masks[last[0]][last[1]]) if last else None, tune,
                   f'{variant}{depth} neurons')

    if by_threshold:
      for threshold, depth in threshold_depths(learned.masks, settings.threshold).items():
        score(depth, threshold, tune and threshold == settings.threshold,
              f'{variant}mask<={threshold:g}')
    elif tune:
      at_depth(0)
      deepest_by_bisection(candidate_depths(len(order)),
                           lambda depth: within(at_depth(depth)))
    else:
      for depth in [0, *candidate_depths(len(order))]:
        if at_depth(depth) < STOP_FRACTION * b_acc:
          break
  tried.sort(key=lambda entry: entry[:2])
  candidates = {name: candidate for _, _, name, candidate in tried}
  tradeoffs = {variant: [{'candidate': name, **candidate.figures}
                         for index, _, name, candidate in tried if index == position]
               for position, variant in enumerate(variant_masks)}
  # 'threshold': one name per variant, the most accurate chosen; 'holdout': the deepest.
  key = (lambda entry: (entry[1], -entry[0])) if by_threshold else (lambda entry: entry[:2])
  chosen = max(allowed_names, key=key)[2] if allowed_names else None
  return base.Outcome(candidates, {'b_holdout_acc': b_acc, 'holdout_images': images,
                                   'allowed_images_lost': base.images_allowed(
                                       settings.max_clean_drop, images),
                                   'tradeoff': tradeoffs},
                      chosen)


def fine_tune(net: Params, pruned: dict[str, list[int]], images: np.ndarray,
              labels: np.ndarray, holdout: tuple[np.ndarray, np.ndarray],
              tuning: base.Tuning) -> tuple[Params, dict]:
  """A pruned net fine-tuned on clean data for ``tuning.epochs``, its pruned neurons' kernel
  slices held at 0; the last epoch's net and held-out figure (a fixed epoch count, not a best)."""
  held = {layer: np.ones(net[layer]['bias'].shape, np.float32) for layer in pruned}
  for layer, indices in pruned.items():
    held[layer][indices] = 0.0
  tuned, history = train.fit(net, images, labels, tuning.recipe(), holdout=holdout, held=held,
                             held_keep_bias=True, best_epoch=False,
                             name=f'fine-tune ({sum(map(len, pruned.values()))} neurons pruned)')
  return tuned, train.summary(history, 'holdout_clean_acc', best_epoch=False)


def defend(name: str, params: Params, clean: base.Clean, settings: Common,
           learn: Callable[[Params, np.ndarray, np.ndarray], tuple[dict[str, Learned], dict]]
           ) -> base.Outcome:
  """Masks by ``learn`` (the method's) on part of ``clean``; candidates scored on the rest."""
  fit_rows, holdout_rows = base.split_for_fine_tuning(clean.labels, settings.holdout_fraction,
                                                 settings.seed)
  variant_masks, extra = learn(params, clean.images[fit_rows], clean.labels[fit_rows])
  for variant, learned in variant_masks.items():
    if not all(np.isfinite(value).all() for value in learned.masks.values()):
      raise TrainingError(f'{name}: {variant or "the"} masks are not finite: the mask learning '
                          f'diverged; lower its learning rate (config.{name})')
  outcome = choose(params, clean, fit_rows, holdout_rows, variant_masks, settings)
  outcome.figures.update(defence=name, method=method(name, settings), masks=variant_masks,
                         **extra)
  return outcome


def report(outcome: base.Outcome, scorer, settings: Common, out: pathlib.Path | None) -> dict:
  """Every candidate, the chosen one and its GoodNet; writes defended.h5, masks.npz and plots."""
  clean = scorer.splits['clean_valid']
  b_classes = {key: scorer.b_classes(key) for key in REPORT_FILES}
  base_test, _ = scorer.figures(b_classes)
  name = outcome.figures['defence']
  results = {
      'base': {'valid': {'clean_acc': scorer.accuracy(scorer.params, clean.images, clean.labels),
                         'asr': scorer.percent(b_classes['poisoned_valid'], 'poisoned_valid')},
               'test': base_test},
      'method': outcome.figures['method'], 'selection': settings.selection,
      'threshold': settings.threshold, 'max_clean_drop': settings.max_clean_drop,
      **{key: outcome.figures[key] for key in ('b_holdout_acc', 'holdout_images',
                                               'allowed_images_lost')},
      'recommended': outcome.recommended, 'tradeoff': []}
  for candidate_name, candidate in outcome.candidates.items():
    classes = scorer.classes(candidate.params, REPORT_FILES)
    net, good = scorer.figures(classes)
    valid_asr = scorer.percent(classes['poisoned_valid'], 'poisoned_valid')
    results['tradeoff'].append({'candidate': candidate_name, **candidate.figures,
                                'test_clean_acc': net['clean_acc'], 'test_asr': net['asr'],
                                'valid_asr': valid_asr})
    if candidate_name == outcome.recommended:
      tuned = candidate.figures.get('fine_tuned')
      results['defended'] = {
          'candidate': candidate_name, 'neurons_pruned': candidate.figures['neurons_pruned'],
          'valid': {'clean_acc': (tuned or candidate.figures)['holdout_clean_acc'],
                    'asr': valid_asr},
          'test': net, 'fine_tuned': tuned}
      results['goodnet'] = {'test': good}
      results['pruned'] = {layer: [int(i) for i in indices]
                           for layer, indices in candidate.pruned.items()}
      results['model_file'] = 'models/defended.h5'
      if out is not None:
        keras_io.write_keras(out / results['model_file'], candidate.params, full_model=True)
  if 'unlearning' in outcome.figures:
    results['unlearning'] = outcome.figures['unlearning']
  results['masks_file'] = 'masks.npz'
  learned = outcome.figures['masks']
  if out is not None:
    variant_masks = {variant: found.masks for variant, found in learned.items()}
    report_io.write_masks(out / results['masks_file'], variant_masks,
                          {variant: found.means for variant, found in learned.items()})
    report_io.plot_mask_tradeoff(out / 'plots' / 'tradeoff.png', {**results, 'defence': name})
    report_io.plot_masks(out / 'plots' / 'masks.png', variant_masks, name.upper(),
                         settings.threshold)
  return results


def markdown(results: dict, printed: bool = False) -> str:
  return report_io.learned_mask_markdown(results)
