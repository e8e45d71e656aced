"""STRIP end to end: the detector fixed on clean data, then scored on the test split.

The defence sees the clean validation split only (overlays from one part,
the threshold fitted to the other). A GoodNet for the composed detector
comes from clean data too (a given repaired net, or the pruning defence's
B'_X). Only then are the test files read: the clean one for the
false-rejection rate, the poisoned one for the false-acceptance rate.
"""

import pathlib
import time

from absl import logging
import ml_collections
import numpy as np

from badnet import config as config_lib
from badnet import pipeline
from badnet.core import evaluate, model
from badnet.defences import pruning, strip
from badnet.errors import ConfigError, ModelFileError
from badnet.io import data, entropy_plots, inputs, keras_io, tables, workdir

FIELDS: config_lib.Fields = {
    **inputs.FIELDS, **strip.FIELDS,
    'repaired': config_lib.Text(),
    'goodnet_x': config_lib.Number(0, 100),
}
TEST_FILES = ('clean_test', 'poisoned_test')


def check(config: ml_collections.ConfigDict) -> None:
  if config.repaired and not pathlib.Path(config.repaired).is_file():
    raise ConfigError(f'config.repaired: no such file {config.repaired!r}')


def run(config: ml_collections.ConfigDict, out: pathlib.Path) -> dict:
  given, params, clean_valid, outcome, seconds = pipeline.defend_on_clean(strip, config)
  num_classes = model.num_classes_of(params)
  detector, fixed = outcome.detector, outcome.figures
  logging.info('STRIP: threshold %.4f bits from %d clean inputs x %d overlays in %.1f s.',
               fixed['threshold'], fixed['fit_images'], fixed['overlays'],
               seconds)
  repaired, goodnet = _repaired_net(params, clean_valid, config)

  # Reporting from here on: the test files are read now, and only now.
  splits = {key: data.load_csaw_h5(given.paths[key], num_classes) for key in TEST_FILES}
  start = time.perf_counter()
  scores = {key: detector.entropies(splits[key].images) for key in TEST_FILES}
  logging.info('STRIP: %d test inputs x %d overlays in %.1f s.',
               sum(len(s) for s in splits.values()), fixed['overlays'],
               time.perf_counter() - start)
  predict = lambda net, key: evaluate.predict(net, splits[key].images, config.batch_size,
                                              precision=config.precision)
  b_classes = {key: predict(params, key) for key in TEST_FILES}
  flags = {'STRIP': {key: strip.flag(scores[key], detector.threshold) for key in TEST_FILES}}
  if repaired is not None:
    flags['GoodNet'] = {key: b_classes[key] != predict(repaired, key) for key in TEST_FILES}
    flags['STRIP or GoodNet'] = {key: flags['STRIP'][key] | flags['GoodNet'][key]
                                 for key in TEST_FILES}
  labels = {key: splits[key].labels for key in TEST_FILES}
  results = {
      'model': str(given.model_path), 'synthetic_benchmark': given.synthetic,
      'data': inputs.recorded({key: given.paths[key] for key in ('clean_valid', *TEST_FILES)}),
      'defence': strip.NAME,
      'strip': {key: fixed[key] for key in ('overlays', 'blend', 'seed', 'frr_target', 'rule',
                                            'threshold', 'normal_fit', 'pool_images',
                                            'fit_images', 'valid_frr')},
      'base': {'test': _passed_figures(b_classes, labels, None)},
      'goodnet': goodnet,
      'test': {name: {**strip.rates(f['clean_test'], f['poisoned_test']),
                      **_passed_figures(b_classes, labels, f)} for name, f in flags.items()},
      'entropies_file': 'entropies.npz',
  }
  _write(out, results, np.asarray(fixed['fit_entropies'], np.float32), scores)
  return workdir.tidy(results)


def _repaired_net(params: model.Params, clean_valid: data.Dataset,
                  config: ml_collections.ConfigDict) -> tuple[model.Params | None, dict | None]:
  """GoodNet's second net: config.repaired, or B'_X by the pruning defence on clean data."""
  if config.repaired:
    repaired = keras_io.read_params(config.repaired)
    if model.num_classes_of(repaired) != model.num_classes_of(params):
      raise ModelFileError(f'{config.repaired}: {model.num_classes_of(repaired)} classes, but '
                           f'the model has {model.num_classes_of(params)}')
    return repaired, {'repaired': str(pathlib.Path(config.repaired).resolve())}
  if not config.goodnet_x:
    return None, None
  pruning_config = ml_collections.ConfigDict({
      'thresholds': (float(config.goodnet_x),), 'relative': False, 'order': 'increasing',
      'seed': config.seed, 'batch_size': config.batch_size, 'precision': config.precision})
  outcome = pruning.defend(params, clean_valid, pruning_config)
  name = f'X={pruning.label(config.goodnet_x)}'
  if name not in outcome.candidates:
    logging.warning('No pruning level drops clean accuracy by %s points: no GoodNet.',
                    pruning.label(config.goodnet_x))
    return None, {'pruning_x': config.goodnet_x, 'reached': False}
  candidate = outcome.candidates[name]
  return candidate.params, {'pruning_x': config.goodnet_x, 'reached': True,
                            'layer': outcome.figures['layer'],
                            'channels_pruned': candidate.figures['channels_pruned'],
                            'valid_clean_acc': candidate.figures['valid_clean_acc']}


def _passed_figures(b_classes: dict[str, np.ndarray], labels: dict[str, np.ndarray],
                    flags: dict[str, np.ndarray] | None) -> dict[str, float]:
  """B behind a detector, in percent of all test inputs: clean inputs passed and classified
  right (clean_acc), poisoned inputs passed and given the target (asr)."""
  passed = lambda key: np.ones(len(labels[key]), bool) if flags is None else ~flags[key]
  return {'clean_acc': evaluate.percent(passed('clean_test')
                                        & (b_classes['clean_test'] == labels['clean_test'])),
          'asr': evaluate.percent(passed('poisoned_test')
                                  & (b_classes['poisoned_test'] == labels['poisoned_test']))}


def _write(out: pathlib.Path, results: dict, fit_entropies: np.ndarray,
           scores: dict[str, np.ndarray]) -> None:
  """results.json, results.md, entropies.npz and plots/entropy.png; prints the table."""
  workdir.write_json(out / 'results.json', results)
  text = markdown(workdir.tidy(results))
  workdir.write_text(out / 'results.md', text)
  with workdir.atomic_path(out / results['entropies_file']) as tmp, open(tmp, 'wb') as handle:
    np.savez(handle, clean_valid_fit=fit_entropies, **scores)
  entropy_plots.plot_entropies(out / 'plots' / 'entropy.png', fit_entropies, scores['clean_test'],
                               scores['poisoned_test'], results['strip'], results['test'])
  print(text, flush=True)


def _fmt(value: float) -> str:
  return f'{value:.2f}'


def _threshold_sentence(fixed: dict) -> str:
  """How the threshold was set, in words."""
  fit = fixed['normal_fit']
  how = (f'a normal (mean {fit["mean"]:.4f}, std {fit["std"]:.4f}) fitted to the entropies of '
         f'{fixed["fit_images"]} other clean validation inputs, cut at'
         if fixed['rule'] == 'normal' else
         f'the percentile of the entropies of {fixed["fit_images"]} other clean validation '
         f'inputs at')
  return (f'Threshold {fixed["threshold"]:.4f} bits: {how} a false-rejection rate of '
          f'{fixed["frr_target"]:g} % ({_fmt(fixed["valid_frr"])} % of those inputs fall below '
          f'it).')


def markdown(results: dict) -> str:
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
  rows = [['B alone', '—', '—', _fmt(results['base']['test']['clean_acc']),
           _fmt(results['base']['test']['asr'])]]
  rows += [[name, _fmt(r['false_rejection_rate']), _fmt(r['false_acceptance_rate']),
            _fmt(r['clean_acc']), _fmt(r['asr'])] for name, r in results['test'].items()]
  lines += ['On the test split (a flagged input is refused; clean % and ASR % count the '
            'inputs B classifies behind the detector):', '',
            *tables.markdown(['detector', 'false rejection % (clean flagged)',
                              'false acceptance % (poisoned passed)', 'clean %', 'ASR %'],
                             rows, 'lrrrr')]
  return '\n'.join(lines) + '\n'
