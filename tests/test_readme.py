"""README.md's "As a library" section runs as written and computes what it says."""

import re

import numpy as np

from tests.conftest import REPO


def _library_code() -> str:
  readme = (REPO / 'README.md').read_text()
  section = readme[readme.index('## As a library'):]
  return re.search(r'```python\n(.*?)```', section, re.S).group(1)


def test_the_library_section_runs(tmp_path, monkeypatch, capsys):
  monkeypatch.chdir(tmp_path)
  names: dict = {}
  exec(compile(_library_code(), 'README.md', 'exec'), names)  # noqa: S102 (our own README)
  classes, fast = names['classes'], names['fast']
  assert classes.shape == fast.shape == (400, 61)
  np.testing.assert_array_equal(classes, fast)  # the general sweep and the fast one agree
  assert names['logits'].shape == (61, 8, 100)
  np.testing.assert_array_equal(np.argmax(names['b_prime_logits'], -1),  # start/stop: B'_45
                                np.argmax(names['logits'][45], -1))
  g = names['g']
  assert g.min() >= 0 and g.max() <= 100 and (g == classes[:, 0]).mean() > 0.5
  # Level 45 prunes the first 45 channels of the order: zero kernel slices and biases.
  pruned = names['order'][:45]
  assert not np.asarray(names['b_prime']['conv_3']['bias'])[pruned].any()
  assert not np.asarray(names['tuned']['conv_3']['kernel'])[..., pruned].any()
  outcome = names['outcome']
  assert list(outcome.candidates) == ['X=2', 'X=30']
  printed = capsys.readouterr().out.splitlines()
  assert [line.split()[0] for line in printed] == ['X=2', 'X=30']
  depths = [c.figures['channels_pruned'] for c in outcome.candidates.values()]
  assert depths[0] <= depths[1]
  assert (names['data_dir'] / 'cl' / 'valid.h5').is_file()
  assert all(len(nets) >= 3 for nets in names['zoo'].values()) and 'blended' in names['zoo']
  assert names['blended_trigger'] == 'blended'
