"""Neural Cleanse end to end: triggers and flags on clean data, unlearning, then the report.

The defence sees the clean validation split only (the triggers optimised on
one part; their success, and the unlearning's epoch, judged on the other).
Only then are the test files and the poisoned validation file read, to report
B and the unlearned net (and its GoodNet) on them.
"""

import pathlib

from absl import logging
import ml_collections
import numpy as np

from badnet import config as config_lib
from badnet import pipeline
from badnet.benchmark import shipped
from badnet.core import evaluate, model
from badnet.defences import goodnet, neural_cleanse
from badnet.io import data, inputs, keras_io, tables, trigger_plots, workdir

FIELDS: config_lib.Fields = {**inputs.FIELDS, **neural_cleanse.FIELDS}
REPORT_FILES = ('clean_test', 'poisoned_valid', 'poisoned_test')
PRINTED_ROWS = 10  # the flagged labels and the smallest norms


def check(config: ml_collections.ConfigDict) -> None:
  """The labels against the net's classes (read from the model file, nothing else)."""
  if config.labels is None:
    return
  path = config.model or shipped.SHIPPED_NETS[config.benchmark]
  neural_cleanse.labels_of(config, model.num_classes_of(keras_io.read_params(path)))


def run(config: ml_collections.ConfigDict, out: pathlib.Path) -> dict:
  given, params, clean_valid, outcome, seconds = pipeline.defend_on_clean(neural_cleanse, config)
  num_classes = model.num_classes_of(params)
  logging.info('Neural Cleanse: done on clean data in %.1f s.', seconds)
  found = outcome.figures

  # Reporting from here on: the test and poisoned files are read now, and only now.
  splits = {key: data.load_csaw_h5(given.paths[key], num_classes) for key in REPORT_FILES}
  labels = {key: split.labels for key, split in splits.items()}
  predict = lambda net, key: evaluate.predict(net, splits[key].images, config.batch_size,
                                              precision=config.precision)
  b_classes = {key: predict(params, key) for key in splits}
  base_test, _ = goodnet.figures(b_classes, b_classes, labels, num_classes)
  asr = lambda classes: evaluate.percent(classes == labels['poisoned_valid'])
  results = {
      'model': str(given.model_path), 'synthetic_benchmark': given.synthetic,
      'data': inputs.recorded(given.paths), 'defence': neural_cleanse.NAME,
      **{key: value for key, value in found.items() if key != 'triggers'},
      'poisoned_targets': [int(t) for t in np.unique(labels['poisoned_test'])],
      'base': {'valid': {'clean_acc': evaluate.accuracy(params, clean_valid.images,
                                                       clean_valid.labels, config.batch_size,
                                                       precision=config.precision),
                         'asr': asr(b_classes['poisoned_valid'])},
               'test': base_test},
      'triggers_file': 'triggers.npz', 'defended': None}
  if outcome.recommended:
    candidate = outcome.candidates[outcome.recommended]
    classes = {key: predict(candidate.params, key) for key in splits}
    net, good = goodnet.figures(b_classes, classes, labels, num_classes)
    results['defended'] = {
        'candidate': outcome.recommended, 'unlearning': candidate.figures,
        'valid': {'clean_acc': candidate.figures['holdout_clean_acc'],
                  'asr': asr(classes['poisoned_valid'])},
        'test': net}
    results['goodnet'] = {'test': good}
    results['model_file'] = 'models/defended.h5'
    keras_io.write_keras(out / results['model_file'], candidate.params, full_model=True)
  else:
    results['not_defended'] = ('no label flagged' if not found['flagged'] else
                               'unlearning is off (unlearning.epochs = 0)')
  _write(out, results, found['triggers'], clean_valid.images[0])
  print(markdown(results, limit=PRINTED_ROWS), flush=True)
  return workdir.tidy(results)


def _write(out: pathlib.Path, results: dict, triggers: dict, example: np.ndarray) -> None:
  """triggers.npz, results.json, results.md and the two plots."""
  labels = np.asarray(triggers['labels'])
  norms = np.array([results['l1_norms'][str(label)] for label in labels])
  index = np.array([np.nan if results['anomaly_index'][str(label)] is None
                    else results['anomaly_index'][str(label)] for label in labels])
  flagged = np.isin(labels, results['flagged'])
  with workdir.atomic_path(out / results['triggers_file']) as tmp, open(tmp, 'wb') as handle:
    np.savez(handle, labels=labels, masks=triggers['masks'], patterns=triggers['patterns'],
             l1_norms=norms, anomaly_index=index, flagged=flagged)
  workdir.write_json(out / 'results.json', results)
  workdir.write_text(out / 'results.md', markdown(results))
  title = pathlib.Path(results['model']).name
  trigger_plots.plot_norms(out / 'plots' / 'l1_norms.png', labels, norms, flagged, index,
                           results['median_l1'], results['mad_l1'],
                           results['anomaly_threshold'], title)
  trigger_plots.plot_triggers(out / 'plots' / 'triggers.png', labels, triggers['masks'],
                              triggers['patterns'], norms, index, flagged, example, title)


def _fmt(value: float | None, digits: int = 2) -> str:
  return '—' if value is None else f'{value:.{digits}f}'


def markdown(results: dict, limit: int | None = None) -> str:
  """The results as text: the flags, the labels by norm (``limit`` rows), the nets' figures."""
  flagged = results['flagged']
  index = results['anomaly_index']
  named = ', '.join(f'{label} (anomaly index {_fmt(index[str(label)])})' for label in flagged)
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
  shown = by_norm if limit is None else by_norm[:max(limit, len(flagged))]
  lines += [('Every label' if limit is None else f'The {len(shown)} smallest norms') +
            ', smallest first:', '',
            *tables.markdown(
                ['label', 'L1 norm', 'anomaly index', 'flagged', 'trigger success % (held-out)',
                 'steps', 'found'],
                [[label, _fmt(results['l1_norms'][str(label)], 1), _fmt(index[str(label)]),
                  'yes' if label in flagged else '', _fmt(results['trigger_success'][str(label)]),
                  results['steps_run'][str(label)],
                  'yes' if results['found'][str(label)] else 'no'] for label in shown],
                'lrrlrrl'), '']
  base, defended = results['base'], results['defended']
  rows = [['B', _fmt(base['test']['clean_acc']), _fmt(base['test']['asr']), '—', '—']]
  if defended:
    good = results['goodnet']['test']
    rows += [['B unlearned', _fmt(defended['test']['clean_acc']), _fmt(defended['test']['asr']),
              '—', '—'],
             ['GoodNet (B, unlearned)', _fmt(good['clean_acc']), _fmt(good['asr']),
              _fmt(good['detection_rate']), _fmt(good['false_alarm_rate'])]]
    tuned = defended['unlearning']
    lines += [f'Unlearning: {tuned["stamped_images"]} of {results["optimisation_images"]} clean '
              f'images stamped with a flagged trigger (true labels kept); epoch '
              f'{tuned["chosen_epoch"]} chosen on held-out clean accuracy '
              f'({_fmt(tuned["holdout_clean_acc"])} %, B: {_fmt(results["b_holdout_acc"])} %); '
              'the reversed trigger\'s success after it (held-out): '
              + ', '.join(f'label {label} {_fmt(value)} %'
                          for label, value in tuned['trigger_success'].items()) + '.', '']
  else:
    lines += [f'Not defended: {results["not_defended"]}.', '']
  lines += ['On the test split (ASR on the poisoned test file, for reporting only):', '',
            *tables.markdown(['net', 'clean %', 'ASR %', 'detection %', 'false alarm %'], rows,
                             'lrrrr')]
  return '\n'.join(lines) + '\n'
