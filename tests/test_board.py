"""The leaderboard: the ablation grid summarised by kind of net, with intervals and resuming."""

import csv
import math
import pathlib
import statistics

import numpy as np
import pytest

from badnet import defences, runner
from badnet.errors import ConfigError
from badnet.io import board, keras_io
from badnet.jobs import ablate
from configs import leaderboard as leaderboard_config
from configs import strip as strip_config


def _rows(path: pathlib.Path) -> list[dict]:
  with path.open(newline='') as handle:
    return list(csv.DictReader(handle))


def test_the_interval_and_der_by_hand():
  mean, half = board.interval([1.0, 2.0, 3.0])  # sd 1, n 3: t(2) = 4.303
  assert mean == 2.0 and half == pytest.approx(4.303 / math.sqrt(3))
  mean, half = board.interval([10.0, 14.0])  # sd 2 * sqrt(2), n 2: t(1) = 12.706
  assert mean == 12.0 and half == pytest.approx(12.706 * 2.0)
  assert board.interval([5.0]) == (5.0, None)
  assert board.t975(35) == 2.042 and board.t975(500) == 1.96  # the next smaller df: wider
  # (max(0, 0.99 - 0.09) - max(0, 0.90 - 0.88) + 1) / 2 = 0.94
  assert board.der({'clean_acc': 90, 'asr': 99}, {'clean_acc': 88, 'asr': 9}) == pytest.approx(94)
  # Better accuracy and a higher ASR count as no change: 50.
  assert board.der({'clean_acc': 90, 'asr': 50}, {'clean_acc': 95, 'asr': 60}) == 50


def test_progress_estimates_the_time_left_from_each_defence_s_cells(capsys):
  progress = board.Progress(4)
  progress.plan(['a', 'a', 'b', 'b'])
  progress.step('a', 'net / a', 10.0)  # one a left (10 s), two b unknown (the mean, 10 s)
  progress.step('a', 'net2 / a', 20.0)  # two b left at the mean of 10 and 20
  progress.step('b', 'net / b', 100.0)  # one b left at b's own 100 s
  lines = capsys.readouterr().out.splitlines()
  assert lines == ['[1/4] net / a: 10 s; about 30 s left', '[2/4] net2 / a: 20 s; about 30 s left',
                   '[3/4] net / b: 100 s; about 2 min left']


def test_an_entry_names_a_defence_and_its_overrides():
  config = leaderboard_config.get_config()
  entry = ablate.parse_entry('anp:selection=holdout,finetune.epochs=3,max_clean_drop=2.5')
  settings = ablate.settings_of(config, entry)
  assert (settings.selection, settings.finetune.epochs, settings.max_clean_drop) == (
      'holdout', 3, 2.5)
  assert ablate.settings_of(config, ablate.parse_entry('anp')) == defences.get('anp').Settings()
  # A tuple's commas stay inside its value.
  entry = ablate.parse_entry('neural_cleanse:labels=(0, 7),slots=[2,3][0]')
  assert entry.overrides == (('labels', (0, 7)), ('slots', '[2,3][0]'))
  assert ablate.settings_of(config, ablate.parse_entry('neural_cleanse:labels=(0,7)')).labels == (
      0, 7)
  for text, message in (('nc', "config.defences: unknown defence 'nc'"),
                        ('anp:selection', "'selection' is not <field>=<value>"),
                        ('anp:lr=1', "config.anp has no field 'lr'"),
                        ('anp:selection=sideways',
                         "'anp:selection=sideways': config.anp.selection"),
                        ('pruning:layer=conv_4', 'the channel grid takes its settings')):
    with pytest.raises(ConfigError, match=message):
      ablate.settings_of(config, ablate.parse_entry(text))


@pytest.fixture(scope='module')
def two_nets(world, tmp_path_factory):
  """The world's net and a second of its shape (its fc_2 biases moved): two nets of one kind."""
  root, params = world
  other = tmp_path_factory.mktemp('nets') / 'other.h5'
  noise = np.random.default_rng(3).normal(0, 0.3, params['fc_2']['bias'].shape)
  moved = {**params, 'fc_2': {'kernel': params['fc_2']['kernel'],
                              'bias': params['fc_2']['bias'] + noise.astype(np.float32)}}
  keras_io.write_keras_weights(other, moved)
  return root, [root / 'bd_weights.h5', other]


def _board_config(root, nets, entries):
  config = leaderboard_config.get_config()
  config.models = tuple(str(net) for net in nets)
  config.data.dir = str(root / 'data')
  config.defences = entries
  config.thresholds = (2.0, 30.0)
  config.batch_size = 64
  config.strip.overlays = 20
  return config


def test_a_two_net_two_defence_board(two_nets, tmp_path):
  """Each net's rows as the defences' own jobs report them; the means and intervals by hand."""
  root, nets = two_nets
  out = tmp_path / 'board'
  runner.run(_board_config(root, nets, ('pruning', 'strip')), str(out))
  rows = _rows(out / 'ablation.csv')
  assert {(r['defence'], r['kind']) for r in rows} == {('pruning', 'given'), ('strip', 'given')}
  # STRIP's row on each net: what configs/strip.py reports for it.
  for net in nets:
    config = strip_config.get_config()
    config.model, config.data.dir, config.batch_size = str(net), str(root / 'data'), 64
    config.strip.overlays = 20
    rates = runner.run(config, str(tmp_path / f'strip_{net.stem}'))['test']['STRIP']
    row, = [r for r in rows if r['defence'] == 'strip' and r['model'] == str(net)]
    assert row['x'] == 'detector'
    assert float(row['frr']) == pytest.approx(rates['false_rejection_rate'], abs=1e-4)
    assert float(row['far']) == pytest.approx(rates['false_acceptance_rate'], abs=1e-4)
  for row in rows:
    if row['clean_acc']:  # DER by hand from B's and the pruned net's figures
      drop = lambda field: max(0.0, float(row[f'b_{field}']) - float(row[field])) / 100
      assert float(row['der']) == pytest.approx(100 * (drop('asr') - drop('clean_acc') + 1) / 2,
                                                abs=1e-3)
  table = _rows(out / 'leaderboard.csv')
  for x in ('2', '30'):
    group = [r for r in table if r['defence'] == 'pruning' and r['x'] == x]
    per_net = [r for r in group if r['model'] != 'mean']
    mean, = [r for r in group if r['model'] == 'mean']
    assert sorted(r['model'] for r in per_net) == sorted(map(str, nets)) and mean['nets'] == '2'
    for field in ('clean_acc', 'asr', 'der'):
      values = [float(r[field]) for r in per_net]
      assert float(mean[field]) == pytest.approx(statistics.fmean(values), abs=1e-3)
      assert float(mean[f'{field}_ci95']) == pytest.approx(
          12.706 * abs(values[0] - values[1]) / 2, abs=1e-3)
  markdown = (out / 'leaderboard.md').read_text()
  assert '## Repairing defences' in markdown and '## Detectors' in markdown
  assert '| pruning | X=30 | conv_3 | given | 2 |' in markdown
  assert 'Made ' in markdown and ' at commit ' in markdown
  assert (out / 'plots' / 'leaderboard.png').stat().st_size > 0


def test_a_rerun_with_a_new_defence_runs_only_its_cells(two_nets, tmp_path, monkeypatch):
  root, nets = two_nets
  out = tmp_path / 'board'
  runner.run(_board_config(root, nets, ('strip',)), str(out))
  before = _rows(out / 'ablation.csv')

  def not_again(*args, **kwargs):
    raise AssertionError('a cell that was done ran again')

  monkeypatch.setattr(defences.get('strip'), 'defend', not_again)
  runner.run(_board_config(root, nets, ('strip', 'pruning')), str(out))
  after = _rows(out / 'ablation.csv')
  assert [r for r in after if r['defence'] == 'strip'] == before
  assert {r['model'] for r in after if r['defence'] == 'pruning'} == set(map(str, nets))
