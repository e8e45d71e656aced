"""benchmarks/device_check.py in its CPU-only form: it runs, says so, and finds no mismatch."""

import importlib.util
import json
import pathlib

import jax
import pytest

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / 'benchmarks' / 'device_check.py'


@pytest.mark.skipif(jax.default_backend() != 'cpu', reason='the CPU-only form')
def test_device_check_runs_on_a_cpu_alone(csaw_dir, tmp_path, capsys, monkeypatch):
  monkeypatch.setenv('BADNET_CSAW_DIR', str(csaw_dir))
  spec = importlib.util.spec_from_file_location('device_check', SCRIPT)
  device_check = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(device_check)
  out = tmp_path / 'check.json'
  report = device_check.main([f'--out={out}', f'--data_root={tmp_path / "data"}', '--size=120',
                              f'--model={csaw_dir / "lab3_bd_weights.h5"}'])
  assert 'No GPU or TPU' in capsys.readouterr().out
  assert json.loads(out.read_text()) == report
  assert not report['accelerator'] and report['backend'] == 'cpu'
  assert report['prune_job']['wall_s'] > 0 and report['timings']['train_images_per_s'] > 0
  # Every array of classes was compared, and the same code on the same CPU agrees exactly.
  assert set(report['mismatches']) == set(report['entries'])
  assert report['entries']['sweep/clean_valid'] == 120 * 61  # every image at every level
  assert not any(report['mismatches'].values()), report['mismatches']
