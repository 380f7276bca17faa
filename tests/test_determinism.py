"""Same seed, same result (CPU), and SIGTERM + rerun equals an uninterrupted run (SPEC §8).

Every run is a real `python bin/run.py` process on the built-in demo group at 64 px.
The training runs share the session's persistent JAX compilation cache (conftest.py), so
only the first one pays the compile.
"""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_PY = os.path.join(REPO, 'bin', 'run.py')
GROUP = 'cat_cup'  # the two-class demo group
# 6 steps, with the encoder fine-tuned (slower steps than the frozen default), so a SIGTERM
# after the first lands mid-run.
TOTAL_STEPS = 6
TRAIN = (f'--config.train.steps={TOTAL_STEPS}', '--config.train.freeze_encoder=False')
INTERRUPTED = 'interrupted; rerun the same command to resume from the last checkpoint'


def _cmd(workdir, *extra, quiet=True):
  return [sys.executable, RUN_PY, '--config=configs/two_class.py', f'--workdir={workdir}',
          '--config.data.image_size=64', '--config.infer.method=argmax',
          f'--config.output.quiet={quiet}', *extra]


def _run(cmd):
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr
  assert 'Traceback' not in proc.stderr
  return proc


def _outputs(workdir):
  """{relative path: bytes} of the label PNGs, plus the parsed metrics.json."""
  labels_dir = os.path.join(workdir, GROUP, 'labels')
  files = {}
  for name in sorted(os.listdir(labels_dir)):
    with open(os.path.join(labels_dir, name), 'rb') as f:
      files[name] = f.read()
  with open(os.path.join(workdir, 'metrics.json')) as f:
    return files, json.load(f)


def _loss_records(workdir):
  with open(os.path.join(workdir, GROUP, 'loss.jsonl')) as f:
    return [json.loads(line) for line in f if line.strip()]


@pytest.mark.slow
def test_clustering_baseline_is_deterministic(tmp_path):
  results = []
  for name in ('a', 'b'):
    _run(_cmd(tmp_path / name, '--config.baseline=cluster'))
    results.append(_outputs(tmp_path / name))
  (labels_a, metrics_a), (labels_b, metrics_b) = results
  assert len(labels_a) == 6
  assert labels_a == labels_b
  assert metrics_a == metrics_b


@pytest.mark.slow
def test_sigterm_checkpoints_and_the_rerun_equals_an_uninterrupted_run(tmp_path):
  """Also training determinism: the steps of two processes and of an uninterrupted one
  must agree bit for bit (losses, label PNGs, metrics)."""
  reference = tmp_path / 'uninterrupted'
  bars = _run(_cmd(reference, *TRAIN, quiet=False)).stderr
  assert [r['step'] for r in _loss_records(reference)] == list(range(1, TOTAL_STEPS + 1))
  # Not quiet: a progress bar with the elapsed<remaining time; quiet runs below have none.
  assert re.search(rf'train {GROUP}: +\d+%\|.*\| \d/{TOTAL_STEPS} \[[\d:]+<[\d:?]+', bars), bars

  workdir = tmp_path / 'interrupted'
  cmd = _cmd(workdir, *TRAIN)
  loss_log = workdir / GROUP / 'loss.jsonl'
  with open(tmp_path / 'stdout.txt', 'w') as stdout:
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=stdout, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 300
    # Still training once the first step is logged (it has TOTAL_STEPS - 1 to go).
    while not (loss_log.exists() and loss_log.read_text().strip()):
      assert proc.poll() is None, proc.stderr.read()
      assert time.monotonic() < deadline, 'no training step within 300 s'
      time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
  assert proc.returncode == 130, stderr
  assert 'Traceback' not in stderr
  assert stderr.strip().splitlines() == [INTERRUPTED]
  steps = [int(n) for n in os.listdir(workdir / GROUP / 'checkpoints') if n.isdigit()]
  stopped_at = max(steps)
  assert 1 <= stopped_at < TOTAL_STEPS
  assert len(_loss_records(workdir)) == stopped_at
  assert not (workdir / 'metrics.json').exists()

  assert f'train {GROUP}' not in _run(cmd).stderr  # quiet: no progress bar
  with open(workdir / 'run.log') as f:
    assert f'resumed from checkpoint at step {stopped_at}/{TOTAL_STEPS}' in f.read()
  assert _loss_records(workdir) == _loss_records(reference)
  assert _outputs(workdir) == _outputs(reference)


@pytest.mark.slow
def test_sigterm_outside_training_is_a_clean_stop(tmp_path):
  """SIGTERM while the run loads weights and data (no trainer signal handler yet)."""
  workdir = tmp_path / 'work'
  proc = subprocess.Popen(_cmd(workdir, '--config.baseline=cluster'), cwd=REPO,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  deadline = time.monotonic() + 120
  while not (workdir / 'run.log').exists():  # written once the run has started
    assert proc.poll() is None, proc.stderr.read()
    assert time.monotonic() < deadline, 'the run did not start within 120 s'
    time.sleep(0.01)
  proc.send_signal(signal.SIGTERM)
  _, stderr = proc.communicate(timeout=120)
  assert proc.returncode == 130, stderr
  assert stderr.strip().splitlines() == [INTERRUPTED]
  assert not (workdir / 'metrics.json').exists()
