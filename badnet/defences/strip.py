"""STRIP, STRong Intentional Perturbation (Gao et al., ACSAC 2019): an input detector, as a plug-in.

A trigger forces the target class whatever else the image holds, so an input carrying it keeps
its prediction when clean images are superimposed on it, while a clean input's prediction
scatters. STRIP blends each input with N clean overlays and flags it when the mean entropy
(bits) of B's N predictions is below a threshold fitted to clean inputs only (``threshold``).
The clean validation split is divided into the overlay pool and the inputs the threshold is
fitted to, so no input is blended with itself; overlays are drawn with replacement from a seeded
generator, so the detector is deterministic. ``Outcome.detector`` is a ``Detector``.

Blends: 'add' (the default) is the paper's, the unclipped sum of two images (its notebook adds
float images with ``cv2.addWeighted``, which does not saturate floats), so B sees 0..510.
Departures, as named options: 'saturate' clips the sum at 255 (``cv2.addWeighted`` on uint8
images) and 'average' is 0.5 x + 0.5 o.
"""

import dataclasses
import pathlib
import statistics
import time
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from absl import logging

from badnet import config as config_lib
from badnet import defences
from badnet.core import cache, evaluate
from badnet.core import model as model_lib
from badnet.defences import base
from badnet.errors import ConfigError, DataError, ModelFileError
from badnet.io import entropy_plots, keras_io, tables, workdir
from badnet.io.tables import fmt

NAME = 'strip'
Params = model_lib.Params
BLENDS = ('add', 'saturate', 'average')
# Blends linear in their two images (weight of each): conv_1 before its bias is linear too, so
# each image and overlay goes through conv_1 once, not once per blend.
LINEAR_BLENDS = {'add': 1.0, 'average': 0.5}
RULES = ('normal', 'quantile')  # how the threshold is set (see ``threshold``)
TEST_FILES = REPORT_FILES = ('clean_test', 'poisoned_test')  # never the poisoned valid file


@dataclasses.dataclass(frozen=True)
class Settings:
  """STRIP's settings (config block ``strip``).

  Attributes:
    overlays: N, clean images superimposed on each input (paper: 100).
    frr: the false-rejection rate (%) the threshold is set for.
    overlay_fraction: of the clean validation split, the overlays; the rest fit the threshold.
    seed: the split and the overlays' draws.
    repaired: a repaired net (.h5) to compose with STRIP as GoodNet's B'; else
    goodnet_x: B'_X of the pruning defence at this X (0: no GoodNet).
  """
  overlays: int = 100
  frr: float = 1.0
  blend: str = 'add'
  threshold: str = 'normal'
  overlay_fraction: float = 0.5
  seed: int = 0
  repaired: str = ''
  goodnet_x: float = 2.0

  FIELDS: ClassVar[config_lib.Fields] = {
      'overlays': config_lib.Integer(1),
      'frr': config_lib.Number(0, 100, low_open=True, high_open=True),
      'blend': config_lib.Choice(BLENDS, 'blend'),
      'threshold': config_lib.Choice(RULES, 'threshold rule'),
      'overlay_fraction': config_lib.Number(0, 1, low_open=True, high_open=True),
      'seed': config_lib.Integer(),
      'repaired': config_lib.Text(),
      'goodnet_x': config_lib.Number(0, 100),
  }


def check(settings: Settings, config: config_lib.Config) -> None:
  if settings.repaired and not pathlib.Path(settings.repaired).is_file():
    raise ConfigError(f'config.strip.repaired: no such file {settings.repaired!r}')


@dataclasses.dataclass(frozen=True)
class Blending:
  """How inputs are perturbed and scored; ``batch_size`` counts blended images a forward pass."""
  overlays: int
  blend: str = 'add'
  seed: int = 0
  batch_size: int = 100
  precision: str = model_lib.DEFAULT_PRECISION


def superimpose(images: jax.Array, overlays: jax.Array, blend: str) -> jax.Array:
  """``images`` with ``overlays`` superimposed (broadcast against each other), float32 0..255."""
  images, overlays = jnp.asarray(images, jnp.float32), jnp.asarray(overlays, jnp.float32)
  if blend == 'saturate':
    return jnp.minimum(images + overlays, 255.0)
  if blend in LINEAR_BLENDS:
    return LINEAR_BLENDS[blend] * (images + overlays)
  raise ValueError(f'unknown blend {blend!r}; expected one of {", ".join(BLENDS)}')


def prediction_entropy(logits: jax.Array) -> jax.Array:
  """Shannon entropy in bits of softmax(logits) over the last axis (0 log 0 = 0)."""
  log_p = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1)
  # p * log p from log_softmax: finite where p underflows to 0 (the term is then 0).
  return -jnp.sum(jnp.exp(log_p) * log_p, axis=-1) / jnp.log(2.0)


def entropy(params: Params, images: jax.Array, overlays: jax.Array, blend: str = 'add',
            precision: str = model_lib.DEFAULT_PRECISION) -> jax.Array:
  """Each image's mean prediction entropy (bits) over its N blends, float32 [B] (pure).

  ``images`` is [B, H, W, C]; ``overlays`` [B, N, H, W, C], or [N, H, W, C] for every input.
  """
  count = images.shape[0]
  overlays = jnp.broadcast_to(overlays, (count, *overlays.shape[-4:]))
  blends = superimpose(images[:, None], overlays, blend)  # [B, N, H, W, C]
  terms = model_lib.linear(params, 'conv_1', blends.reshape(-1, *blends.shape[2:]), precision)
  return _mean_entropy(params, terms, count, precision)


def _mean_entropy(params: Params, terms: jax.Array, count: int, precision: str) -> jax.Array:
  """Per input, the mean entropy of the predictions from conv_1's linear parts [B * N, ...].

  The bias and ReLU follow the pooling: both commute with the maximum, on a quarter the values.
  """
  pooled = nn.relu(model_lib.max_pool(terms) + params['conv_1']['bias'])
  logits = model_lib.apply(params, {'activation': pooled}, start='conv_1', precision=precision)
  return prediction_entropy(logits).reshape(count, -1).mean(axis=1)


def linear_blend_entropy(params: Params, image_terms: jax.Array, overlay_terms: jax.Array,
                         blend: str, precision: str = model_lib.DEFAULT_PRECISION) -> jax.Array:
  """``entropy(..., blend)`` for a blend of ``LINEAR_BLENDS`` from conv_1's linear parts
  (``model.linear``) of images [B, ...] and their overlays [B, N, ...]."""
  terms = LINEAR_BLENDS[blend] * (image_terms[:, None] + overlay_terms)
  return _mean_entropy(params, terms.reshape(-1, *terms.shape[2:]), image_terms.shape[0],
                       precision)


def _entropy_step(params_and_pool: tuple[Params, jax.Array], images: jax.Array,
                  draws: jax.Array, *, blend: str, precision: str) -> jax.Array:
  # Overlays are gathered on the device from the replicated pool: only indices travel.
  params, pool = params_and_pool
  if blend in LINEAR_BLENDS:
    return linear_blend_entropy(params, model_lib.linear(params, 'conv_1', images, precision),
                                pool[draws], blend, precision)
  return entropy(params, images, pool[draws], blend, precision)


def _conv_1_step(params: Params, images: jax.Array, *, precision: str) -> jax.Array:
  return model_lib.linear(params, 'conv_1', images, precision)


def draw_overlays(count: int, pool_size: int, overlays: int, seed: int) -> np.ndarray:
  """int32 [count, overlays]: each input's overlays, indices into the pool (with replacement)."""
  return np.random.default_rng(seed).integers(0, pool_size, (count, overlays), dtype=np.int32)


def entropies(params: Params, images: np.ndarray, pool: np.ndarray,
              settings: Blending) -> np.ndarray:
  """Host images' STRIP entropies (float32 [M]), their overlays drawn from ``pool``."""
  precision = model_lib.check_precision(settings.precision)
  draws = draw_overlays(len(images), len(pool), settings.overlays, settings.seed)
  if settings.blend in LINEAR_BLENDS:
    pool = evaluate.map_batches(cache.bind(_conv_1_step, precision=precision), params, (pool,),
                                settings.batch_size)
  step = cache.bind(_entropy_step, blend=settings.blend, precision=precision)
  inputs_per_step = max(1, settings.batch_size // settings.overlays)
  return evaluate.map_batches(step, (params, pool), (images, draws), inputs_per_step)


def threshold(clean_entropies: np.ndarray, frr: float, rule: str = 'normal'
              ) -> tuple[float, float, float]:
  """(threshold, mean, std) from clean entropies, for a false-rejection rate of ``frr`` percent.

  'normal' (the paper's): the maximum-likelihood normal (as ``scipy.stats.norm.fit`` in the
  paper's code) cut at its ``frr`` quantile. 'quantile': the empirical ``frr`` percentile.
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
  """STRIP's detector: images (uint8 [M, 55, 47, 3]) -> bool [M], entropy below ``threshold``."""
  params: Params
  pool: np.ndarray
  threshold: float
  settings: Blending

  def entropies(self, images: np.ndarray) -> np.ndarray:
    """The entropies ``__call__`` thresholds (float32 [M])."""
    return entropies(self.params, images, self.pool, self.settings)

  def __call__(self, images: np.ndarray) -> np.ndarray:
    return flag(self.entropies(images), self.threshold)


def split(labels: np.ndarray, overlay_fraction: float, seed: int
          ) -> tuple[np.ndarray, np.ndarray]:
  """Rows of the clean split (overlay pool, threshold inputs), class-stratified and seeded."""
  fit_rows, pool_rows = base.holdout_split(labels, overlay_fraction, seed)
  if not len(fit_rows) or not len(pool_rows):
    raise DataError(f'{len(labels)} clean validation images leave {len(pool_rows)} overlays '
                    f'and {len(fit_rows)} inputs to fit the threshold to '
                    f'(strip.overlay_fraction={overlay_fraction}); STRIP needs at least two '
                    f'images of some class')
  return pool_rows, fit_rows


def defend(params: Params, clean: base.Clean, settings: Settings) -> base.Outcome:
  """The detector, fitted on clean data, and GoodNet's second net (a given file, or B'_X)."""
  blending = Blending(settings.overlays, settings.blend, settings.seed, clean.batch_size,
                      clean.precision)
  pool_rows, fit_rows = split(clean.labels, settings.overlay_fraction, settings.seed)
  pool = clean.images[pool_rows]
  fitted = entropies(params, clean.images[fit_rows], pool, blending)
  cut, mean, std = threshold(fitted, settings.frr, settings.threshold)
  figures = {
      'overlays': blending.overlays, 'blend': blending.blend, 'seed': blending.seed,
      'frr_target': float(settings.frr), 'rule': settings.threshold, 'threshold': cut,
      'normal_fit': {'mean': mean, 'std': std},
      'pool_images': len(pool_rows), 'fit_images': len(fit_rows),
      'valid_frr': evaluate.percent(flag(fitted, cut)),
      'pool_rows': [int(r) for r in pool_rows], 'fit_rows': [int(r) for r in fit_rows],
      'fit_entropies': [float(e) for e in fitted]}
  logging.info('STRIP: threshold %.4f bits from %d clean inputs x %d overlays.', cut,
               len(fit_rows), blending.overlays)
  candidates, figures['goodnet'] = _repaired_net(params, clean, settings)
  return base.Outcome(candidates, figures, detector=Detector(params, pool, cut, blending))


def _repaired_net(params: Params, clean: base.Clean, settings: Settings
                  ) -> tuple[dict[str, base.Candidate], dict | None]:
  """GoodNet's second net: ``settings.repaired``, or B'_X by the pruning defence on clean data."""
  if settings.repaired:
    repaired = keras_io.read_params(settings.repaired)
    if model_lib.num_classes_of(repaired) != model_lib.num_classes_of(params):
      raise ModelFileError(f'{settings.repaired}: {model_lib.num_classes_of(repaired)} classes, '
                           f'but the model has {model_lib.num_classes_of(params)}')
    return ({'repaired': base.Candidate(repaired, {}, {})},
            {'repaired': str(pathlib.Path(settings.repaired).resolve())})
  if not settings.goodnet_x:
    return {}, None
  pruning = defences.get('pruning')
  x = pruning.label(settings.goodnet_x)
  outcome = pruning.defend(params, clean, pruning.Settings(thresholds=(float(settings.goodnet_x),),
                                                           seed=settings.seed))
  if f'X={x}' not in outcome.candidates:
    return {}, {'pruning_x': settings.goodnet_x, 'reached': False}
  candidate = outcome.candidates[f'X={x}']
  return {'repaired': candidate}, {
      'pruning_x': settings.goodnet_x, 'reached': True, 'layer': outcome.figures['layer'],
      'channels_pruned': candidate.figures['channels_pruned'],
      'valid_clean_acc': candidate.figures['valid_clean_acc']}


def rates(clean_flags: np.ndarray, poisoned_flags: np.ndarray) -> dict[str, float]:
  """A detector's false rejection and false acceptance rates, in percent."""
  return {'false_rejection_rate': evaluate.percent(np.asarray(clean_flags)),
          'false_acceptance_rate': evaluate.percent(~np.asarray(poisoned_flags, bool))}


def report(outcome: base.Outcome, scorer, settings: Settings, out: pathlib.Path | None) -> dict:
  """STRIP, GoodNet and the two composed on the test split; entropies.npz and the plot."""
  detector, fixed = outcome.detector, outcome.figures
  start = time.perf_counter()
  scores = {key: scorer.gather(key, detector.entropies(scorer.splits[key].images))
            for key in TEST_FILES}
  logging.info('STRIP: %d test inputs x %d overlays in %.1f s.',
               sum(len(s) for s in scores.values()), fixed['overlays'],
               time.perf_counter() - start)
  b_classes = {key: scorer.b_classes(key) for key in TEST_FILES}
  flags = {'STRIP': {key: flag(scores[key], detector.threshold) for key in TEST_FILES}}
  if 'repaired' in outcome.candidates:
    repaired = outcome.candidates['repaired'].params
    flags['GoodNet'] = {key: b_classes[key] != scorer.predict(repaired, key)
                        for key in TEST_FILES}
    flags['STRIP or GoodNet'] = {key: flags['STRIP'][key] | flags['GoodNet'][key]
                                 for key in TEST_FILES}
  results = {
      'strip': {key: fixed[key] for key in ('overlays', 'blend', 'seed', 'frr_target', 'rule',
                                            'threshold', 'normal_fit', 'pool_images',
                                            'fit_images', 'valid_frr')},
      'base': {'test': _passed_figures(b_classes, scorer.labels, None)},
      'goodnet': fixed['goodnet'],
      'test': {name: {**rates(f['clean_test'], f['poisoned_test']),
                      **_passed_figures(b_classes, scorer.labels, f)}
               for name, f in flags.items()},
      'entropies_file': 'entropies.npz',
  }
  if out is not None:
    with workdir.atomic_path(out / results['entropies_file']) as tmp, open(tmp, 'wb') as handle:
      np.savez(handle, clean_valid_fit=np.asarray(fixed['fit_entropies'], np.float32), **scores)
    entropy_plots.plot_entropies(out / 'plots' / 'entropy.png',
                                 np.asarray(fixed['fit_entropies'], np.float32),
                                 scores['clean_test'], scores['poisoned_test'], results['strip'],
                                 results['test'])
  return results


def _passed_figures(b_classes: dict[str, np.ndarray], labels: dict[str, np.ndarray],
                    flags: dict[str, np.ndarray] | None) -> dict[str, float]:
  """B behind a detector, in % of all test inputs: clean inputs passed and classified right
  (clean_acc), poisoned inputs passed and given the target (asr)."""
  passed = lambda key: np.ones(len(labels[key]), bool) if flags is None else ~flags[key]
  return {'clean_acc': evaluate.percent(passed('clean_test')
                                        & (b_classes['clean_test'] == labels['clean_test'])),
          'asr': evaluate.percent(passed('poisoned_test')
                                  & (b_classes['poisoned_test'] == labels['poisoned_test']))}


def _threshold_sentence(fixed: dict) -> str:
  """How the threshold was set, in words."""
  fit = fixed['normal_fit']
  how = (f'a normal (mean {fit["mean"]:.4f}, std {fit["std"]:.4f}) fitted to the entropies of '
         f'{fixed["fit_images"]} other clean validation inputs, cut at'
         if fixed['rule'] == 'normal' else
         f'the percentile of the entropies of {fixed["fit_images"]} other clean validation '
         f'inputs at')
  return (f'Threshold {fixed["threshold"]:.4f} bits: {how} a false-rejection rate of '
          f'{fixed["frr_target"]:g} % ({fmt(fixed["valid_frr"])} % of those inputs fall below '
          f'it).')


def markdown(results: dict, printed: bool = False) -> str:
  """results.json as a readable report."""
  fixed, goodnet = results['strip'], results['goodnet']
  lines = [
      '# STRIP results', '',
      f'Model: `{results["model"]}`' + (' (shipped synthetic benchmark)'
                                        if results['synthetic_benchmark'] else ''), '',
      f'Each input superimposed with N = {fixed["overlays"]} clean validation images '
      f'(blend: {fixed["blend"]}; drawn from {fixed["pool_images"]} overlays). '
      f'{_threshold_sentence(fixed)}', '']
  if goodnet is None:
    lines += ['No GoodNet (goodnet_x = 0 and no repaired net given).', '']
  elif 'repaired' in goodnet:
    lines += [f'GoodNet: B and the repaired net `{goodnet["repaired"]}`.', '']
  elif goodnet['reached']:
    lines += [f'GoodNet: B and B\'_X, X = {goodnet["pruning_x"]:g} ({goodnet["channels_pruned"]} '
              f'{goodnet["layer"]} channels pruned by the pruning defence on clean validation '
              f'data).', '']
  else:
    lines += [f'No GoodNet: no pruning level drops clean accuracy by {goodnet["pruning_x"]:g} '
              f'points.', '']
  rows = [['B alone', '—', '—', fmt(results['base']['test']['clean_acc']),
           fmt(results['base']['test']['asr'])]]
  rows += [[name, fmt(r['false_rejection_rate']), fmt(r['false_acceptance_rate']),
            fmt(r['clean_acc']), fmt(r['asr'])] for name, r in results['test'].items()]
  lines += ['On the test split (a flagged input is refused; clean % and ASR % count the '
            'inputs B classifies behind the detector):', '',
            *tables.markdown(['detector', 'false rejection % (clean flagged)',
                              'false acceptance % (poisoned passed)', 'clean %', 'ASR %'],
                             rows, 'lrrrr')]
  return '\n'.join(lines) + '\n'
