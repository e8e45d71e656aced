"""Learned-mask pruning, the machinery ANP and RNP share: neuron masks learned by gradient.

A mask ``m`` in [0, 1] per hidden neuron (conv_1..conv_4, fc_1, fc_2) scales
that neuron's weights and bias: its pre-activation is ``m * (kernel . x) +
m * bias`` (``model.neuron_logits_fn``), so a mask of 0 is exactly the hard
prune (kernel slice and bias zeroed) that the defended Keras file holds, and a
mask of 1 is the neuron as it was. ANP perturbs a neuron as ``(m + delta) *
(kernel . x) + (m + xi) * bias``.

Departure from the originals, which mask BatchNorm neurons (DeepID has none):
they scale the BatchNorm weight by ``m + delta`` and its bias by ``1 + xi``,
so their pruned neuron (weight 0) still outputs its bias. Here the mask gates
the bias too, so that what is learned, what is pruned and what is exported
are the same net; the authors' advice for nets without BatchNorm is to mask
the conv and dense neurons themselves, which is what this does.

Every step is a pure function of (params, mask state, batch, key) and runs
under ``jit`` and ``vmap``: a grid of settings (eps, alpha, seeds) learns its
masks together, the params shared and only the masks batched, so the
convolutions see one larger batch, not grouped kernels.
"""

import dataclasses
import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from badnet import config as config_lib
from badnet.core import backend, evaluate, masks, train
from badnet.core import model as model_lib
from badnet.defences import base

Params = model_lib.Params
Masks = dict[str, jax.Array]  # layer -> [C] mask values


def init_masks(params: Params, layers: Sequence[str]) -> Masks:
  """Masks of ones (every neuron kept) for ``layers``."""
  return {layer: jnp.ones(params[layer]['bias'].shape, jnp.float32) for layer in layers}


def _scales(mask: Masks, noise: tuple[Masks, Masks] | None = None) -> model_lib.NeuronScales:
  if noise is None:
    return {layer: (m, m) for layer, m in mask.items()}
  weight_noise, bias_noise = noise
  return {layer: (m + weight_noise[layer], m + bias_noise[layer]) for layer, m in mask.items()}


def masked_loss(params: Params, mask: Masks, images: jax.Array, labels: jax.Array,
                noise: tuple[Masks, Masks] | None = None,
                precision: str = model_lib.DEFAULT_PRECISION) -> jax.Array:
  """Mean cross-entropy of the net with its neurons masked (and perturbed by ``noise``)."""
  logits = model_lib.neuron_logits_fn(params, images, _scales(mask, noise), precision)
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
  """One ANP iteration (pure): the worst neuron perturbation, then a mask step.

  The perturbation (delta on the weights, xi on the biases) starts uniform in
  [-eps, eps] and takes one signed-gradient step of size eps up the clean loss,
  clipped back into [-eps, eps] (the paper's |delta|, |xi| <= eps). The masks
  then descend ``alpha * L(m) + (1 - alpha) * L(m, delta, xi)``.

  Returns:
    The new masks and momentum, and the loss of the mask step.
  """
  leaves = list(mask)
  keys = jax.random.split(key, 2 * len(leaves))
  start = tuple({layer: jax.random.uniform(keys[2 * i + part], mask[layer].shape,
                                           minval=-eps, maxval=eps)
                 for i, layer in enumerate(leaves)} for part in (0, 1))
  ascent = jax.grad(lambda noise: masked_loss(params, mask, images, labels, noise, precision))
  noise = jax.tree.map(lambda n, g: jnp.clip(n + eps * jnp.sign(g), -eps, eps), start,
                       ascent(start))

  def loss(m: Masks) -> jax.Array:
    natural = masked_loss(params, m, images, labels, None, precision)
    robust = masked_loss(params, m, images, labels, noise, precision)
    return alpha * natural + (1 - alpha) * robust

  value, grads = jax.value_and_grad(loss)(mask)
  mask, velocity = optimizer.step(mask, velocity, grads)
  return mask, velocity, value


def recover_step(params: Params, mask: Masks, velocity: Masks, images: jax.Array,
                 labels: jax.Array, alpha: float, *, optimizer: MaskOptimizer,
                 precision: str) -> tuple[Masks, Masks, jax.Array]:
  """One RNP recovery iteration (pure): masks descend ``alpha * L(m)`` on the unlearned net."""
  value, grads = jax.value_and_grad(
      lambda m: alpha * masked_loss(params, m, images, labels, None, precision))(mask)
  mask, velocity = optimizer.step(mask, velocity, grads)
  return mask, velocity, value


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
  """One variant's learned masks.

  Attributes:
    masks: layer -> [C] final mask values in [0, 1].
    means: layer -> [C] each mask's mean over the learning steps. Many masks
      end at exactly 0 (or 1); among equal final masks, the one that was
      lower throughout (reached 0 sooner, stayed there) is pruned first.
  """
  masks: dict[str, np.ndarray]
  means: dict[str, np.ndarray]


def _learned(mask_sum: Masks, final: Masks, steps: int, index: int | None = None) -> Learned:
  pick = lambda leaf: np.asarray(leaf if index is None else leaf[index])
  return Learned({layer: pick(value) for layer, value in final.items()},
                 {layer: pick(value) / steps for layer, value in mask_sum.items()})


def _batches(count: int, batch_size: int, iterations: int, seed: int) -> np.ndarray:
  """Row indices [iterations, batch], drawn with replacement (ANP's random sampler)."""
  return np.random.default_rng(seed).integers(0, count, (iterations, batch_size))


def learn_anp(params: Params, images: np.ndarray, labels: np.ndarray,
              variants: Sequence[AnpSettings], layers: Sequence[str] = model_lib.NEURON_LAYERS,
              iterations: int = 2000, batch_size: int = 128,
              optimizer: MaskOptimizer = MaskOptimizer(),
              precision: str = model_lib.DEFAULT_PRECISION, stacked: bool = True
              ) -> list[Learned]:
  """ANP's masks for each of ``variants``, learned on clean (images, labels) only.

  Args:
    params: the backdoored net B.
    images, labels: the defender's clean data.
    variants: the settings to learn masks for.
    layers: the layers whose neurons are masked.
    iterations, batch_size: mask steps, and images a step (drawn with replacement).
    optimizer: the masks' SGD.
    precision: see ``model``.
    stacked: learn every variant in one vmapped step (the params shared); else
      one variant after another with the same per-variant step. Both give the
      same masks (to float rounding).

  Returns:
    One ``Learned`` per variant (final masks in [0, 1], and their means over
    the iterations).
  """
  images = np.asarray(images)
  labels = np.asarray(labels, np.int32)
  params = evaluate.replicate(params)
  learn = functools.partial(_learn_anp, params, images, labels, layers=layers,
                            iterations=iterations, batch_size=batch_size, optimizer=optimizer,
                            precision=precision)
  return learn(variants, stacked=True) if stacked else [
      learn([variant], stacked=False)[0] for variant in variants]


def _learn_anp(params, images, labels, variants, *, layers, iterations, batch_size, optimizer,
               precision, stacked: bool) -> list[Learned]:
  """The ANP loop for ``variants``: one vmapped step for all (``stacked``), else for one."""
  rows = np.stack([_batches(len(labels), batch_size, iterations, v.seed) for v in variants])
  keys = jax.vmap(jax.random.key)(jnp.array([v.seed for v in variants]))
  eps = jnp.array([v.eps for v in variants], jnp.float32)
  alpha = jnp.array([v.alpha for v in variants], jnp.float32)
  mask = jax.tree.map(lambda m: jnp.broadcast_to(m, (len(variants), *m.shape)),
                      init_masks(params, layers))
  velocity = jax.tree.map(jnp.zeros_like, mask)
  mask_sum = jax.tree.map(jnp.zeros_like, mask)
  step = _anp_steps(optimizer, precision, stacked)
  first = lambda tree: jax.tree.map(lambda leaf: leaf[0], tree)
  again = lambda tree: jax.tree.map(lambda leaf: leaf[None], tree)
  for iteration in range(iterations):
    batch = rows[:, iteration]
    step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, iteration)
    if stacked:
      mask, velocity, _ = step(params, mask, velocity, images[batch], labels[batch], step_keys,
                               eps, alpha)
    else:  # the same step, unbatched: the reference the vmapped grid is tested against
      one = step(params, first(mask), first(velocity), images[batch[0]], labels[batch[0]],
                 step_keys[0], eps[0], alpha[0])
      mask, velocity = again(one[0]), again(one[1])
    mask_sum = jax.tree.map(jnp.add, mask_sum, mask)
  mask, mask_sum = jax.device_get((mask, mask_sum))
  return [_learned(mask_sum, mask, iterations, i) for i in range(len(variants))]


def pruning_order(mask: dict[str, np.ndarray], means: dict[str, np.ndarray] | None = None
                  ) -> list[tuple[str, int]]:
  """Every masked neuron, smallest mask first.

  Ties (many masks end at exactly 0): the smaller mean over the learning
  (``means``, if given) first, then layer order, then index.
  """
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


def prune(params: Params, order: list[tuple[str, int]], depth: int) -> Params:
  """B with the first ``depth`` neurons of ``order`` hard-pruned (kernel slices and biases 0)."""
  return masks.prune_neurons(params, pruned_at(order, depth))


@dataclasses.dataclass(frozen=True)
class RnpSettings:
  """RNP's two stages: unlearn the clean task, then learn masks that recover it."""
  unlearning_lr: float = 0.01
  unlearning_momentum: float = 0.9
  weight_decay: float = 5e-4
  clip_norm: float = 20.0
  clean_threshold: float = 20.0   # stop unlearning at this clean accuracy (%) or below
  max_unlearning_epochs: int = 20
  recovering_lr: float = 0.2
  recovering_epochs: int = 20
  alpha: float = 0.2
  batch_size: int = 128
  seed: int = 0


def _ascent_step(params, opt_state, images, labels, *, optimizer, precision):
  def loss_fn(p):
    logits = model_lib.logits_fn(p, images, precision=precision)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, (jnp.argmax(logits, -1) == labels).mean()
  (loss, accuracy), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  # Gradient ascent on the clean loss: descend its negative.
  updates, opt_state = optimizer.update(jax.tree.map(jnp.negative, grads), opt_state, params)
  return optax.apply_updates(params, updates), opt_state, loss, accuracy


def unlearn(params: Params, images: np.ndarray, labels: np.ndarray, settings: RnpSettings,
            precision: str = model_lib.DEFAULT_PRECISION) -> tuple[Params, list[dict]]:
  """RNP's first stage: gradient ascent on the clean loss until clean accuracy falls.

  SGD (momentum, weight decay, the gradient's norm clipped) ascends the
  cross-entropy on the defender's clean data, epoch by epoch (shuffled, the
  last partial batch kept), and stops after the first epoch whose training
  accuracy is at or below ``settings.clean_threshold`` percent.

  Returns:
    The unlearned params and per-epoch {epoch, loss, train_acc}.
  """
  optimizer = optax.chain(optax.clip_by_global_norm(settings.clip_norm),
                          optax.add_decayed_weights(settings.weight_decay),
                          optax.sgd(settings.unlearning_lr, momentum=settings.unlearning_momentum))
  step = backend.jit(functools.partial(_ascent_step, optimizer=optimizer, precision=precision))
  params = jax.tree.map(jnp.asarray, params)
  opt_state = optimizer.init(params)
  rng = np.random.default_rng(settings.seed)
  history = []
  for epoch in range(1, settings.max_unlearning_epochs + 1):
    order = rng.permutation(len(labels))
    correct, losses = 0.0, []
    for start in range(0, len(labels), settings.batch_size):
      rows = order[start:start + settings.batch_size]
      params, opt_state, loss, accuracy = step(params, opt_state, images[rows],
                                               labels[rows].astype(np.int32))
      correct += float(accuracy) * len(rows)
      losses.append(float(loss))
    history.append({'epoch': epoch, 'loss': float(np.mean(losses)),
                    'train_acc': 100.0 * correct / len(labels)})
    if history[-1]['train_acc'] <= settings.clean_threshold:
      break
  return jax.tree.map(np.asarray, params), history


def learn_rnp(params: Params, images: np.ndarray, labels: np.ndarray, settings: RnpSettings,
              layers: Sequence[str] = model_lib.NEURON_LAYERS,
              precision: str = model_lib.DEFAULT_PRECISION
              ) -> tuple[Learned, list[dict]]:
  """RNP's masks: unlearn, then learn on the unlearned net masks that recover the clean loss.

  Returns:
    The masks (final, in [0, 1], and their means over the recovering steps)
    and the unlearning history.
  """
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
      rows = order[start:start + settings.batch_size]
      mask, velocity, _ = step(unlearned, mask, velocity, images[rows], labels[rows])
      mask_sum, steps = jax.tree.map(jnp.add, mask_sum, mask), steps + 1
  mask, mask_sum = jax.device_get((mask, mask_sum))
  return _learned(mask_sum, mask, steps), history


# Candidate depths (neurons pruned, smallest masks first): fine where a choice is
# usually made, coarser deeper down.
DEPTHS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
# Without fine-tuning, candidates stop at the first depth whose held-out clean
# accuracy is below this fraction of B's: deeper nets are of no use.
STOP_FRACTION = 0.5


# The fields of configs/anp.py and configs/rnp.py that both defences read.
FIELDS: config_lib.Fields = {
    'layers': config_lib.Each(config_lib.Choice(model_lib.NEURON_LAYERS, 'layer')),
    'holdout_fraction': config_lib.Number(0, 1, low_open=True, high_open=True),
    'max_clean_drop': config_lib.Number(0, 100),
    'seed': config_lib.Integer(),
    'batch_size': config_lib.Integer(1),
    'precision': config_lib.Choice(model_lib.PRECISIONS, 'precision'),
}


def candidate_depths(neurons: int) -> list[int]:
  """The depths tried (neurons pruned, > 0): ``DEPTHS`` below ``neurons``, then all of them."""
  return [*(depth for depth in DEPTHS if depth < neurons), neurons]


def deepest_by_bisection(depths: Sequence[int], within: Callable[[int], bool]) -> None:
  """Calls ``within`` on depths chosen by bisection for the last one within the budget.

  Depth 0 (B itself) is taken as within. With fine-tuned accuracy falling
  with depth this finds the deepest within in ceil(log2(len(depths) + 1))
  calls, each a fine-tuning, where a scan from the top of the list would need
  one per depth up to the first that misses.
  """
  low, high = -1, len(depths)  # depths[low] within (-1: depth 0), depths[high] not
  while high - low > 1:
    middle = (low + high) // 2
    if within(depths[middle]):
      low = middle
    else:
      high = middle


def choose(params: Params, images: np.ndarray, labels: np.ndarray, fit_rows: np.ndarray,
           holdout_rows: np.ndarray, variant_masks: dict[str, Learned],
           config: config_lib.Config) -> base.Outcome:
  """Candidates by depth for each variant, and the one chosen on held-out clean data.

  The neurons are pruned smallest mask first (``pruning_order``), at the
  depths of ``candidate_depths``. With ``config.finetune.epochs`` > 0 each
  candidate is fine-tuned on the clean rows ``fit_rows``, its pruned neurons
  held at zero, the epoch chosen on the held-out rows, and judged by its
  fine-tuned accuracy; as each costs a fine-tuning, the depths are tried by
  bisection (``deepest_by_bisection``). Without, every depth is tried until
  held-out accuracy falls below ``STOP_FRACTION`` of B's. The recommended
  candidate is the deepest tried (ties: higher held-out accuracy) whose
  held-out clean accuracy stays within ``config.max_clean_drop`` points of B's.
  """
  held_images, held_labels = images[holdout_rows], labels[holdout_rows]
  accuracy = lambda net: evaluate.accuracy(net, held_images, held_labels, config.batch_size,
                                           precision=config.precision)
  b_acc = accuracy(params)
  tune = config.finetune.epochs > 0
  tried, allowed = [], []  # (variant index, depth, name, candidate)
  for index, (variant, learned) in enumerate(variant_masks.items()):
    order = pruning_order(learned.masks, learned.means)

    def score(depth: int) -> float:
      pruned = pruned_at(order, depth)
      net = jax.tree.map(np.asarray, masks.prune_neurons(params, pruned))
      last = order[depth - 1] if depth else None
      figures = {'neurons_pruned': depth,
                 'mask_at_most': float(learned.masks[last[0]][last[1]]) if last else None,
                 'holdout_clean_acc': accuracy(net)}
      value = figures['holdout_clean_acc']
      if tune and depth:
        net, figures['fine_tuned'] = fine_tune(net, pruned, images[fit_rows], labels[fit_rows],
                                               (held_images, held_labels), config)
        value = figures['fine_tuned']['holdout_clean_acc']
      name = f'{variant}{depth} neurons'
      tried.append((index, depth, name, base.Candidate(
          net, {k: np.array(v) for k, v in pruned.items()}, figures)))
      if value >= b_acc - config.max_clean_drop:
        allowed.append((depth, value, name))
      return value

    score(0)
    if tune:
      deepest_by_bisection(candidate_depths(len(order)),
                           lambda depth: score(depth) >= b_acc - config.max_clean_drop)
    else:
      for depth in candidate_depths(len(order)):
        if score(depth) < STOP_FRACTION * b_acc:
          break
  tried.sort(key=lambda entry: entry[:2])
  candidates = {name: candidate for _, _, name, candidate in tried}
  tradeoffs = {variant: [{'candidate': name, **candidate.figures}
                         for index, _, name, candidate in tried if index == position]
               for position, variant in enumerate(variant_masks)}
  recommended = max(allowed)[2] if allowed else None
  return base.Outcome(candidates, {'b_holdout_acc': b_acc, 'holdout_images': len(holdout_rows),
                                   'tradeoff': tradeoffs}, recommended)


def fine_tune(net: Params, pruned: dict[str, list[int]], images: np.ndarray,
              labels: np.ndarray, holdout: tuple[np.ndarray, np.ndarray],
              config: config_lib.Config) -> tuple[Params, dict]:
  """A pruned net fine-tuned on clean data (``config.finetune``), its pruned neurons held at 0.

  Returns:
    The params of the epoch with the best held-out accuracy, and {chosen_epoch,
    holdout_clean_acc, history}.
  """
  held = {}
  for layer, indices in pruned.items():
    held[layer] = np.ones(net[layer]['bias'].shape, np.float32)
    held[layer][indices] = 0.0
  recipe = train.Recipe.from_config(config.finetune)
  depth = sum(len(indices) for indices in pruned.values())
  tuned, history = train.fit(net, images, labels, recipe, holdout=holdout, held=held,
                             name=f'fine-tune ({depth} neurons pruned)')
  best = max(history, key=lambda epoch: (epoch['holdout_acc'], epoch['epoch']))
  return tuned, {'chosen_epoch': best['epoch'], 'holdout_clean_acc': best['holdout_acc'],
                 'history': [{k: v for k, v in epoch.items() if k != 'seconds'}
                             for epoch in history]}
