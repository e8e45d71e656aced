"""The prune job and the ablation grid as 2 processes (jax.distributed on localhost CPUs)
equal the 1-process runs."""

import csv
import os
import pathlib
import re
import shutil
import socket
import subprocess
import sys

import h5py
import numpy as np
import pytest

from badnet.core import distributed

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_row_ranges_split_every_file_into_contiguous_shares():
  for count in (1, 2, 7, 120, 12830):
    for processes in (1, 2, 3, 8):
      if count < processes:
        continue
      ranges = [distributed.row_range(count, p, processes) for p in range(processes)]
      assert ranges[0][0] == 0 and ranges[-1][1] == count
      assert all(stop == start for (_, stop), (start, _) in zip(ranges, ranges[1:]))
      sizes = [stop - start for start, stop in ranges]
      assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1


def test_gather_rows_is_the_identity_on_one_process():
  local = {'a': np.arange(6).reshape(3, 2), 'b': np.array([1, 2, 3])}
  assert distributed.gather_rows(local, 3) is local


def _free_port() -> int:
  with socket.socket() as sock:
    sock.bind(('localhost', 0))
    return sock.getsockname()[1]


def _job(workdir: pathlib.Path, world_root: pathlib.Path, *extra: str) -> list[str]:
  return [sys.executable, 'main.py', '--config=configs/prune.py',
          f'--config.model={world_root / "bd_weights.h5"}',
          f'--config.data.dir={world_root / "data"}', '--config.batch_size=32',
          f'--workdir={workdir}', *extra]


def _grid(workdir: pathlib.Path, world_root: pathlib.Path, *extra: str) -> list[str]:
  """A small ablation grid of two cells (conv_3 and conv_4 of one net)."""
  return [sys.executable, 'main.py', '--config=configs/ablate.py',
          f'--config.models=("{world_root / "bd_weights.h5"}",)',
          f'--config.data.dir={world_root / "data"}', '--config.batch_size=32',
          '--config.orders=("increasing", "random")', '--config.seeds=(0,)',
          '--config.thresholds=(2.0, 30.0)', '--config.finetune_epochs=(0,)',
          f'--workdir={workdir}', *extra]


def _run_two(workdir: pathlib.Path, root: pathlib.Path, env: dict, command=_job
             ) -> list[tuple[int, str, str]]:
  """The job as 2 processes: (exit code, stdout, stderr) of each."""
  address = f'localhost:{_free_port()}'
  processes = [subprocess.Popen(
      command(workdir, root, '--num_processes=2', f'--process_id={index}',
              f'--coordinator_address={address}'),
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for index in range(2)]
  results = []
  for process in processes:
    try:
      stdout, stderr = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
      for other in processes:
        other.kill()
      pytest.fail('the 2-process job did not finish in 300 s')
    results.append((process.returncode, stdout, stderr))
  return results


def test_bad_rows_in_one_process_share_stop_both_processes(world, tmp_path):
  """NaN in process 1's half of a file: it says so, process 0 names it; neither hangs."""
  root, _ = world
  shutil.copytree(root / 'data', tmp_path / 'data')
  shutil.copy(root / 'bd_weights.h5', tmp_path / 'bd_weights.h5')
  with h5py.File(tmp_path / 'data' / 'cl' / 'valid.h5', 'r+') as handle:
    handle['data'][100, 0, 0, 0] = np.nan  # row 100 of 120: process 1 reads rows 60..119
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': ''}
  (code_0, _, err_0), (code_1, _, err_1) = _run_two(tmp_path / 'out', tmp_path, env)
  assert code_1 == 1 and 'NaN or inf (first in image 100)' in err_1, err_1[-2000:]
  assert code_0 == 1 and 'process 1 of 2 stopped on an error' in err_0, err_0[-2000:]
  assert 'Traceback' not in err_0 + err_1


def _one_then_two(tmp_path: pathlib.Path, root: pathlib.Path, command
                  ) -> list[tuple[int, str, str]]:
  """``command`` as one process into tmp_path/one, then as two into tmp_path/two; both succeed."""
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': ''}
  one = subprocess.run(command(tmp_path / 'one', root), cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=300, check=False)
  assert one.returncode == 0, one.stderr[-3000:]
  results = _run_two(tmp_path / 'two', root, env, command)
  for code, _, stderr in results:
    assert code == 0, stderr[-3000:]
  return results


def test_two_processes_give_the_one_process_results(world, tmp_path):
  root, _ = world
  results = _one_then_two(tmp_path, root, _job)
  outputs = [(stdout, stderr) for _, stdout, stderr in results]

  # Each process read only its half of every file (120 clean, 60 poisoned images each).
  for (_, stderr), (first, second) in zip(outputs, ((60, 30), (60, 30))):
    loaded = re.search(r'Loaded .*', stderr).group(0)
    assert f'clean_valid: {first} of 120 images' in loaded, loaded
    assert f'poisoned_test: {second} of 60 images' in loaded, loaded
  # Process 0 printed the table and wrote; process 1 neither.
  assert '| X |' in outputs[0][0] and '| X |' not in outputs[1][0]
  for name in ('sweep.csv', 'results.json'):
    assert (tmp_path / 'two' / name).read_bytes() == (tmp_path / 'one' / name).read_bytes(), name
  assert sorted(p.name for p in (tmp_path / 'two' / 'models').iterdir()) == sorted(
      p.name for p in (tmp_path / 'one' / 'models').iterdir())


def test_an_ablation_grid_split_over_two_processes_gives_the_one_process_rows(world, tmp_path):
  """Each process runs one of the two cells; process 0 writes the same tables as one process."""
  root, _ = world
  results = _one_then_two(tmp_path, root, _grid)
  for _, _, stderr in results:
    assert '(1 of 2 cells on this process)' in stderr, stderr[-3000:]
  assert 'conv_3:' in results[0][1] and 'conv_4:' in results[1][1]  # who ran which cell
  # Equal but for the time each row's cell had taken.
  untimed = lambda run: [{k: v for k, v in row.items() if k != 'seconds'}
                         for row in csv.DictReader((tmp_path / run / 'ablation.csv').open())]
  assert untimed('two') == untimed('one')
  curves = lambda run: (tmp_path / run / 'curves.csv').read_bytes()
  assert curves('two') == curves('one')
  assert len((tmp_path / 'one' / 'ablation.csv').read_text().splitlines()) == 1 + 2 * 2 * 2
