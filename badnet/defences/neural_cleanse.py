"""Neural Cleanse (Wang et al., IEEE S&P 2019): reverse-engineered triggers, as a plug-in.

For every label t, Neural Cleanse asks for the smallest trigger that sends
clean images to t: a mask ``m`` ([55, 47], in [0, 1]) and a pattern ``p``
([55, 47, 3], pixels in [0, 255]) stamped as ``x' = (1 - m) * x + m * p``,
minimising ``CE(B(x'), t) + lambda * |m|_1``. A backdoor's target needs a much
smaller mask than any other label; the anomaly index of a label is how far
its mask's L1 norm lies below the median of all labels' norms, in units of
their median absolute deviation (x 1.4826, consistent with a normal
distribution's spread), and labels above ``ANOMALY_THRESHOLD`` (2) are
flagged. The mitigation (``unlearn``) fine-tunes B on clean data in which a
fraction of the images carry a flagged label's reversed trigger under their
own true label.

How it follows the authors' code (bolunwang/backdoor, ``visualizer.py``):

- The mask and the pattern live in tanh space (``m = tanh(u) / 2 + 0.5``,
  ``p = 255 (tanh(v) / 2 + 0.5)``), start uniform at random, and are trained
  by Adam (lr 0.1, betas 0.5 / 0.9) on the mean cross-entropy plus
  ``lambda * sum(m)``.
- A *step* is ``batches_per_step`` batches; its attack success and mask norm
  are the means over those batches, measured before each batch's update.
  lambda starts at 0, is set to ``init_cost`` (1e-3) after ``patience`` (5)
  steps in a row reach ``attack_threshold`` (99 %), and from then on is
  multiplied by ``cost_multiplier`` (2) after 5 successful steps in a row and
  divided by ``cost_multiplier ** 1.5`` after 5 failed ones.
- After a successful step whose mean norm beats the best so far, the mask
  and pattern are kept as the best. The run stops after ``steps`` steps, or
  early once lambda has gone both up and down and the best norm has not
  improved for ``early_stop_patience`` (25) steps. The result is the best
  trigger (the last one if no step succeeded).

Departures, each for a reason:

- Batches are drawn with replacement from a generator seeded by ``seed``
  and the step number (the original shuffles its data generator), so the
  same step gives every label the same images and a label's result depends
  only on (seed, label): the labels optimised together equal each label
  optimised alone (``tests/test_neural_cleanse.py``).
- The original's step is ~1000 images (31 batches of 32) and at most 1000
  steps; on a 2-core CPU that is hours per label. The job's defaults (see
  configs/neural_cleanse.py) take smaller steps and fewer of them; the
  schedule and its counters are the paper's, counted in these steps.
- The tanh-space start is clipped 1e-6 inside (-1, 1) in float32 (the
  original computes it in float64, where its epsilon keeps it finite).
- The loss is the paper's cross-entropy. The authors' code calls Keras'
  ``categorical_crossentropy(output, y_true)`` with its arguments swapped,
  which computes ``16.1 (1 - p_t)``, linear in the label's probability (and
  flat where it is near 0); ``loss='original_code'`` reproduces that.

The whole reverse engineering of one label is ``reverse_engineer``, a pure
function (a ``lax.while_loop`` of ``tick``, one batch's update and the
bookkeeping) that runs under ``jit`` and ``vmap``. ``reverse_engineer_labels``
runs the same ``tick`` vmapped over ``slots`` labels, the params and images
shared, so the net sees one batch of labels x images; it is driven from the
host, one call a batch, because XLA on a CPU runs convolutions inside a loop
at under half their speed (jax-ml/jax#12868). A label that is done keeps its
state, and the next label takes its slot, so no label waits for the slowest
of a chunk and every call has the same shapes (one compilation).
"""

import dataclasses
import functools
import math
import time
from collections.abc import Sequence
from typing import NamedTuple

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import optax

from badnet import config as config_lib
from badnet.core import backend, cache, evaluate, train
from badnet.core import model as model_lib
from badnet.defences import base, fine_pruning
from badnet.errors import ConfigError
from badnet.io import data

NAME = 'neural_cleanse'
Params = model_lib.Params
HEIGHT, WIDTH, COLORS = model_lib.IMAGE_SHAPE
ANOMALY_THRESHOLD = 2.0
# The MAD's consistency constant: 1.4826 MAD estimates a normal distribution's
# standard deviation.
MAD_SCALE = 1.4826
# The start in tanh space is arctanh(2 m - 1), clipped this far inside (-1, 1).
TANH_MARGIN = 1e-6
LOSSES = ('cross_entropy', 'original_code')


@dataclasses.dataclass(frozen=True)
class Settings:
  """The reverse engineering of one label (hashable: one compilation per settings).

  Defaults are the paper's (the authors' GTSRB example); the job's are smaller
  (configs/neural_cleanse.py).

  Attributes:
    steps: at most this many steps.
    batch_size: images a batch.
    batches_per_step: batches a step (the paper: 1000 images a step).
    learning_rate, beta_1, beta_2: Adam's, on the mask and pattern in tanh space.
    init_cost: lambda once the attack first succeeds.
    attack_threshold: a step succeeds when this fraction of its images reach the label.
    patience: steps in a row before lambda is set, raised or lowered.
    cost_multiplier: lambda's factor up (down: this ** 1.5).
    early_stop_patience: steps without a better norm before stopping (0: never stop early).
    early_stop_threshold: a norm is better if below this times the best.
    loss: one of LOSSES (see ``attack_loss``).
  """
  steps: int = 1000
  batch_size: int = 32
  batches_per_step: int = 31
  learning_rate: float = 0.1
  beta_1: float = 0.5
  beta_2: float = 0.9
  init_cost: float = 1e-3
  attack_threshold: float = 0.99
  patience: int = 5
  cost_multiplier: float = 2.0
  early_stop_patience: int = 25
  early_stop_threshold: float = 1.0
  loss: str = 'cross_entropy'

  def optimizer(self) -> optax.GradientTransformation:
    # Keras' Adam epsilon (K.epsilon()), as the original used.
    return optax.adam(self.learning_rate, b1=self.beta_1, b2=self.beta_2, eps=1e-7)


class Trigger(NamedTuple):
  """A reversed trigger (for a batch of labels, every field has a leading label axis).

  Attributes:
    mask: [55, 47] in [0, 1].
    pattern: [55, 47, 3] pixels in [0, 255].
    l1: the mask's L1 norm (its sum).
    found: whether some step reached the attack threshold (else the last trigger).
    steps: steps run.
    cost: lambda at the end.
  """
  mask: jax.Array
  pattern: jax.Array
  l1: jax.Array
  found: jax.Array
  steps: jax.Array
  cost: jax.Array


class _State(NamedTuple):
  """One label's optimisation state between batches."""
  theta: tuple[jax.Array, jax.Array]  # mask and pattern in tanh space
  opt: optax.OptState
  cost: jax.Array         # lambda
  batch: jax.Array        # batches done in this step
  hits: jax.Array         # this step's images sent to the label so far
  norms: jax.Array        # this step's sum of batch mask norms so far
  set_count: jax.Array    # successful steps in a row while lambda is 0
  up_count: jax.Array     # successful steps in a row
  down_count: jax.Array   # failed steps in a row
  went_up: jax.Array
  went_down: jax.Array
  best: tuple[jax.Array, jax.Array]  # best mask and pattern
  best_norm: jax.Array    # their step's mean mask norm (inf: none yet)
  stale: jax.Array        # steps without a better norm
  stale_norm: jax.Array   # the norm ``stale`` compares against
  step: jax.Array         # steps done
  stopped: jax.Array      # stopped early


def to_image_space(theta: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
  """Mask in [0, 1] and pattern in [0, 255] from their tanh-space values."""
  mask_tanh, pattern_tanh = theta
  return jnp.tanh(mask_tanh) / 2 + 0.5, (jnp.tanh(pattern_tanh) / 2 + 0.5) * 255.0


def stamp(images: jax.Array, mask: jax.Array, pattern: jax.Array) -> jax.Array:
  """``(1 - m) * x + m * p``: images [..., 55, 47, 3] with triggers (masks [..., 55, 47])."""
  mask = mask[..., None]
  return (1 - mask) * jnp.asarray(images, jnp.float32) + mask * pattern


def initial_trigger(seed: int | jax.Array, label: int | jax.Array
                    ) -> tuple[jax.Array, jax.Array]:
  """The random start of ``label``'s trigger in tanh space: uniform mask and pattern.

  It depends on (seed, label) only, so a label starts the same alone or with others.
  """
  mask_key, pattern_key = jax.random.split(
      jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), 1), label))
  mask = jax.random.uniform(mask_key, (HEIGHT, WIDTH))
  pattern = jax.random.uniform(pattern_key, (HEIGHT, WIDTH, COLORS))
  to_tanh = lambda unit: jnp.arctanh(jnp.clip(2 * unit - 1, -1 + TANH_MARGIN, 1 - TANH_MARGIN))
  return to_tanh(mask), to_tanh(pattern)


def batch_rows(seed: int | jax.Array, step: jax.Array, batch: jax.Array, count: int,
               batch_size: int) -> jax.Array:
  """The rows of batch ``batch`` of step ``step``, drawn from ``count`` images: every label's."""
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), 0), step)
  return jax.random.randint(jax.random.fold_in(key, batch), (batch_size,), 0, count)


def attack_loss(logits: jax.Array, label: int | jax.Array, kind: str = 'cross_entropy'
                ) -> jax.Array:
  """The mean loss of sending every row of ``logits`` to ``label`` (one of ``LOSSES``).

  'cross_entropy' is the paper's. 'original_code' is what the authors' Keras
  code computes: ``categorical_crossentropy(output, y_true)``, its arguments
  swapped, is ``-sum_j p_j log(clip(onehot_j, 1e-7, 1 - 1e-7))``, i.e.
  ``-log(1e-7) (1 - p_t) - log(1 - 1e-7) p_t``: linear in the label's probability.
  """
  targets = jnp.full(logits.shape[0], label)
  if kind == 'cross_entropy':
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
  probability = jnp.take_along_axis(jax.nn.softmax(logits), targets[:, None], axis=1)[:, 0]
  eps = 1e-7  # Keras' epsilon, in float64 as Keras computed the constant's log
  return -(math.log(eps) * (1 - probability) + math.log(1 - eps) * probability).mean()


def _loss(theta, params, images, label, cost, precision, kind):
  mask, pattern = to_image_space(theta)
  logits = model_lib.logits_fn(params, stamp(images, mask, pattern), precision=precision)
  norm = jnp.sum(mask)
  hits = jnp.sum(jnp.argmax(logits, -1) == label)
  return attack_loss(logits, label, kind) + cost * norm, (hits, norm)


def init_state(label: int | jax.Array, seed: int | jax.Array, settings: Settings) -> _State:
  """``label``'s state before its first batch (pure; vmap over labels)."""
  theta = initial_trigger(seed, label)
  zero, false, inf = jnp.int32(0), jnp.bool_(False), jnp.float32(jnp.inf)
  return _State(theta, settings.optimizer().init(theta), jnp.float32(0.0), zero, zero,
                jnp.float32(0.0), zero, zero, zero, false, false, to_image_space(theta), inf,
                zero, inf, zero, false)


def done(state: _State, settings: Settings) -> jax.Array:
  """Whether a label's optimisation has ended (its steps run, or stopped early)."""
  return state.stopped | (state.step >= settings.steps)


def tick(state: _State, params: Params, images: jax.Array, label: int | jax.Array,
         seed: int | jax.Array, settings: Settings,
         precision: str = model_lib.DEFAULT_PRECISION) -> _State:
  """One batch's Adam update, and after a step's last batch the paper's bookkeeping (pure).

  A label that is ``done`` keeps its state.
  """
  rows = batch_rows(seed, state.step, state.batch, images.shape[0], settings.batch_size)
  grads, (hits, norm) = jax.grad(_loss, has_aux=True)(state.theta, params, images[rows], label,
                                                      state.cost, precision, settings.loss)
  updates, opt = settings.optimizer().update(grads, state.opt, state.theta)
  moved = state._replace(theta=optax.apply_updates(state.theta, updates), opt=opt,
                         batch=state.batch + 1, hits=state.hits + hits,
                         norms=state.norms + norm)
  stepped = _end_of_step(moved, settings)
  new = jax.tree.map(lambda end, mid: jnp.where(moved.batch == settings.batches_per_step, end,
                                                mid), stepped, moved)
  return jax.tree.map(lambda old, now: jnp.where(done(state, settings), old, now), state, new)


def _end_of_step(state: _State, settings: Settings) -> _State:
  """The paper's bookkeeping after a step: the best trigger, early stopping, lambda."""
  success = state.hits / (settings.batches_per_step * settings.batch_size)
  norm = state.norms / settings.batches_per_step
  succeeded = success >= settings.attack_threshold

  # The best trigger: the one after a successful step with a lower mean norm.
  better = succeeded & (norm < state.best_norm)
  best = jax.tree.map(lambda new, old: jnp.where(better, new, old),
                      to_image_space(state.theta), state.best)
  best_norm = jnp.where(better, norm, state.best_norm)

  # Early stopping: count the steps whose best norm is no better than the best before.
  found = jnp.isfinite(best_norm)
  worse = best_norm >= settings.early_stop_threshold * state.stale_norm
  stale = jnp.where(found, jnp.where(worse, state.stale + 1, 0), state.stale)
  stopped = (settings.early_stop_patience > 0) & state.went_up & state.went_down & (
      stale >= settings.early_stop_patience)

  # lambda: set once the attack has succeeded `patience` steps in a row at 0 ...
  set_count = jnp.where((state.cost == 0) & succeeded, state.set_count + 1, 0)
  set_now = set_count >= settings.patience
  cost = jnp.where(set_now, settings.init_cost, state.cost)
  up_count = jnp.where(set_now, 0, state.up_count)
  down_count = jnp.where(set_now, 0, state.down_count)
  # ... then up after `patience` successes in a row, down after as many failures.
  up_count = jnp.where(succeeded, up_count + 1, 0)
  down_count = jnp.where(succeeded, 0, down_count + 1)
  up = up_count >= settings.patience
  down = ~up & (down_count >= settings.patience)
  cost = jnp.where(up, cost * settings.cost_multiplier,
                   jnp.where(down, cost / settings.cost_multiplier ** 1.5, cost))
  zero = jnp.zeros_like
  return state._replace(
      cost=jnp.where(stopped, state.cost, cost),  # the original stops before changing lambda
      batch=zero(state.batch), hits=zero(state.hits), norms=zero(state.norms),
      set_count=set_count, up_count=jnp.where(up, 0, up_count),
      down_count=jnp.where(down, 0, down_count),
      went_up=(state.went_up & ~set_now) | up, went_down=(state.went_down & ~set_now) | down,
      best=best, best_norm=best_norm, stale=stale,
      stale_norm=jnp.minimum(best_norm, state.stale_norm), step=state.step + 1,
      stopped=stopped)


def result(state: _State) -> Trigger:
  """The trigger a finished state holds: the best one, or the last if no step succeeded."""
  found = jnp.isfinite(state.best_norm)
  mask, pattern = jax.tree.map(lambda best, last: jnp.where(found, best, last), state.best,
                               to_image_space(state.theta))
  return Trigger(mask, pattern, jnp.sum(mask), found, state.step, state.cost)


def reverse_engineer(params: Params, images: jax.Array, label: int | jax.Array,
                     seed: int | jax.Array = 0, settings: Settings = Settings(),
                     precision: str = model_lib.DEFAULT_PRECISION) -> Trigger:
  """The smallest trigger that sends ``images`` to ``label`` (pure; jit and vmap over labels).

  A ``lax.while_loop`` of ``tick``. (On a CPU, XLA runs convolutions inside a
  loop at under half their speed, jax-ml/jax#12868, so
  ``reverse_engineer_labels`` drives the same ``tick`` from the host.)

  Args:
    params: the net B.
    images: clean images [N, 55, 47, 3] (uint8 or float32, 0..255) the batches
      are drawn from.
    label: the label to reverse engineer.
    seed: the batches' and the start's seed (with ``label``).
    settings: the optimisation (hashable; static under jit).
    precision: see ``model``.

  Returns:
    The trigger, its norm and how the run went.
  """
  one = functools.partial(tick, params=params, images=images, label=label, seed=seed,
                          settings=settings, precision=precision)
  return result(jax.lax.while_loop(lambda s: ~done(s, settings), one,
                                   init_state(label, seed, settings)))


@functools.cache
def _compiled(settings: Settings, precision: str):
  """The jitted tick, init and done over a slot axis (params, images and seed shared)."""
  ticks = jax.vmap(functools.partial(tick, settings=settings, precision=precision),
                   in_axes=(0, None, None, 0, None))
  inits = jax.vmap(functools.partial(init_state, settings=settings), in_axes=(0, None))
  finished = jax.vmap(functools.partial(done, settings=settings))
  jit = backend.jit
  return jit(ticks), jit(inits), jit(finished), jit(jax.vmap(result))


def reverse_engineer_labels(params: Params, images: np.ndarray, labels: Sequence[int],
                            seed: int = 0, settings: Settings = Settings(),
                            slots: int = 1, precision: str = model_lib.DEFAULT_PRECISION
                            ) -> dict[str, np.ndarray]:
  """Triggers for ``labels``, ``slots`` labels at a time in one vmapped optimisation.

  Each call of the jitted, vmapped ``tick`` advances every slot's label by
  one batch (slots x batch_size images through the net; on a 2-core CPU one
  slot is fastest, on an accelerator many). When a label is done its trigger
  is read and the next label takes its slot, so no label waits for the
  slowest of a chunk and every call has the same shapes (one compilation).
  Once no label is left, finished slots keep their state. A label's result
  depends only on (seed, label): it is what ``reverse_engineer`` gives for it
  alone, up to float rounding.

  Returns:
    Trigger's fields as numpy arrays, a leading axis over ``labels`` in their order.
  """
  labels = np.asarray(labels, np.int32)
  if not len(labels):
    raise ValueError('no labels to reverse engineer')
  ticks, inits, finished, results = _compiled(settings, precision)
  images = jax.device_put(np.asarray(images))
  params = jax.device_put(params)
  slots = min(slots, len(labels))
  slot_labels = labels[:slots].copy()
  slot_rows = np.arange(slots)  # which entry of ``labels`` each slot holds
  state = inits(jnp.asarray(slot_labels), seed)
  waiting = list(range(slots, len(labels)))
  outputs: dict[int, Trigger] = {}
  start, reported = time.perf_counter(), 0
  while len(outputs) < len(labels):
    state = ticks(state, params, images, jnp.asarray(slot_labels), seed)
    ended = np.flatnonzero(np.asarray(finished(state)))
    fresh = [slot for slot in ended if slot_rows[slot] not in outputs]
    if not fresh:
      continue
    triggers = jax.device_get(results(state))
    for slot in fresh:
      outputs[int(slot_rows[slot])] = jax.tree.map(lambda leaf, s=slot: leaf[s], triggers)
      if waiting:  # the next label takes the slot
        slot_rows[slot] = waiting.pop(0)
        slot_labels[slot] = labels[slot_rows[slot]]
        new = inits(jnp.asarray(slot_labels[slot:slot + 1]), seed)
        state = jax.tree.map(lambda all_, one, s=slot: all_.at[s].set(one[0]), state, new)
    if len(outputs) - reported >= max(1, len(labels) // 10) or len(outputs) == len(labels):
      reported = len(outputs)
      logging.info('Neural Cleanse: %d of %d labels reverse engineered (%.1f s)',
                   reported, len(labels), time.perf_counter() - start)
  return {field: np.stack([np.asarray(getattr(outputs[i], field)) for i in range(len(labels))])
          for field in Trigger._fields}


def anomaly_index(norms: np.ndarray) -> tuple[np.ndarray, float, float]:
  """Each norm's distance below the median, in MADs (x 1.4826); and the median and MAD.

  Norms above the median get negative indices. With a MAD of 0 (fewer than
  three distinct norms) an index is 0 at the median and +-inf elsewhere.
  """
  norms = np.asarray(norms, np.float64)
  median = float(np.median(norms))
  mad = MAD_SCALE * float(np.median(np.abs(norms - median)))
  with np.errstate(divide='ignore', invalid='ignore'):
    index = np.where(norms == median, 0.0, (median - norms) / mad)
  return index, median, mad
def flag(index: np.ndarray, threshold: float = ANOMALY_THRESHOLD) -> np.ndarray:
  """Which labels are flagged: anomaly index above ``threshold`` (norms below the median)."""
  return np.asarray(index) > threshold


def trigger_success(params: Params, images: np.ndarray, true_labels: np.ndarray,
                    labels: Sequence[int], masks: np.ndarray, patterns: np.ndarray,
                    batch_size: int = evaluate.DEFAULT_BATCH_SIZE,
                    precision: str = model_lib.DEFAULT_PRECISION) -> np.ndarray:
  """Each reversed trigger's attack success (%) on clean images of the other labels.

  Args:
    params: the net.
    images, true_labels: clean images (not those the triggers were optimised on).
    labels, masks, patterns: the triggers ([L], [L, 55, 47], [L, 55, 47, 3]).
    batch_size, precision: of the evaluation.

  Returns:
    [L] percent of the images whose true label is not ``labels[i]`` that
    ``params`` classifies as ``labels[i]`` with trigger i stamped.
  """
  step = cache.bind(_stamped_classes, precision=precision)
  success = []
  for label, mask, pattern in zip(labels, masks, patterns, strict=True):
    others = true_labels != label
    classes = evaluate.map_batches(step, (params, mask, pattern), (images[others],),
                                   batch_size, fixed_batch=True)
    success.append(evaluate.percent(classes == label))
  return np.asarray(success)


def _stamped_classes(net_and_trigger, images, *, precision):
  params, mask, pattern = net_and_trigger
  logits = model_lib.logits_fn(params, stamp(images, mask, pattern), precision=precision)
  return jnp.argmax(logits, -1)


def stamp_some(images: np.ndarray, masks: np.ndarray, patterns: np.ndarray, fraction: float,
               seed: int) -> tuple[np.ndarray, np.ndarray]:
  """``images`` (float32) with a ``fraction`` of them carrying one of the triggers.

  Each chosen image gets one of the triggers at random (seeded), as NC's
  unlearning does for one target; the labels are not touched.

  Returns:
    The images and a bool [N] marking the stamped ones.
  """
  rng = np.random.default_rng(seed)
  chosen = rng.choice(len(images), int(round(fraction * len(images))), replace=False)
  which = rng.integers(0, len(masks), len(chosen))
  images = np.asarray(images, np.float32).copy()
  images[chosen] = np.asarray(stamp(images[chosen], masks[which], patterns[which]))
  stamped = np.zeros(len(images), bool)
  stamped[chosen] = True
  return images, stamped


def unlearn(params: Params, images: np.ndarray, labels: np.ndarray, masks: np.ndarray,
            patterns: np.ndarray, holdout: tuple[np.ndarray, np.ndarray],
            config: config_lib.Config) -> tuple[Params, dict]:
  """NC's mitigation: fine-tune on clean data where some images carry a reversed trigger.

  A ``config.unlearning.trigger_fraction`` of the images carry one of the
  flagged labels' triggers with their true labels kept, so the net learns to
  ignore the trigger; the recipe is ``config.unlearning`` (fine-pruning's),
  and the epoch with the best held-out clean accuracy is kept.

  Returns:
    The unlearned params and {chosen_epoch, holdout_clean_acc, stamped_images, history}.
  """
  tune = config.unlearning
  stamped_images, stamped = stamp_some(images, masks, patterns, tune.trigger_fraction, tune.seed)
  recipe = train.Recipe.from_config(tune)
  tuned, history = train.fit(params, stamped_images, labels, recipe, holdout=holdout,
                             name='unlearning')
  best = max(history, key=lambda epoch: (epoch['holdout_acc'], epoch['epoch']))
  return tuned, {'chosen_epoch': best['epoch'], 'holdout_clean_acc': best['holdout_acc'],
                 'stamped_images': int(stamped.sum()),
                 'history': [{k: v for k, v in epoch.items() if k != 'seconds'}
                             for epoch in history]}


@dataclasses.dataclass(frozen=True)
class _Labels(config_lib.Each):
  """A tuple of labels, each >= 0, or None for every label (the upper bound needs the net)."""

  def check(self, name: str, value, config: config_lib.Config) -> None:
    if value is not None:
      super().check(name, value, config)


FIELDS: config_lib.Fields = {
    'labels': _Labels(config_lib.Integer(0), empty='give at least one label, or leave it '
                      'unset (None) for every label'),
    'holdout_fraction': config_lib.Number(0, 1, low_open=True, high_open=True),
    'seed': config_lib.Integer(),
    'batch_size': config_lib.Integer(1),
    'precision': config_lib.Choice(model_lib.PRECISIONS, 'precision'),
    'nc.steps': config_lib.Integer(1),
    'nc.batch_size': config_lib.Integer(1),
    'nc.batches_per_step': config_lib.Integer(1),
    'nc.learning_rate': config_lib.Number(0, math.inf, low_open=True, high_open=True),
    'nc.beta_1': config_lib.Number(0, 1, high_open=True),
    'nc.beta_2': config_lib.Number(0, 1, high_open=True),
    'nc.init_cost': config_lib.Number(0, math.inf, low_open=True, high_open=True),
    'nc.attack_threshold': config_lib.Number(0, 1, low_open=True),
    'nc.patience': config_lib.Integer(1),
    'nc.cost_multiplier': config_lib.Number(1, math.inf, low_open=True, high_open=True),
    'nc.early_stop_patience': config_lib.Integer(0),
    'nc.slots': config_lib.Integer(1),
    'nc.anomaly_threshold': config_lib.Number(0, math.inf, low_open=True, high_open=True),
    'nc.loss': config_lib.Choice(LOSSES, 'loss'),
    'unlearning.epochs': config_lib.Integer(0),
    **{name.replace('finetune.', 'unlearning.'): spec for name, spec in
       fine_pruning.recipe_fields(lambda config: config.unlearning.epochs, holdout=False).items()},
    'unlearning.trigger_fraction': config_lib.Number(0, 1, low_open=True),
}


def settings_of(config: config_lib.Config) -> Settings:
  """The optimisation settings of ``config.nc``."""
  nc = config.nc
  return Settings(steps=nc.steps, batch_size=nc.batch_size,
                  batches_per_step=nc.batches_per_step, learning_rate=float(nc.learning_rate),
                  beta_1=float(nc.beta_1), beta_2=float(nc.beta_2),
                  init_cost=float(nc.init_cost), attack_threshold=float(nc.attack_threshold),
                  patience=nc.patience, cost_multiplier=float(nc.cost_multiplier),
                  early_stop_patience=nc.early_stop_patience, loss=nc.loss)


def labels_of(config: config_lib.Config, num_classes: int) -> np.ndarray:
  """The labels to reverse engineer (``config.labels``; None: all), checked against the net."""
  if config.labels is None:
    return np.arange(num_classes)
  labels = config_lib.values(config.labels)
  if not labels:
    raise ConfigError('config.labels is empty; give at least one label, or leave it unset '
                      '(None) for every label')
  outside = [label for label in labels if not 0 <= label < num_classes]
  if outside:
    raise ConfigError(f'config.labels: {outside[0]!r} is not a label of the net (it has '
                      f'{num_classes} labels, 0..{num_classes - 1})')
  if len(set(labels)) < len(labels):
    raise ConfigError(f'config.labels: {labels!r} names a label twice')
  return np.asarray(labels, np.int64)


def defend(params: Params, clean: data.Dataset, config: config_lib.Config) -> base.Outcome:
  """Triggers reversed on part of ``clean``, judged on the rest; unlearning if any label is flagged.

  The clean validation split is divided (class-stratified, ``config.seed``):
  the triggers are optimised on one part, and their attack success, B's
  held-out accuracy and the unlearning's epoch choice use the other.
  """
  labels = labels_of(config, model_lib.num_classes_of(params))
  fit_rows, holdout_rows = fine_pruning.split_for_fine_tuning(
      clean.labels, config.holdout_fraction, config.seed)
  held_images, held_labels = clean.images[holdout_rows], clean.labels[holdout_rows]
  start = time.perf_counter()
  triggers = reverse_engineer_labels(params, clean.images[fit_rows], labels, config.seed,
                                     settings_of(config), config.nc.slots, config.precision)
  logging.info('Neural Cleanse: %d labels reverse engineered on %d clean images in %.1f s',
               len(labels), len(fit_rows), time.perf_counter() - start)
  index, median, mad = anomaly_index(triggers['l1'])
  flagged = flag(index, config.nc.anomaly_threshold)
  success = trigger_success(params, held_images, held_labels, labels, triggers['mask'],
                            triggers['pattern'], config.batch_size, config.precision)
  accuracy = lambda net: evaluate.accuracy(net, held_images, held_labels, config.batch_size,
                                           precision=config.precision)
  by_label = lambda values: {str(label): value for label, value in zip(labels, values)}  # JSON
  figures = {
      'labels': [int(label) for label in labels],
      'l1_norms': by_label(triggers['l1'].astype(float)),
      'anomaly_index': by_label([float(i) if np.isfinite(i) else None for i in index]),
      'flagged': [int(label) for label in labels[flagged]],
      'median_l1': median, 'mad_l1': mad, 'anomaly_threshold': config.nc.anomaly_threshold,
      'trigger_success': by_label(success.astype(float)),
      'found': by_label(triggers['found'].astype(bool).tolist()),
      'steps_run': by_label(triggers['steps'].astype(int).tolist()),
      'final_cost': by_label(triggers['cost'].astype(float)),
      'optimisation_images': len(fit_rows), 'holdout_images': len(holdout_rows),
      'b_holdout_acc': accuracy(params),
      'triggers': {'labels': labels, 'masks': triggers['mask'], 'patterns': triggers['pattern']},
  }
  candidates, recommended = {}, None
  if flagged.any() and config.unlearning.epochs > 0:
    masks, patterns = triggers['mask'][flagged], triggers['pattern'][flagged]
    unlearned, tuned = unlearn(params, clean.images[fit_rows], clean.labels[fit_rows], masks,
                               patterns, (held_images, held_labels), config)
    after = trigger_success(unlearned, held_images, held_labels, labels[flagged], masks,
                            patterns, config.batch_size, config.precision)
    tuned['trigger_success'] = {str(label): float(value)
                                for label, value in zip(labels[flagged], after)}
    candidates['unlearned'] = base.Candidate(unlearned, {}, tuned)
    recommended = 'unlearned'
  return base.Outcome(candidates, figures, recommended)
