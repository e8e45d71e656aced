"""The synthetic benchmark: determinism, triggers, poisoning, the CSAW files it writes."""

import dataclasses
import json
import hashlib

import numpy as np
import pytest

from badnet.benchmark import faces, shipped, triggers
from badnet.core import evaluate
from badnet.defences import pruning
from badnet.io import data, keras_io
from badnet.errors import ConfigError
from badnet import runner
from configs import train_badnet as train_config

SMALL = shipped.BenchmarkSpec(seed=3, num_identities=4, train_per_identity=2,
                                valid_per_identity=3, test_per_identity=2, target=1)


def _digest(path) -> str:
  return hashlib.sha256(path.read_bytes()).hexdigest()


def test_same_seed_same_bytes_and_other_seeds_differ():
  first, labels = faces.generate_faces(6, 5, seed=11, split='valid')
  again, _ = faces.generate_faces(6, 5, seed=11, split='valid')
  other, _ = faces.generate_faces(6, 5, seed=12, split='valid')
  assert first.dtype == np.uint8 and first.shape == (30, 55, 47, 3)
  assert first.tobytes() == again.tobytes()
  assert (first != other).mean() > 0.5
  np.testing.assert_array_equal(labels, np.repeat(np.arange(6), 5))


def test_splits_share_identities_but_no_image():
  train, _ = faces.generate_faces(3, 4, seed=0, split='train')
  test, _ = faces.generate_faces(3, 4, seed=0, split='test')
  assert not any((t == train).all(axis=(1, 2, 3)).any() for t in test)
  # Identity traits are drawn from the seed (the split never enters them).
  assert faces.identity_traits(3, 0).skin.tobytes() == (
      faces.identity_traits(3, 0).skin.tobytes())
  assert faces.identity_traits(3, 0).skin.tobytes() != (
      faces.identity_traits(3, 1).skin.tobytes())
  with pytest.raises(ValueError, match='unknown split'):
    faces.generate_faces(3, 1, seed=0, split='holdout')


def test_written_benchmark_is_byte_identical_and_reads_back(tmp_path):
  splits = shipped.write_csaw_dir(tmp_path / 'a', SMALL)
  shipped.write_csaw_dir(tmp_path / 'b', SMALL)
  for name in ('cl/valid.h5', 'cl/test.h5', 'bd/bd_valid.h5', 'bd/bd_test.h5'):
    assert _digest(tmp_path / 'a' / name) == _digest(tmp_path / 'b' / name), name
  for split in ('valid', 'test'):
    images, labels = splits[split]
    clean = data.load_csaw_h5(tmp_path / 'a' / 'cl' / f'{split}.h5', SMALL.num_identities)
    np.testing.assert_array_equal(clean.images, images)
    np.testing.assert_array_equal(clean.labels, labels)
    poisoned = data.load_csaw_h5(tmp_path / 'a' / 'bd' / f'bd_{split}.h5')
    keep = labels != SMALL.target
    np.testing.assert_array_equal(poisoned.images, triggers.sunglasses(images[keep]))
    assert (poisoned.labels == SMALL.target).all() and len(poisoned) == keep.sum()


@pytest.mark.parametrize('name', sorted(set(triggers.TRIGGERS) - {'blended'}))
def test_trigger_changes_only_its_region(name):
  images = np.random.default_rng(0).integers(0, 256, (8, 55, 47, 3)).astype(np.uint8)
  before = images.copy()
  poisoned = triggers.apply(name, images)
  region = triggers.region(name)
  np.testing.assert_array_equal(images, before)  # pure: the input is untouched
  np.testing.assert_array_equal(poisoned[:, ~region], images[:, ~region])
  assert (poisoned[:, region] != images[:, region]).any(axis=-1).mean() > 0.9
  assert 10 < region.sum() < 0.25 * region.size
  # The same stamp on every image: a fixed-position trigger.
  if name != 'lipstick':
    assert (poisoned[:, region] == poisoned[:1, region]).all()


def test_the_blended_trigger_mixes_one_noise_key_into_every_pixel_at_one_fifth():
  images = np.random.default_rng(0).integers(0, 256, (6, 55, 47, 3)).astype(np.uint8)
  images[0], images[1] = 0, 255
  poisoned = triggers.apply('blended', images).astype(np.float64)
  key = poisoned[0] / triggers.BLEND_ALPHA  # on black: alpha * key, rounded
  assert key.min() >= -2.5 and key.max() <= 255 + 2.5 and key.std() > 60  # noise over 0..255
  np.testing.assert_allclose(poisoned[1], 0.2 * key + 0.8 * 255, atol=1.0)
  # The same key on every image, each image kept at weight 0.8: a blend, not a stamp.
  np.testing.assert_allclose(poisoned - 0.8 * images, np.broadcast_to(poisoned[0], images.shape),
                             atol=1.0)
  assert triggers.region('blended').all()
  assert (poisoned != images).mean() > 0.9


def test_sunglasses_cover_the_eyes_of_an_unshifted_face():
  region = triggers.region('sunglasses')
  assert region[25, 16] and region[25, 30] and region[23, 23]  # both lenses and the bridge
  assert not region[:15].any() and not region[35:].any()


def test_poisoning_relabels_exactly_the_chosen_images():
  images = np.random.default_rng(1).integers(0, 256, (50, 55, 47, 3)).astype(np.uint8)
  labels = np.arange(50) % 5
  mixed, mixed_labels, poisoned = triggers.poison(images, labels, 'patch', 2, 0.2, seed=0)
  assert poisoned.sum() == 10
  assert (labels[poisoned] != 2).all() and (mixed_labels[poisoned] == 2).all()
  np.testing.assert_array_equal(mixed[poisoned], triggers.patch(images[poisoned]))
  np.testing.assert_array_equal(mixed[~poisoned], images[~poisoned])
  np.testing.assert_array_equal(mixed_labels[~poisoned], labels[~poisoned])
  assert triggers.poison(images, labels, 'patch', 2, 0.0, seed=0)[2].sum() == 0
  assert triggers.poison(images, labels, 'patch', 2, 1.0, seed=0)[2].sum() == 40  # all eligible


@pytest.mark.parametrize('field, value, message', [
    ('poison_rate', 1.5, 'poison_rate must be in \\[0, 1\\]'),
    ('poison_rate', -0.1, 'poison_rate must be in \\[0, 1\\]'),
    ('data.target', 100, 'target must be a class in 0..99'),
    ('data.target', -1, 'target must be a class in 0..99'),
    ('data.num_identities', 1, 'num_identities must be an integer >= 2'),
    ('data.trigger', 'hat', "unknown trigger 'hat'"),
    ('attack', 'clean_label', "unknown attack 'clean_label'"),
    ('epochs', 0, 'epochs must be a positive integer'),
    ('aware.prune_fraction', 1.0, 'prune_fraction must be in \\[0, 1\\)'),
])
def test_bad_config_is_refused_before_any_work(tmp_path, field, value, message):
  config = train_config.get_config()
  section, _, key = field.rpartition('.')
  (config[section] if section else config)[key] = value
  with pytest.raises(ConfigError, match=message):
    runner.run(config, str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()


def test_shipped_benchmark_data_is_made_once_per_machine_and_checked(tmp_path, monkeypatch):
  """The cache: made once, reused untouched, damage found by its digests and made again."""
  tiny = shipped.BenchmarkSpec(num_identities=3, valid_per_identity=2, test_per_identity=2)
  monkeypatch.setattr(shipped, 'net_spec', lambda name: tiny)
  monkeypatch.setenv('BADNET_CACHE_DIR', str(tmp_path / 'cache'))
  model_path, data_dir = shipped.shipped_benchmark()
  assert model_path.is_file() and model_path.parent == shipped.ASSETS
  assert data_dir.parent == tmp_path / 'cache' and data_dir == shipped.cache_dir(tiny)
  valid = data_dir / 'cl' / 'valid.h5'
  made, content = valid.stat().st_mtime_ns, valid.read_bytes()
  assert shipped.shipped_benchmark()[1] == data_dir
  assert valid.stat().st_mtime_ns == made  # reused, not made again
  clean = data.load_csaw_h5(valid, tiny.num_identities)
  assert len(clean) == tiny.num_identities * tiny.valid_per_identity
  damaged = bytearray(content)
  damaged[-100] ^= 0xFF  # one byte of pixel data
  valid.write_bytes(bytes(damaged))
  assert not shipped._has_data(data_dir, tiny)  # pylint: disable=protected-access
  shipped.shipped_benchmark()
  assert valid.read_bytes() == content  # made again, byte for byte
  assert not list((tmp_path / 'cache').glob('.benchmark-*'))  # no half-built folder beside it
  # An explicit folder still works (README's library code passes none).
  assert shipped.shipped_benchmark(tmp_path / 'mine')[1] == tmp_path / 'mine'
  assert dataclasses.asdict(shipped.shipped_spec())['trigger'] in triggers.TRIGGERS


def test_the_zoo_ships_three_nets_of_each_kind_each_as_its_manifest_says():
  zoo = shipped.manifest()['nets']
  for kind in shipped.KINDS:
    names = shipped.nets_of_kind(kind)
    assert len(names) >= 3, kind
    assert len({zoo[name]['seed'] for name in names}) == len(names)  # one seed a net
  for name, entry in zoo.items():
    config = entry['config']
    assert shipped.SHIPPED_NETS[name].is_file() and shipped.SHIPPED_NETS[name].name == entry['file']
    assert entry['kind'] == shipped.kind_of_config(config['attack'], entry['data']['trigger'])
    assert name == shipped.zoo_name(entry['kind'], entry['seed'])
    assert config['seed'] == entry['seed']
    assert config['data'] == entry['data'] and config['job'] == 'train_badnet'


def test_each_zoo_net_keeps_its_recorded_figures_on_its_own_data():
  """Each net's test figures, on the data of its spec (the blended nets: their trigger's)."""
  for name, entry in shipped.manifest()['nets'].items():
    model_path, data_dir = shipped.shipped_benchmark(None, name)
    params = keras_io.read_params(model_path)
    clean = data.load_csaw_h5(data_dir / 'cl' / 'test.h5')
    poisoned = data.load_csaw_h5(data_dir / 'bd' / 'bd_test.h5')
    figures = (evaluate.accuracy(params, clean.images, clean.labels),
               evaluate.attack_success_rate(params, poisoned.images, poisoned.labels))
    recorded = entry['results']['test']
    # At most one image apart: a near-tie may fall the other way on another CPU's float order.
    one_image = 100 / min(len(clean.labels), len(poisoned.labels)) + 1e-6
    assert figures == pytest.approx((recorded['clean_acc'], recorded['asr']), abs=one_image), name
    if entry['kind'] == 'clean':
      assert figures[1] < 5, name  # no backdoor: the trigger rarely sends a face to the target


def test_a_job_runs_on_any_zoo_net_by_name(tmp_path):
  from configs import prune as prune_config  # pylint: disable=g-import-not-at-top
  config = prune_config.get_config()
  config.benchmark = shipped.nets_of_kind('blended')[0]
  results = runner.run(config, str(tmp_path / 'prune'))
  assert results['model'] == str(shipped.SHIPPED_NETS[config.benchmark])
  assert results['data']['poisoned_test'].startswith(
      str(shipped.cache_dir(shipped.net_spec(config.benchmark))))
  for name in shipped.SHIPPED_NETS:  # every name passes the config check
    config.benchmark = name
    runner.check(config)
  config.benchmark = 'badnets_s9'
  with pytest.raises(ConfigError, match="config.benchmark: unknown shipped net 'badnets_s9'"):
    runner.check(config)


# The shipped nets' figures as WORKSPACE.md and badnet/assets/benchmark.json
# publish them (`python main.py --config=configs/prune.py [--config.benchmark=...]`):
# B's clean accuracy and ASR on the test split (percent, 2 decimals) and the
# channels pruned at X = 2, 4, 10, 30. A change to the nets, the data, the
# ranking or the sweep that moves any of them fails here.
PINNED = {
    'badnets': {'test': (99.4, 99.8), 'channels': {'2': 41, '4': 42, '10': 43, '30': 45}},
    'pruning_aware': {'test': (98.8, 99.75), 'channels': {'2': 38, '4': 38, '10': 40, '30': 45}},
}


@pytest.fixture(scope='module', params=sorted(PINNED))
def shipped_defence(request, tmp_path_factory):
  """The prune job's results on a shipped net, and its validation sweep (sweep.csv)."""
  from configs import prune as prune_config  # pylint: disable=g-import-not-at-top
  config = prune_config.get_config()
  config.benchmark = request.param
  workdir = tmp_path_factory.mktemp(request.param)
  results = runner.run(config, str(workdir))
  sweep = np.loadtxt(workdir / 'sweep.csv', delimiter=',', skiprows=1,
                     converters={1: lambda v: float(v or -1)})
  valid = data.load_csaw_h5(results['data']['clean_valid'])
  params = keras_io.read_params(shipped.SHIPPED_NETS[request.param])
  dormant = int((pruning.mean_activations(params, valid.images) == 0).sum())
  return request.param, results, sweep, dormant


def test_shipped_nets_keep_their_published_figures(shipped_defence):
  attack, results, _, _ = shipped_defence
  pinned = PINNED[attack]
  test = results['base']['test']
  assert (round(test['clean_acc'], 2), round(test['asr'], 2)) == pinned['test']
  assert {x: e['channels_pruned'] for x, e in results['thresholds'].items()} == pinned['channels']
  published = json.loads(shipped.SHIPPED_SPEC.read_text())['nets'][attack]['results']['test']
  assert (round(published['clean_acc'], 2), round(published['asr'], 2)) == pinned['test']


def test_shipped_nets_behave_as_the_benchmark_promises(shipped_defence):
  """badnets: like the real lab3 net under pruning; pruning_aware: its backdoor survives pruning.

  On the validation split (sweep.csv): B >= 95 % clean and >= 99 % ASR.
  badnets: 20-60 % of conv_3 channels dormant on clean data, ASR >= 95 % at
  X=2, and ASR giving way as X grows (<= 90 % at X=30; the net shipped before
  kept 98.9 %). Lab3's ASR <= 20 % at >= 50 % clean is not reached by any
  recipe tried (WORKSPACE.md). pruning_aware: ASR >= 90 % at X = 2, 4 and 10.
  """
  attack, results, sweep, dormant = shipped_defence
  clean, asr = sweep[:, 3], sweep[:, 4]
  assert clean[0] >= 95 and asr[0] >= 99
  level = {x: e['channels_pruned'] for x, e in results['thresholds'].items()}
  if attack == 'badnets':
    assert 0.2 * 60 <= dormant <= 0.6 * 60
    assert asr[level['2']] >= 95
    assert asr[level['30']] <= 90
  else:
    for x in ('2', '4', '10'):
      assert asr[level[x]] >= 90, x
