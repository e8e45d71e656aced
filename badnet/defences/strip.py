"""STRIP, STRong Intentional Perturbation (Gao et al., ACSAC 2019): an input detector, as a plug-in.

A trigger forces the target class whatever else the image holds, so an input
carrying it keeps its prediction when other images are superimposed on it,
while a clean input's prediction scatters. STRIP superimposes each input with
N clean images, runs the N blends through B, and takes the mean Shannon
entropy (bits) of the N predicted distributions; an input whose entropy is
below a threshold is flagged. The threshold uses clean data only: by default,
as in the paper, a normal fitted to clean inputs' entropies, cut at the
chosen false-rejection rate (``threshold``).

The defender's clean validation split is divided, class-stratified and
seeded: one part is the pool of overlays (the images superimposed), the other
the clean inputs the threshold is fitted to, so no input is blended with
itself. Each input draws its N overlays from the pool, with replacement as
in the original code, from a seeded generator: the same images in the same
order get the same overlays, so the detector is deterministic.

How two images are superimposed (``blend``):

- 'add': the pixel sum saturated at 255, what ``cv2.addWeighted(x, 1, o, 1,
  0)`` does to uint8 images. (The paper adds the images; its code adds float
  images in [0, 1] and does not saturate.) On bright faces much of the blend
  saturates to white, and a dark trigger (sunglasses, near 0) adds nothing:
  where it is, the blend is the overlay's own pixels.
- 'average': 0.5 x + 0.5 o, an alpha blend (what many re-implementations
  use): nothing saturates, and a dark trigger stays half as dark as the
  overlay around it. conv_1 is linear before its bias, so each image and each
  overlay goes through conv_1 once, not once per blend (``averaged_entropy``).

``entropy`` and ``averaged_entropy`` are pure and run under ``jit`` and
``vmap``: the [B, N] blends of a batch are one [B * N] forward pass.
``defend`` offers no repaired nets; its ``Outcome.detector`` is a
``Detector`` (images -> flagged), which also gives the entropies it
thresholds.
"""

import dataclasses
import statistics

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from badnet import config as config_lib
from badnet.core import cache, evaluate
from badnet.core import model as model_lib
from badnet.defences import base, fine_pruning
from badnet.errors import DataError
from badnet.io import data

NAME = 'strip'
Params = model_lib.Params
BLENDS = ('add', 'average')
RULES = ('normal', 'quantile')  # how the threshold is set (see ``threshold``)
FIELDS: config_lib.Fields = {
    **config_lib.BATCH_SIZE,
    'strip.overlays': config_lib.Integer(1),
    'strip.frr': config_lib.Number(0, 100, low_open=True, high_open=True),
    'strip.blend': config_lib.Choice(BLENDS, 'blend'),
    'strip.threshold': config_lib.Choice(RULES, 'threshold rule'),
    'strip.overlay_fraction': config_lib.Number(0, 1, low_open=True, high_open=True),
    'seed': config_lib.Integer(),
    'precision': config_lib.Choice(model_lib.PRECISIONS, 'precision'),
}


@dataclasses.dataclass(frozen=True)
class Settings:
  """How inputs are perturbed and scored.

  Attributes:
    overlays: N, the clean images superimposed on each input.
    blend: one of BLENDS.
    seed: the overlays' draws.
    batch_size: blended images per forward pass (batch_size // N inputs, at least one).
    precision: float32 precision of the net's products.
  """
  overlays: int
  blend: str = 'average'
  seed: int = 0
  batch_size: int = 100
  precision: str = model_lib.DEFAULT_PRECISION

  @classmethod
  def from_config(cls, config: config_lib.Config) -> 'Settings':
    return cls(config.strip.overlays, config.strip.blend, config.seed, config.batch_size,
               config.precision)


def superimpose(images: jax.Array, overlays: jax.Array, blend: str) -> jax.Array:
  """``images`` with ``overlays`` superimposed (broadcast against each other), float32 0..255."""
  images, overlays = jnp.asarray(images, jnp.float32), jnp.asarray(overlays, jnp.float32)
  if blend == 'add':
    return jnp.minimum(images + overlays, 255.0)
  if blend == 'average':
    return 0.5 * images + 0.5 * overlays
  raise ValueError(f'unknown blend {blend!r}; expected one of {", ".join(BLENDS)}')


def prediction_entropy(logits: jax.Array) -> jax.Array:
  """Shannon entropy in bits of softmax(logits) over the last axis (0 log 0 = 0)."""
  log_p = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1)
  # p * log p from log_softmax: finite where p underflows to 0 (the term is then 0).
  return -jnp.sum(jnp.exp(log_p) * log_p, axis=-1) / jnp.log(2.0)


def entropy(params: Params, images: jax.Array, overlays: jax.Array, blend: str = 'add',
            precision: str = model_lib.DEFAULT_PRECISION) -> jax.Array:
  """Each image's mean prediction entropy (bits) over its N blends (a pure, jittable function).

  Args:
    params: the net B.
    images: [B, H, W, C] inputs.
    overlays: [B, N, H, W, C], each input's own N clean images, or [N, H, W,
      C], the same N for every input.
    blend: how an overlay is superimposed, one of BLENDS.
    precision: float32 precision of the net's products.

  Returns:
    float32 [B]: ``mean_n H(softmax(B(blend(images[b], overlays[b, n]))))``.
  """
  count = images.shape[0]
  overlays = jnp.broadcast_to(overlays, (count, *overlays.shape[-4:]))
  blends = superimpose(images[:, None], overlays, blend)  # [B, N, H, W, C]
  terms = _conv_1_linear(params, blends.reshape(-1, *blends.shape[2:]), precision)
  return _mean_entropy(params, terms, count, precision)


def _conv_1_linear(params: Params, images: jax.Array, precision: str) -> jax.Array:
  """conv_1 without its bias: the linear part, as ``model.DeepID`` applies it (VALID, stride 1)."""
  return jax.lax.conv_general_dilated(
      jnp.asarray(images, jnp.float32), params['conv_1']['kernel'], (1, 1), 'VALID',
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'), precision=precision)


def _mean_entropy(params: Params, terms: jax.Array, count: int, precision: str) -> jax.Array:
  """Per input, the mean entropy of the nets' predictions from conv_1's linear parts [B * N, ...].

  The bias and the ReLU come after the pooling: both commute with the
  maximum exactly (the same floats), and there are a quarter as many values.
  """
  pooled = nn.relu(model_lib.max_pool(terms) + params['conv_1']['bias'])
  logits = model_lib.resume_fn(params, {'activation': pooled}, None, 'conv_1', precision)
  return prediction_entropy(logits).reshape(count, -1).mean(axis=1)


def averaged_entropy(params: Params, image_terms: jax.Array, overlay_terms: jax.Array,
                     precision: str = model_lib.DEFAULT_PRECISION) -> jax.Array:
  """``entropy(..., blend='average')`` from conv_1's linear parts of the images and overlays.

  conv_1 is linear before its bias, so the average of two images gives the
  average of their conv_1 outputs: each image and each overlay goes through
  conv_1 once, not once per blend. The same sums in another order, so equal
  to ``entropy`` to float32 rounding.

  Args:
    params: the net B.
    image_terms: ``_conv_1_linear`` of the inputs, [B, H', W', C'].
    overlay_terms: ``_conv_1_linear`` of each input's overlays, [B, N, H', W', C'].
    precision: float32 precision of the net's products.
  """
  terms = 0.5 * image_terms[:, None] + 0.5 * overlay_terms
  return _mean_entropy(params, terms.reshape(-1, *terms.shape[2:]), image_terms.shape[0],
                       precision)


def _entropy_step(params_and_pool: tuple[Params, jax.Array], images: jax.Array,
                  draws: jax.Array, *, blend: str, precision: str) -> jax.Array:
  # The overlays (or their conv_1 terms) are gathered on the device from the
  # replicated pool: only the [b, N] indices travel with each batch.
  params, pool = params_and_pool
  if blend == 'average':
    return averaged_entropy(params, _conv_1_linear(params, images, precision), pool[draws],
                            precision)
  return entropy(params, images, pool[draws], blend, precision)


def _conv_1_step(params: Params, images: jax.Array, *, precision: str) -> jax.Array:
  return _conv_1_linear(params, images, precision)


def draw_overlays(count: int, pool_size: int, overlays: int, seed: int) -> np.ndarray:
  """int32 [count, overlays]: each input's overlays, indices into the pool (with replacement)."""
  return np.random.default_rng(seed).integers(0, pool_size, (count, overlays), dtype=np.int32)


def entropies(params: Params, images: np.ndarray, pool: np.ndarray,
              settings: Settings) -> np.ndarray:
  """Host images' STRIP entropies (float32 [M]), their overlays drawn from ``pool``.

  Batched and sharded like every evaluation; one compilation per (blend, N,
  batch size). For 'average' the pool's conv_1 terms are computed first and
  held on the device (183 KB an overlay), see ``averaged_entropy``.
  """
  precision = model_lib.check_precision(settings.precision)
  draws = draw_overlays(len(images), len(pool), settings.overlays, settings.seed)
  if settings.blend == 'average':
    pool = evaluate.map_batches(cache.bind(_conv_1_step, precision=precision), params, (pool,),
                                settings.batch_size)
  step = cache.bind(_entropy_step, blend=settings.blend, precision=precision)
  inputs_per_step = max(1, settings.batch_size // settings.overlays)
  return evaluate.map_batches(step, (params, pool), (images, draws), inputs_per_step)


def threshold(clean_entropies: np.ndarray, frr: float, rule: str = 'normal'
              ) -> tuple[float, float, float]:
  """(threshold, mean, std) from clean entropies, for a false-rejection rate of ``frr`` percent.

  'normal' (the paper's): the normal fitted by maximum likelihood (the mean
  and the population standard deviation, as ``scipy.stats.norm.fit`` in the
  paper's code), cut at its ``frr`` quantile; about ``frr`` % of clean inputs
  fall below it if their entropies are normal. 'quantile': the empirical
  ``frr`` percentile of the clean entropies (no assumption on their shape).
  An input with entropy below the threshold is flagged.
  """
  values = np.asarray(clean_entropies, np.float64)
  mean, std = float(values.mean()), float(values.std())
  if rule == 'quantile':
    return float(np.percentile(values, frr)), mean, std
  if rule != 'normal':
    raise ValueError(f'unknown threshold rule {rule!r}; expected one of {", ".join(RULES)}')
  if std == 0:  # every clean input alike: flag only what is below them all
    return mean, mean, std
  return statistics.NormalDist(mean, std).inv_cdf(frr / 100), mean, std


def flag(values: np.ndarray, cut: float) -> np.ndarray:
  """bool: flagged as poisoned (an entropy below the threshold ``cut``)."""
  return np.asarray(values) < cut


@dataclasses.dataclass(frozen=True)
class Detector:
  """STRIP's detector: images (uint8 [M, 55, 47, 3]) -> bool [M] flagged.

  Attributes:
    params: the net B.
    pool: the clean overlays (uint8 [P, 55, 47, 3]).
    threshold: entropies below it (bits) are flagged.
    settings: N, the blend, the seed of the draws, batching and precision.
  """
  params: Params
  pool: np.ndarray
  threshold: float
  settings: Settings

  def entropies(self, images: np.ndarray) -> np.ndarray:
    """The entropies ``__call__`` thresholds (float32 [M])."""
    return entropies(self.params, images, self.pool, self.settings)

  def __call__(self, images: np.ndarray) -> np.ndarray:
    return flag(self.entropies(images), self.threshold)


def split(labels: np.ndarray, overlay_fraction: float, seed: int
          ) -> tuple[np.ndarray, np.ndarray]:
  """Rows of the clean split (overlay pool, threshold inputs), class-stratified and seeded."""
  fit_rows, pool_rows = fine_pruning.holdout_split(labels, overlay_fraction, seed)
  if not len(fit_rows) or not len(pool_rows):
    raise DataError(f'{len(labels)} clean validation images leave {len(pool_rows)} overlays '
                    f'and {len(fit_rows)} inputs to fit the threshold to '
                    f'(strip.overlay_fraction={overlay_fraction}); STRIP needs at least two '
                    f'images of some class')
  return pool_rows, fit_rows


def defend(params: Params, clean: data.Dataset, config: config_lib.Config) -> base.Outcome:
  """The detector, its threshold fitted on part of ``clean``, overlays from the other part."""
  settings = Settings.from_config(config)
  pool_rows, fit_rows = split(clean.labels, config.strip.overlay_fraction, config.seed)
  pool = clean.images[pool_rows]
  fitted = entropies(params, clean.images[fit_rows], pool, settings)
  cut, mean, std = threshold(fitted, config.strip.frr, config.strip.threshold)
  figures = {
      'overlays': settings.overlays, 'blend': settings.blend, 'seed': settings.seed,
      'frr_target': float(config.strip.frr), 'rule': config.strip.threshold, 'threshold': cut,
      'normal_fit': {'mean': mean, 'std': std},
      'pool_images': len(pool_rows), 'fit_images': len(fit_rows),
      'valid_frr': evaluate.percent(flag(fitted, cut)),
      'pool_rows': [int(r) for r in pool_rows], 'fit_rows': [int(r) for r in fit_rows],
      'fit_entropies': [float(e) for e in fitted]}
  return base.Outcome({}, figures, detector=Detector(params, pool, cut, settings))


def rates(clean_flags: np.ndarray, poisoned_flags: np.ndarray) -> dict[str, float]:
  """A detector's rates in percent: false rejection (clean inputs flagged), false acceptance
  (poisoned inputs passed)."""
  return {'false_rejection_rate': evaluate.percent(np.asarray(clean_flags)),
          'false_acceptance_rate': evaluate.percent(~np.asarray(poisoned_flags, bool))}
