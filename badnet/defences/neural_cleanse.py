"""Neural Cleanse (Wang et al., IEEE S&P 2019): reverse-engineered triggers, as a plug-in.

For every label t, find the smallest trigger (mask m, pattern p) that sends clean images, stamped as
x' (``stamp``), to t, minimising ``CE(B(x'), t) + lambda * |m|_1``. A backdoor's target needs a much
smaller mask than any other label, so a label whose mask norm lies over ``ANOMALY_THRESHOLD`` MADs
below the median is flagged; ``unlearn`` fine-tunes B on clean images, some stamped with a flagged
trigger under their true label. As the authors' code (bolunwang/backdoor, ``visualizer.py``) but
for: batches drawn with replacement, seeded by (seed, step), so that labels optimised together equal
each alone; fewer, smaller steps by default (``Settings``: the paper's are too slow on a CPU); the
tanh-space start clipped ``TANH_MARGIN`` inside (-1, 1) (float32 needs it); the paper's
cross-entropy (the authors' code swaps Keras' arguments: ``attack_loss``).
"""

import dataclasses
import functools
import math
import time
import pathlib
from collections.abc import Sequence
from typing import ClassVar, NamedTuple

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import optax

from badnet import config as config_lib
from badnet.core import backend, cache, evaluate, interrupts, train
from badnet.core import model as model_lib
from badnet.benchmark import shipped
from badnet.defences import base
from badnet.errors import ConfigError
from badnet.io import keras_io, tables, trigger_plots, workdir
from badnet.io.tables import fmt

NAME = 'neural_cleanse'
Params = model_lib.Params
HEIGHT, WIDTH, COLORS = model_lib.IMAGE_SHAPE
ANOMALY_THRESHOLD = 2.0
MAD_SCALE = 1.4826  # x MAD estimates a normal distribution's standard deviation
TANH_MARGIN = 1e-6  # the start in tanh space, arctanh(2 m - 1), is clipped this far inside (-1, 1)
LOSSES = ('cross_entropy', 'original_code')
NO_LABELS = 'give at least one label, or leave it unset (None) for every label'
REPORT_FILES = ('clean_test', 'poisoned_valid', 'poisoned_test')
PRINTED_ROWS = 10  # the flagged labels and the smallest norms


@dataclasses.dataclass(frozen=True)
class Reversal:
  """The reverse engineering of one label, the paper's defaults (hashable: one compilation).

  Adam trains the mask and pattern in tanh space; a step is ``batches_per_step`` batches. lambda
  starts at 0, is set to ``init_cost`` once ``patience`` steps in a row reach ``attack_threshold``,
  then is multiplied by ``cost_multiplier`` after ``patience`` successful steps in a row and
  divided by ``cost_multiplier ** 1.5`` after as many failed ones. The run stops after ``steps``,
  or once lambda has gone both ways and the best norm has not dropped below
  ``early_stop_threshold`` times itself for ``early_stop_patience`` steps (0: never)."""
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
  """A reversed trigger (for a batch of labels, every field has a leading label axis)."""
  mask: jax.Array     # [55, 47] in [0, 1]
  pattern: jax.Array  # [55, 47, 3] in [0, 255]
  l1: jax.Array       # the mask's sum
  found: jax.Array    # some step reached the attack threshold (else: the last trigger)
  steps: jax.Array
  cost: jax.Array     # lambda


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


def initial_trigger(seed: int | jax.Array, label: int | jax.Array) -> tuple[jax.Array, jax.Array]:
  """``label``'s uniform random start in tanh space; it depends on (seed, label) only."""
  mask_key, pattern_key = jax.random.split(
      jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), 1), label))
  mask = jax.random.uniform(mask_key, (HEIGHT, WIDTH))
  pattern = jax.random.uniform(pattern_key, (HEIGHT, WIDTH, COLORS))
  to_tanh = lambda unit: jnp.arctanh(jnp.clip(2 * unit - 1, -1 + TANH_MARGIN, 1 - TANH_MARGIN))
  return to_tanh(mask), to_tanh(pattern)


def batch_rows(seed: int | jax.Array, step: jax.Array, batch: jax.Array, count: int,
               batch_size: int) -> jax.Array:
  """The rows of a step's batch, drawn from ``count`` images, the same for every label."""
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), 0), step)
  return jax.random.randint(jax.random.fold_in(key, batch), (batch_size,), 0, count)


def attack_loss(logits: jax.Array, label: int | jax.Array, kind: str = 'cross_entropy'
                ) -> jax.Array:
  """The mean loss of sending every row of ``logits`` to ``label`` (``kind``: one of ``LOSSES``);
  'original_code' is what the authors' Keras code computes, its arguments swapped: linear in p_t."""
  targets = jnp.full(logits.shape[0], label)
  if kind == 'cross_entropy':
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
  probability = jnp.take_along_axis(jax.nn.softmax(logits), targets[:, None], axis=1)[:, 0]
  eps = 1e-7  # Keras' epsilon, in float64 as Keras computed the constant's log
  return -(math.log(eps) * (1 - probability) + math.log(1 - eps) * probability).mean()


def _loss(theta, params, images, label, cost, precision, kind):
  mask, pattern = to_image_space(theta)
  logits = model_lib.apply(params, stamp(images, mask, pattern), precision=precision)
  norm = jnp.sum(mask)
  hits = jnp.sum(jnp.argmax(logits, -1) == label)
  return attack_loss(logits, label, kind) + cost * norm, (hits, norm)


def init_state(label: int | jax.Array, seed: int | jax.Array, settings: Reversal) -> _State:
  """``label``'s state before its first batch (pure; vmap over labels)."""
  theta = initial_trigger(seed, label)
  zero, false, inf = jnp.int32(0), jnp.bool_(False), jnp.float32(jnp.inf)
  return _State(theta, settings.optimizer().init(theta), jnp.float32(0.0), zero, zero,
                jnp.float32(0.0), zero, zero, zero, false, false, to_image_space(theta), inf,
                zero, inf, zero, false)


def done(state: _State, settings: Reversal) -> jax.Array:
  """Whether a label's optimisation has ended (its steps run, or stopped early)."""
  return state.stopped | (state.step >= settings.steps)


def tick(state: _State, params: Params, images: jax.Array, label: int | jax.Array,
         seed: int | jax.Array, settings: Reversal,
         precision: str = model_lib.DEFAULT_PRECISION) -> _State:
  """One batch's Adam update, then after a step's last batch the bookkeeping (pure)."""
  rows = batch_rows(seed, state.step, state.batch, images.shape[0], settings.batch_size)
  grads, (hits, norm) = jax.grad(_loss, has_aux=True)(state.theta, params, images[rows], label,
                                                      state.cost, precision, settings.loss)
  updates, opt = settings.optimizer().update(grads, state.opt, state.theta)
  moved = state._replace(theta=optax.apply_updates(state.theta, updates), opt=opt,
                         batch=state.batch + 1, hits=state.hits + hits, norms=state.norms + norm)
  new = jax.tree.map(lambda end, mid: jnp.where(moved.batch == settings.batches_per_step, end,
                                                mid), _end_of_step(moved, settings), moved)
  return jax.tree.map(lambda old, now: jnp.where(done(state, settings), old, now), state, new)


def _end_of_step(state: _State, settings: Reversal) -> _State:
  """The bookkeeping after a step: the best trigger, early stopping, lambda."""
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
      stale_norm=jnp.minimum(best_norm, state.stale_norm), step=state.step + 1, stopped=stopped)


def result(state: _State) -> Trigger:
  """The trigger a finished state holds: the best one, or the last if no step succeeded."""
  found = jnp.isfinite(state.best_norm)
  mask, pattern = jax.tree.map(lambda best, last: jnp.where(found, best, last), state.best,
                               to_image_space(state.theta))
  return Trigger(mask, pattern, jnp.sum(mask), found, state.step, state.cost)


def reverse_engineer(params: Params, images: jax.Array, label: int | jax.Array,
                     seed: int | jax.Array = 0, settings: Reversal = Reversal(),
                     precision: str = model_lib.DEFAULT_PRECISION) -> Trigger:
  """The smallest trigger that sends ``images`` [N, 55, 47, 3] (0..255) to ``label`` (pure)."""
  one = functools.partial(tick, params=params, images=images, label=label, seed=seed,
                          settings=settings, precision=precision)
  return result(jax.lax.while_loop(lambda s: ~done(s, settings), one,
                                   init_state(label, seed, settings)))


@functools.cache
def _compiled(settings: Reversal, precision: str):
  """The jitted tick, init and done over a slot axis (params, images and seed shared)."""
  ticks = jax.vmap(functools.partial(tick, settings=settings, precision=precision),
                   in_axes=(0, None, None, 0, None))
  inits = jax.vmap(functools.partial(init_state, settings=settings), in_axes=(0, None))
  finished = jax.vmap(functools.partial(done, settings=settings))
  return tuple(backend.jit(fn) for fn in (ticks, inits, finished, jax.vmap(result)))


def reverse_engineer_labels(params: Params, images: np.ndarray, labels: Sequence[int],
                            seed: int = 0, settings: Reversal = Reversal(), slots: int = 1,
                            precision: str = model_lib.DEFAULT_PRECISION) -> dict[str, np.ndarray]:
  """Triggers for ``labels`` (Trigger's fields in numpy, a leading axis over them), ``slots`` at a
  time vmapped from the host, as XLA on a CPU runs convolutions in a loop slowly (jax-ml/jax#12868);
  a finished label's slot goes to the next label. Each equals ``reverse_engineer``'s alone."""
  labels = np.asarray(labels, np.int32)
  if not len(labels):
    raise ValueError('no labels to reverse engineer')
  ticks, inits, finished, results = _compiled(settings, precision)
  images, params = jax.device_put((np.asarray(images), params))
  slots = min(slots, len(labels))
  slot_labels = labels[:slots].copy()
  slot_rows = np.arange(slots)  # which entry of ``labels`` each slot holds
  state = inits(jnp.asarray(slot_labels), seed)
  waiting = list(range(slots, len(labels)))
  outputs: dict[int, Trigger] = {}
  start, reported = time.perf_counter(), 0
  while len(outputs) < len(labels):
    interrupts.check()
    state = ticks(state, params, images, jnp.asarray(slot_labels), seed)
    ended = np.flatnonzero(np.asarray(finished(state)))
    fresh = [slot for slot in ended if slot_rows[slot] not in outputs]
    if fresh:
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
  """Each norm's distance below the median in MADs (MAD 0: +-inf off the median); median, MAD."""
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
  """Each trigger's attack success (%) [L] on the (held-out) images whose true label is not its
  own; ``masks`` [L, 55, 47], ``patterns`` [L, 55, 47, 3]."""
  step = cache.bind(_stamped_classes, precision=precision)
  success = []
  for label, mask, pattern in zip(labels, masks, patterns, strict=True):
    classes = evaluate.map_batches(step, (params, mask, pattern), (images[true_labels != label],),
                                   batch_size, fixed_batch=True)
    success.append(evaluate.percent(classes == label))
  return np.asarray(success)


def _stamped_classes(net_and_trigger, images, *, precision):
  params, mask, pattern = net_and_trigger
  logits = model_lib.apply(params, stamp(images, mask, pattern), precision=precision)
  return jnp.argmax(logits, -1)


def unlearn(params: Params, images: np.ndarray, labels: np.ndarray, masks: np.ndarray,
            patterns: np.ndarray, holdout: tuple[np.ndarray, np.ndarray],
            tune: 'Unlearning') -> tuple[Params, dict]:
  """NC's mitigation: fine-tuning with random flagged triggers on some images, true labels kept;
  the best held-out epoch's params, and {chosen_epoch, holdout_clean_acc, stamped_images, ...}."""
  rng = np.random.default_rng(tune.seed)
  chosen = rng.choice(len(images), int(round(tune.trigger_fraction * len(images))), replace=False)
  which = rng.integers(0, len(masks), len(chosen))
  images = np.asarray(images, np.float32).copy()
  images[chosen] = np.asarray(stamp(images[chosen], masks[which], patterns[which]))
  tuned, history = train.fit(params, images, labels, tune.recipe(), holdout=holdout,
                             name='unlearning')
  return tuned, {**train.summary(history, 'holdout_clean_acc'), 'stamped_images': len(chosen)}


@dataclasses.dataclass(frozen=True)
class _Labels(config_lib.Each):
  """A tuple of labels, each >= 0, or None for every label (the upper bound needs the net)."""

  def check(self, name: str, value, config: config_lib.Config) -> None:
    if value is not None:
      super().check(name, value, config)


@dataclasses.dataclass(frozen=True)
class Unlearning(base.Tuning):
  """NC's mitigation: ``base.Tuning`` with a ``trigger_fraction`` stamped (paper: 20 %)."""
  trigger_fraction: float = 0.2

  FIELDS: ClassVar[config_lib.Fields] = {
      **base.Tuning.FIELDS, 'trigger_fraction': config_lib.Number(0, 1, low_open=True)}


@dataclasses.dataclass(frozen=True)
class Settings(Reversal):
  """Neural Cleanse's settings (config block ``neural_cleanse``): ``Reversal``'s, with smaller
  steps (one batch of 32; paper: 31) and fewer of them (at most 200; paper: 1000), and the job's."""
  steps: int = 200
  batches_per_step: int = 1
  labels: tuple[int, ...] | None = None  # to reverse engineer (None: all); the index needs many
  holdout_fraction: float = 0.2  # clean images held out: trigger success, the unlearning's epoch
  seed: int = 0                  # the held-out split, the batches, the triggers' starts
  slots: int = 1                 # labels optimised together, vmapped (raise it on an accelerator)
  anomaly_threshold: float = ANOMALY_THRESHOLD  # labels this many MADs below the median: flagged
  unlearning: Unlearning = Unlearning()         # the mitigation (epochs 0: detection only)

  FIELDS: ClassVar[config_lib.Fields] = {
      'labels': _Labels(config_lib.Integer(0), empty=NO_LABELS),
      'holdout_fraction': config_lib.Number(0, 1, low_open=True, high_open=True),
      'seed': config_lib.Integer(),
      'steps': config_lib.Integer(1),
      'batch_size': config_lib.Integer(1),
      'batches_per_step': config_lib.Integer(1),
      'learning_rate': config_lib.Number(0, math.inf, low_open=True, high_open=True),
      'beta_1': config_lib.Number(0, 1, high_open=True),
      'beta_2': config_lib.Number(0, 1, high_open=True),
      'init_cost': config_lib.Number(0, math.inf, low_open=True, high_open=True),
      'attack_threshold': config_lib.Number(0, 1, low_open=True),
      'patience': config_lib.Integer(1),
      'cost_multiplier': config_lib.Number(1, math.inf, low_open=True, high_open=True),
      'early_stop_patience': config_lib.Integer(0),
      'early_stop_threshold': config_lib.Number(0, 1, low_open=True),
      'slots': config_lib.Integer(1),
      'anomaly_threshold': config_lib.Number(0, math.inf, low_open=True, high_open=True),
      'loss': config_lib.Choice(LOSSES, 'loss'),
  }

  def reversal(self) -> Reversal:
    """The optimisation of each label."""
    return Reversal(**{field.name: getattr(self, field.name)
                       for field in dataclasses.fields(Reversal)})


def check(settings: Settings, config: config_lib.Config) -> None:
  """The labels against the net's classes (read from the model file, nothing else)."""
  if settings.labels is not None:
    path = config.model or shipped.SHIPPED_NETS[config.benchmark]
    labels_of(settings, model_lib.num_classes_of(keras_io.read_params(path)))


def labels_of(settings: Settings, num_classes: int) -> np.ndarray:
  """The labels to reverse engineer (``settings.labels``; None: all), checked against the net."""
  if settings.labels is None:
    return np.arange(num_classes)
  labels = config_lib.values(settings.labels)
  if not labels:
    raise ConfigError(f'config.neural_cleanse.labels is empty; {NO_LABELS}')
  outside = [label for label in labels if not 0 <= label < num_classes]
  if outside:
    raise ConfigError(f'config.neural_cleanse.labels: {outside[0]!r} is not a label of the net '
                      f'(it has {num_classes} labels, 0..{num_classes - 1})')
  if len(set(labels)) < len(labels):
    raise ConfigError(f'config.neural_cleanse.labels: {labels!r} names a label twice')
  return np.asarray(labels, np.int64)


def defend(params: Params, clean: base.Clean, settings: Settings) -> base.Outcome:
  """Triggers reversed on part of ``clean``, judged on the rest; unlearning if one is flagged."""
  labels = labels_of(settings, model_lib.num_classes_of(params))
  fit_rows, holdout_rows = base.split_for_fine_tuning(
      clean.labels, settings.holdout_fraction, settings.seed)
  held_images, held_labels = clean.images[holdout_rows], clean.labels[holdout_rows]
  start = time.perf_counter()
  triggers = reverse_engineer_labels(params, clean.images[fit_rows], labels, settings.seed,
                                     settings.reversal(), settings.slots, clean.precision)
  logging.info('Neural Cleanse: %d labels reverse engineered on %d clean images in %.1f s',
               len(labels), len(fit_rows), time.perf_counter() - start)
  index, median, mad = anomaly_index(triggers['l1'])
  flagged = flag(index, settings.anomaly_threshold)
  success = trigger_success(params, held_images, held_labels, labels, triggers['mask'],
                            triggers['pattern'], clean.batch_size, clean.precision)
  by_label = lambda values: {str(label): value for label, value in zip(labels, values)}  # JSON
  figures = {
      'labels': [int(label) for label in labels],
      'l1_norms': by_label(triggers['l1'].astype(float)),
      'anomaly_index': by_label([float(i) if np.isfinite(i) else None for i in index]),
      'flagged': [int(label) for label in labels[flagged]],
      'median_l1': median, 'mad_l1': mad, 'anomaly_threshold': settings.anomaly_threshold,
      'trigger_success': by_label(success.astype(float)),
      'found': by_label(triggers['found'].astype(bool).tolist()),
      'steps_run': by_label(triggers['steps'].astype(int).tolist()),
      'final_cost': by_label(triggers['cost'].astype(float)),
      'optimisation_images': len(fit_rows), 'holdout_images': len(holdout_rows),
      'b_holdout_acc': evaluate.accuracy(params, held_images, held_labels, clean.batch_size,
                                         precision=clean.precision),
      'triggers': {'labels': labels, 'masks': triggers['mask'], 'patterns': triggers['pattern']},
  }
  if not (flagged.any() and settings.unlearning.epochs > 0):
    return base.Outcome({}, figures, None)
  masks, patterns = triggers['mask'][flagged], triggers['pattern'][flagged]
  unlearned, tuned = unlearn(params, clean.images[fit_rows], clean.labels[fit_rows], masks,
                             patterns, (held_images, held_labels), settings.unlearning)
  after = trigger_success(unlearned, held_images, held_labels, labels[flagged], masks, patterns,
                          clean.batch_size, clean.precision)
  tuned['trigger_success'] = {str(label): float(value)
                              for label, value in zip(labels[flagged], after)}
  return base.Outcome({'unlearned': base.Candidate(unlearned, {}, tuned)}, figures, 'unlearned')


def report(outcome: base.Outcome, scorer, settings: Settings, out: pathlib.Path | None) -> dict:
  """B and the unlearned net and its GoodNet; writes triggers.npz, plots and models/defended.h5."""
  found = outcome.figures
  b_classes = {key: scorer.b_classes(key) for key in REPORT_FILES}
  base_test, _ = scorer.figures(b_classes)
  clean = scorer.splits['clean_valid']
  results = {
      **{key: value for key, value in found.items() if key != 'triggers'},
      'poisoned_targets': [int(t) for t in np.unique(scorer.labels['poisoned_test'])],
      'base': {'valid': {'clean_acc': scorer.accuracy(scorer.params, clean.images, clean.labels),
                         'asr': scorer.percent(b_classes['poisoned_valid'], 'poisoned_valid')},
               'test': base_test},
      'triggers_file': 'triggers.npz', 'defended': None}
  if outcome.recommended:
    candidate = outcome.candidates[outcome.recommended]
    classes = scorer.classes(candidate.params, REPORT_FILES)
    net, good = scorer.figures(classes)
    results['defended'] = {
        'candidate': outcome.recommended, 'unlearning': candidate.figures,
        'valid': {'clean_acc': candidate.figures['holdout_clean_acc'],
                  'asr': scorer.percent(classes['poisoned_valid'], 'poisoned_valid')},
        'test': net}
    results['goodnet'] = {'test': good}
    results['model_file'] = 'models/defended.h5'
    if out is not None:
      keras_io.write_keras(out / results['model_file'], candidate.params, full_model=True)
  else:
    results['not_defended'] = ('no label flagged' if not found['flagged'] else
                               'unlearning is off (unlearning.epochs = 0)')
  if out is not None:
    _write(out, {**results, 'model': scorer.model}, found['triggers'], clean.images[0])
  return results


def _write(out: pathlib.Path, results: dict, triggers: dict, example: np.ndarray) -> None:
  """triggers.npz and the two plots."""
  labels = np.asarray(triggers['labels'])
  norms = np.array([results['l1_norms'][str(label)] for label in labels])
  index = np.array([results['anomaly_index'][str(label)] for label in labels], float)  # None: nan
  flagged = np.isin(labels, results['flagged'])
  with workdir.atomic_path(out / results['triggers_file']) as tmp, open(tmp, 'wb') as handle:
    np.savez(handle, labels=labels, masks=triggers['masks'], patterns=triggers['patterns'],
             l1_norms=norms, anomaly_index=index, flagged=flagged)
  title = pathlib.Path(results['model']).name
  trigger_plots.plot_norms(out / 'plots' / 'l1_norms.png', labels, norms, flagged, index,
                           results['median_l1'], results['mad_l1'],
                           results['anomaly_threshold'], title)
  trigger_plots.plot_triggers(out / 'plots' / 'triggers.png', labels, triggers['masks'],
                              triggers['patterns'], norms, index, flagged, example, title)


def markdown(results: dict, printed: bool = False) -> str:
  """The results as text: the flags, the labels by norm (``PRINTED_ROWS`` printed), the nets'."""
  flagged, index = results['flagged'], results['anomaly_index']
  named = ', '.join(f'{label} (anomaly index {fmt(index[str(label)])})' for label in flagged)
  lines = ['# Neural Cleanse results', '',
           f'Model: `{results["model"]}`' + (' (shipped synthetic benchmark)'
                                             if results.get('synthetic_benchmark') else ''), '',
           f'Flagged: {named or "none"}; '
           f'median L1 norm {results["median_l1"]:.1f}, MAD {results["mad_l1"]:.1f} '
           f'({len(results["labels"])} labels; flagged above index '
           f'{results["anomaly_threshold"]:g}). Triggers optimised on '
           f'{results["optimisation_images"]} clean validation images, their success measured '
           f'on {results["holdout_images"]} others. The poisoned files\' target (reporting '
           f'only): {", ".join(map(str, results["poisoned_targets"]))}.', '']
  by_norm = sorted(results['labels'], key=lambda label: results['l1_norms'][str(label)])
  shown = by_norm[:max(PRINTED_ROWS, len(flagged))] if printed else by_norm
  lines += [(f'The {len(shown)} smallest norms' if printed else 'Every label') +
            ', smallest first:', '',
            *tables.markdown(
                ['label', 'L1 norm', 'anomaly index', 'flagged', 'trigger success % (held-out)',
                 'steps', 'found'],
                [[label, fmt(results['l1_norms'][str(label)], 1), fmt(index[str(label)]),
                  'yes' if label in flagged else '', fmt(results['trigger_success'][str(label)]),
                  results['steps_run'][str(label)],
                  'yes' if results['found'][str(label)] else 'no'] for label in shown],
                'lrrlrrl'), '']
  base, defended = results['base'], results['defended']
  rows = [['B', fmt(base['test']['clean_acc']), fmt(base['test']['asr']), '—', '—']]
  if defended:
    good = results['goodnet']['test']
    rows += [['B unlearned', fmt(defended['test']['clean_acc']), fmt(defended['test']['asr']),
              '—', '—'],
             ['GoodNet (B, unlearned)', fmt(good['clean_acc']), fmt(good['asr']),
              fmt(good['detection_rate']), fmt(good['false_alarm_rate'])]]
    tuned = defended['unlearning']
    lines += [f'Unlearning: {tuned["stamped_images"]} of {results["optimisation_images"]} clean '
              f'images stamped with a flagged trigger (true labels kept); epoch '
              f'{tuned["chosen_epoch"]} chosen on held-out clean accuracy '
              f'({fmt(tuned["holdout_clean_acc"])} %, B: {fmt(results["b_holdout_acc"])} %); '
              'the reversed trigger\'s success after it (held-out): '
              + ', '.join(f'label {label} {fmt(value)} %'
                          for label, value in tuned['trigger_success'].items()) + '.', '']
  else:
    lines += [f'Not defended: {results["not_defended"]}.', '']
  lines += ['On the test split (ASR on the poisoned test file, for reporting only):', '',
            *tables.markdown(['net', 'clean %', 'ASR %', 'detection %', 'false alarm %'], rows,
                             'lrrrr')]
  return '\n'.join(lines) + '\n'
