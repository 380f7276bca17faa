"""Flag sweeps: grid expansion, naming, skip/resume, failures, tables, one real sweep.

Run mechanics use this file as a stand-in for bin/run.py (same flags; it writes a
metrics.json shaped by coseg_jax.metrics from its overrides and records how it was
started); the last test runs a real two-run sweep of bin/sweep.py.
"""
import csv
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from coseg_jax.cli import flags
from coseg_jax.cli import sweep
from coseg_jax.core.errors import InputError
from coseg_jax.multiclass import metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, 'configs', 'three_class.py')
STUB = [sys.executable, os.path.abspath(__file__)]


def _stub_metrics(lr):
  """metrics.json of a run: group scores derived from the learning rate."""
  groups = {g: {'P': lr * s, 'J': lr * s / 2, 'J_pooled': lr * s / 3}
            for g, s in (('cats', 1.0), ('cups', 2.0))}
  return {'method': 'stub', **metrics.summarize(groups)}


def _stub_run(argv):
  """Stands in for bin/run.py: `--workdir=DIR --config.k=v ...`, exit 0 with metrics.json."""
  args = dict(a[2:].split('=', 1) for a in argv)
  workdir = args['workdir']
  os.makedirs(workdir, exist_ok=True)

  def note(**record):
    with open(os.path.join(workdir, 'calls.jsonl'), 'a') as f:
      f.write(json.dumps(record) + '\n')

  def on_sigterm(signum, frame):
    del frame
    note(event='terminated', signum=signum)
    sys.exit(130)

  signal.signal(signal.SIGTERM, on_sigterm)
  note(event='start', time=time.time(), quiet=args.get('config.output.quiet'), argv=argv,
       resumed=os.path.exists(os.path.join(workdir, 'checkpoint')),
       env={k: os.environ.get(k) for k in ('CUDA_VISIBLE_DEVICES', 'XLA_PYTHON_CLIENT_PREALLOCATE')})
  lr = args['config.train.learning_rate']
  if lr == 'nan':
    print('training...\nerror: train cats: loss is nan at step 1', file=sys.stderr)
    sys.exit(1)
  # Long enough that the runs of a parallel sweep overlap even on a loaded machine.
  time.sleep(1.0 * int(args.get('config.train.epochs', '0')))
  with open(os.path.join(workdir, 'metrics.json'), 'w') as f:
    json.dump(_stub_metrics(float(lr)), f)
  note(event='end', time=time.time())


def _calls(workdir):
  path = os.path.join(workdir, 'calls.jsonl')
  if not os.path.exists(path):
    return []
  return [json.loads(l) for l in open(path)]


def test_grid_expansion_and_names():
  grid = sweep.parse_grid(['model.attention=none,sa_ma', 'infer.method=argmax,crf'])
  assert grid == [('model.attention', ('none', 'sa_ma')), ('infer.method', ('argmax', 'crf'))]
  runs = sweep.expand(grid)
  assert [r.name for r in runs] == ['attention=none,method=argmax', 'attention=none,method=crf',
                                    'attention=sa_ma,method=argmax', 'attention=sa_ma,method=crf']
  assert runs[3].overrides == (('model.attention', 'sa_ma'), ('infer.method', 'crf'))
  # Same last component: the names keep enough of the key; unsafe characters are replaced.
  runs = sweep.expand(sweep.parse_grid(['train.eps=1e-8', 'loss.eps=1', 'data.root=/d/a b']))
  assert [r.name for r in runs] == ['train.eps=1e-8,loss.eps=1,root=_d_a_b']
  assert [r.name for r in sweep.expand([])] == ['base']
  with pytest.raises(InputError, match='several runs would be named seed=1'):
    sweep.expand(sweep.parse_grid(['seed=1,1']))
  for bad in ('model.attention', 'x=1,,2', '=1', 'a..b=1'):
    with pytest.raises(InputError, match='--grid'):
      sweep.parse_grid([bad])


def test_keys_are_checked_against_the_config():
  config = flags.load_config(CONFIG)
  flags.check_keys(config, ['model.attention', 'infer.crf.iterations', 'data.root'], CONFIG)
  for keys in (['model.atention'], ['model.attention.x'], ['seed', 'seed']):
    with pytest.raises(InputError):
      flags.check_keys(config, keys, CONFIG)
  with pytest.raises(InputError, match='no such config file'):
    flags.load_config(CONFIG + '.missing')


def test_command_is_quiet_and_grid_wins():
  run = sweep.Run('seed=2', (('seed', '2'),))
  cmd = sweep.run_command(['python', 'run.py'], 'c.py', 'w/seed=2', [('seed', '1')], run)
  assert cmd == ['python', 'run.py', '--config=c.py', '--workdir=w/seed=2',
                 '--config.output.quiet=True', '--config.seed=1', '--config.seed=2']


def _write_metrics(path, labels_offset):
  """A real metrics.summarize() of two groups scored from tiny label maps."""
  gt = np.array([[0, 1], [2, 2]], np.uint8)
  pred = (gt + labels_offset) % 3
  groups = {name: metrics.score_group([pred, gt], [gt, gt], 2, fixed_background=False)
            for name in ('cats', 'cups')}
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w') as f:
    json.dump({'method': 'x', **metrics.summarize(groups)}, f)
  return groups


def test_table_markdown_and_csv_from_metrics_files(tmp_path):
  runs = sweep.expand(sweep.parse_grid(['model.attention=none,sa', 'infer.method=crf']))
  groups = _write_metrics(str(tmp_path / runs[0].name / 'metrics.json'), 1)
  # runs[1] has no metrics.json (failed): its metric cells are missing.
  columns, rows = sweep.table(runs, str(tmp_path))
  assert columns == ['model.attention', 'infer.method', 'P', 'J', 'J_pooled',
                     'cats:P', 'cats:J', 'cats:J_pooled', 'cups:P', 'cups:J', 'cups:J_pooled']
  assert rows[0][:2] == ['none', 'crf']
  assert rows[0][2] == pytest.approx(groups['cats']['P'])
  assert rows[0][6] == pytest.approx(groups['cats']['J'])
  assert rows[1] == ['sa', 'crf'] + [None] * 9

  md = sweep.to_markdown(columns, rows, 2).splitlines()
  assert md[0].startswith('| model.attention | infer.method | P | J |')
  assert md[1] == '|---|---|' + '---:|' * 9
  assert md[2].startswith(f'| none | crf | {groups["cats"]["P"]:.3f} | ')
  assert md[3] == '| sa | crf |' + ' - |' * 9

  parsed = list(csv.reader(sweep.to_csv(columns, rows, runs).splitlines()))
  assert parsed[0] == ['run'] + columns
  assert parsed[1][0] == 'attention=none,method=crf'
  assert float(parsed[1][3]) == groups['cats']['P']          # full precision
  assert parsed[2][3:] == [''] * 9


def test_sweep_runs_skips_resumes_and_reports_failures(tmp_path, capsys, monkeypatch):
  monkeypatch.setenv('CUDA_VISIBLE_DEVICES', '4,5')
  sdir = str(tmp_path / 'sweep')
  grid = ['train.learning_rate=0.1,0.2,0.3,nan']
  # 0.2 finished earlier (its metrics.json exists); 0.3 was interrupted (checkpoint only).
  os.makedirs(os.path.join(sdir, 'learning_rate=0.2'))
  with open(os.path.join(sdir, 'learning_rate=0.2', 'metrics.json'), 'w') as f:
    json.dump(_stub_metrics(0.25), f)
  os.makedirs(os.path.join(sdir, 'learning_rate=0.3'))
  open(os.path.join(sdir, 'learning_rate=0.3', 'checkpoint'), 'w').close()

  rc = sweep.run_cli(CONFIG, grid, ['train.epochs=3'], sdir, STUB, parallel=2, gpus_per_run=1)
  out = capsys.readouterr().out
  assert rc == 1
  assert 'sweep: 4 runs, 1 already finished, 3 to run' in out
  assert ("FAILED learning_rate=nan (exit 1): error: train cats: loss is nan at step 1" in out)

  calls = {lr: _calls(os.path.join(sdir, f'learning_rate={lr}')) for lr in ('0.1', '0.2', '0.3')}
  assert calls['0.2'] == []                                   # finished: not started again
  assert calls['0.3'][0]['resumed'] and not calls['0.1'][0]['resumed']
  starts = [c[0] for c in (calls['0.1'], calls['0.3'])]
  assert all(s['quiet'] == 'True' for s in starts)
  # The first two runs overlapped, in two slots of one GPU each from CUDA_VISIBLE_DEVICES.
  assert max(s['time'] for s in starts) < min(c[1]['time'] for c in (calls['0.1'], calls['0.3']))
  assert sorted(s['env']['CUDA_VISIBLE_DEVICES'] for s in starts) == ['4', '5']

  lines = open(os.path.join(sdir, 'results.md')).read().splitlines()
  assert lines[0] == '| train.learning_rate | P | J | J_pooled | cats:P | cats:J | cats:J_pooled ' \
                     '| cups:P | cups:J | cups:J_pooled |'
  assert lines[2].startswith('| 0.1 | 0.150 | 0.075 | 0.050 | 0.100 |')
  assert lines[3].startswith('| 0.2 | 0.375 |')                # the earlier result, kept
  assert lines[5] == '| nan |' + ' - |' * 9
  assert lines[2] in out

  # Rerun: everything but the failed run is skipped; the failed one is retried.
  rc = sweep.run_cli(CONFIG, grid, ['train.epochs=3'], sdir, STUB)
  assert rc == 1
  assert 'sweep: 4 runs, 3 already finished, 1 to run' in capsys.readouterr().out
  assert len(_calls(os.path.join(sdir, 'learning_rate=0.1'))) == 2   # start + end, once
  # Other base settings would silently mix with the finished runs.
  with pytest.raises(InputError, match='use another --workdir'):
    sweep.sweep(CONFIG, grid, ['train.epochs=4'], sdir, STUB)


def test_parallel_runs_share_the_accelerator_without_preallocation(tmp_path):
  sdir = str(tmp_path)
  outcomes, _ = sweep.sweep(CONFIG, ['train.learning_rate=0.1,0.2'], [], sdir, STUB, parallel=2)
  assert [o.status for o in outcomes] == ['done', 'done']
  env = _calls(os.path.join(sdir, 'learning_rate=0.1'))[0]['env']
  assert env == {'CUDA_VISIBLE_DEVICES': os.environ.get('CUDA_VISIBLE_DEVICES'),
                 'XLA_PYTHON_CLIENT_PREALLOCATE': 'false'}


def test_interrupt_forwards_one_sigterm_to_running_runs(tmp_path, monkeypatch):
  workdir = str(tmp_path / 'learning_rate=0.1')
  runs = sweep.expand(sweep.parse_grid(['train.learning_rate=0.1']))

  def make_cmd(run, wd):
    return sweep.run_command(STUB, CONFIG, wd, [('train.epochs', '300')], run)

  real_sleep = time.sleep

  def interrupt_once_started(seconds):
    del seconds
    while not _calls(workdir):       # the stub has installed its SIGTERM handler
      real_sleep(0.05)
    raise KeyboardInterrupt

  monkeypatch.setattr(time, 'sleep', interrupt_once_started)
  with pytest.raises(KeyboardInterrupt):
    sweep.execute(runs, str(tmp_path), make_cmd)
  calls = _calls(workdir)
  assert [c['event'] for c in calls] == ['start', 'terminated']
  assert calls[1]['signum'] == signal.SIGTERM
  assert not os.path.exists(os.path.join(workdir, 'metrics.json'))


def test_grid_order_is_stable():
  specs = ['model.attention=none,sa', 'infer.method=argmax,crf', 'seed=0,1']
  runs = sweep.expand(sweep.parse_grid(specs))
  assert runs == sweep.expand(sweep.parse_grid(specs))
  # First axis slowest, values in the order given: index i is the same on every machine.
  assert [r.name for r in runs[:3]] == ['attention=none,method=argmax,seed=0',
                                        'attention=none,method=argmax,seed=1',
                                        'attention=none,method=crf,seed=0']
  assert runs[7].overrides == (('model.attention', 'sa'), ('infer.method', 'crf'), ('seed', '1'))
  lines = sweep.format_list(runs).splitlines()
  assert len(lines) == 8 and lines[7] == ('7  attention=sa,method=crf,seed=1  '
                                          '--config.model.attention=sa --config.infer.method=crf '
                                          '--config.seed=1')


def test_bin_sweep_list_and_task_index_from_slurm(tmp_path):
  base = [sys.executable, os.path.join(ROOT, 'bin', 'sweep.py'), f'--config={CONFIG}',
          '--grid=model.attention=none,sa', f'--workdir={tmp_path}']
  listed = subprocess.run(base + ['--list'], capture_output=True, text=True, cwd=ROOT)
  assert listed.returncode == 0
  assert listed.stdout.splitlines()[1] == '1  attention=sa  --config.model.attention=sa'
  env = {**os.environ, 'SLURM_ARRAY_TASK_ID': '2'}
  bad = subprocess.run(base, capture_output=True, text=True, cwd=ROOT, env=env)
  assert bad.returncode == 2 and 'task index 2: the grid has 2 runs' in bad.stderr


def test_task_index_from_the_schedulers_variables():
  env = sweep.task_index_from_env
  assert env({}) is None
  assert env({'SLURM_ARRAY_TASK_ID': '3'}) == (3, '$SLURM_ARRAY_TASK_ID=3')
  assert env({'PBS_ARRAY_INDEX': '2'})[0] == 2 and env({'PBS_ARRAYID': '2'})[0] == 2
  assert env({'SGE_TASK_ID': '1'})[0] == 0 and env({'LSB_JOBINDEX': '4'})[0] == 3  # 1-based
  assert env({'SGE_TASK_ID': 'undefined'}) is None and env({'LSB_JOBINDEX': '0'}) is None
  assert env({'AWS_BATCH_JOB_ARRAY_INDEX': '5'})[0] == 5
  assert env({'CLOUD_RUN_TASK_INDEX': '6'})[0] == 6 and env({'JOB_COMPLETION_INDEX': '1'})[0] == 1
  assert env({'SGE_TASK_ID': '2', 'SLURM_ARRAY_TASK_ID': '7'})[0] == 7  # SLURM first
  with pytest.raises(InputError, match='SLURM_ARRAY_TASK_ID=x: not a task index'):
    env({'SLURM_ARRAY_TASK_ID': 'x'})
  with pytest.raises(InputError, match='counts from 1'):
    env({'SGE_TASK_ID': '0'})
  resolve = sweep.resolve_task_index
  assert resolve(None, {}) == (None, 'the whole grid')
  assert resolve(None, {'SLURM_ARRAY_TASK_ID': '1'})[0] == 1
  assert resolve('all', {'SLURM_ARRAY_TASK_ID': '1'})[0] is None
  assert resolve('4', {'SLURM_ARRAY_TASK_ID': '1'}) == (4, '--task_index=4')
  with pytest.raises(InputError, match='none of SLURM_ARRAY_TASK_ID'):
    resolve('auto', {})
  with pytest.raises(InputError, match='expected a grid index'):
    resolve('-1', {})


def _argv(workdir):
  """The stub's argv of the run in `workdir`, with the sweep directory cut out."""
  (start,) = [c for c in _calls(workdir) if c['event'] == 'start']
  return [a.replace(os.path.dirname(workdir), 'SWEEP') for a in start['argv']]


def test_task_n_is_exactly_the_local_sweeps_run_n(tmp_path):
  grid = ['train.learning_rate=0.1,0.2', 'seed=0,1']
  local = str(tmp_path / 'local')
  sweep.sweep(CONFIG, grid, ['train.epochs=1'], local, STUB)
  runs = sweep.expand(sweep.parse_grid(grid))
  for n in (3, 0, 2, 1):  # array tasks start in any order
    outcomes = sweep.task_sweep(CONFIG, grid, ['train.epochs=1'], str(tmp_path / 'array'), STUB, n)
    assert [o.run for o in outcomes] == [runs[n]] and outcomes[0].status == 'done'
  for run in runs:
    assert _argv(str(tmp_path / 'array' / run.name)) == _argv(os.path.join(local, run.name))
  with pytest.raises(InputError, match='the grid has 4 runs'):
    sweep.task_sweep(CONFIG, grid, ['train.epochs=1'], str(tmp_path / 'array'), STUB, 4)
  # W tasks sharing the grid: task 1 of 3 runs grid points 1 and 4.
  grid6 = ['train.learning_rate=0.1,0.2,0.3', 'seed=0,1']
  outcomes = sweep.task_sweep(CONFIG, grid6, [], str(tmp_path / 'w'), STUB, 1, num_tasks=3)
  runs6 = sweep.expand(sweep.parse_grid(grid6))
  assert [o.run for o in outcomes] == [runs6[1], runs6[4]]


def test_collect_over_a_partial_set_of_runs(tmp_path, capsys):
  grid = ['train.learning_rate=0.1,0.2,0.3,nan']
  sdir = str(tmp_path)
  env = {'SLURM_ARRAY_TASK_ID': '0'}
  assert sweep.task_cli(CONFIG, grid, [], sdir, STUB, None, environ=env) == 0
  assert 'sweep task 0 (from $SLURM_ARRAY_TASK_ID=0)' in capsys.readouterr().out
  assert sweep.task_cli(CONFIG, grid, [], sdir, STUB, '3') == 1         # lr nan fails
  os.makedirs(os.path.join(sdir, 'learning_rate=0.2'))                  # running (or killed)
  markdown, by_status = sweep.collect(CONFIG, grid, [], sdir)
  names = {k: [i for i, _ in v] for k, v in by_status.items()}
  assert names == {'done': [0], 'started': [1], 'missing': [2], 'failed': [3]}
  lines = markdown.splitlines()
  assert lines[2].startswith('| 0.1 | 0.150 |') and lines[3] == '| 0.2 |' + ' - |' * 9
  assert open(os.path.join(sdir, 'results.md')).read() == markdown

  capsys.readouterr()
  assert sweep.collect_cli(CONFIG, grid, [], sdir) == 1
  out = capsys.readouterr().out
  assert '1 of 4 runs finished' in out
  assert '   1 learning_rate=0.2: started, no result yet' in out
  assert '   2 learning_rate=0.3: missing (never started)' in out
  assert '   3 learning_rate=nan: failed (exit 1): error: train cats: loss is nan at step 1' in out
  # The failed task rerun (say, after a fix) clears its failure; the rest finish: exit 0.
  for n in (1, 2):
    sweep.task_sweep(CONFIG, grid, [], sdir, STUB, n)
  with open(os.path.join(sdir, 'learning_rate=nan', 'metrics.json'), 'w') as f:
    json.dump(_stub_metrics(0.5), f)
  os.unlink(os.path.join(sdir, 'learning_rate=nan', sweep.FAILED_NAME))
  assert sweep.collect_cli(CONFIG, grid, [], sdir) == 0
  # Other base settings are refused, as for the sweep itself.
  with pytest.raises(InputError, match='other settings'):
    sweep.collect(CONFIG, grid, ['train.epochs=4'], sdir)


@pytest.mark.slow
def test_real_sweep_of_two_runs(tmp_path):
  # The training-free baseline keeps two real bin/run.py runs to seconds.
  cmd = [sys.executable, os.path.join(ROOT, 'bin', 'sweep.py'),
         f'--config={os.path.join(ROOT, "configs", "two_class.py")}',
         '--grid=data.image_size=32,48', '--set=baseline=cluster', '--set=output.images=False',
         '--set=infer.method=argmax', f'--workdir={tmp_path}', '--parallel=2']
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
  rows = list(csv.DictReader(open(tmp_path / 'results.csv')))
  assert [r['data.image_size'] for r in rows] == ['32', '48']
  for r in rows:
    with open(tmp_path / r['run'] / 'metrics.json') as f:
      assert float(r['P']) == json.load(f)['mean']['P']
    assert 0.0 <= float(r['J']) <= 1.0
    assert 'clustering baseline' in open(tmp_path / r['run'] / 'console.log').read()
  assert '| data.image_size | P | J | J_pooled |' in proc.stdout
  again = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert again.returncode == 0 and '2 already finished, 0 to run' in again.stdout


if __name__ == '__main__':
  _stub_run(sys.argv[1:])
