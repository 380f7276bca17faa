"""Flag sweeps: a grid of `--config.*` overrides run as separate experiments, one table.

Every run is `RUN_CMD --config=FILE --workdir=SWEEP/NAME --config.k=v ...` (RUN_CMD is
`python bin/run.py`) in its own subprocess and session, quiet, with its console output
in SWEEP/NAME/console.log. NAME spells the run's grid values (`attention=sa,method=crf`).

Resuming: a run whose metrics.json exists is finished and skipped; any other run is
started again in the same work directory, where the trainer resumes from its last
checkpoint. SIGINT/SIGTERM to the sweep forward one SIGTERM to the running runs (each
writes a checkpoint) and stop the sweep. A failed run is reported and the others go on.

The table has one row per run: its grid values, then the scalar means of its
metrics.json (`P`, `J`, ... ) and, when runs cover more than one group, the same per
group (`<group>:P`). It is written as results.md and results.csv in SWEEP.
"""
import collections
import csv
import dataclasses
import io
import itertools
import json
import os
import re
import subprocess
import sys
import time

from coseg_jax.cli import flags
from coseg_jax.core import errors
from coseg_jax.core import fileio
from coseg_jax.core.errors import InputError

_KEY = re.compile(r'[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$')
# Metric columns come first in this order; other scalars follow alphabetically.
_FIRST_METRICS = ('P', 'J')


@dataclasses.dataclass(frozen=True)
class Run:
  name: str                               # work directory under the sweep directory
  overrides: tuple[tuple[str, str], ...]  # (config key, value) of the grid, in grid order


@dataclasses.dataclass(frozen=True)
class Outcome:
  run: Run
  status: str              # 'skipped' (finished before) | 'done' | 'failed'
  returncode: int | None = None
  last_line: str = ''      # last line of the run's console.log, for failures


def _split_override(spec, flag):
  key, sep, value = spec.partition('=')
  if not sep or not _KEY.match(key):
    raise InputError(f'{flag} {spec}: expected section.field=value')
  return key, value


def parse_grid(specs):
  """['model.attention=none,sa', ...] -> [('model.attention', ('none', 'sa')), ...]."""
  grid = []
  for spec in specs:
    key, values = _split_override(spec, '--grid')
    values = tuple(values.split(','))
    if '' in values:
      raise InputError(f'--grid {spec}: empty value')
    grid.append((key, values))
  return grid


def parse_sets(specs):
  """['data.image_size=128', ...] -> [('data.image_size', '128'), ...]."""
  return [_split_override(spec, '--set') for spec in specs]


def _short_keys(keys):
  """Shortest dotted suffix of each key that is unique among `keys`."""
  short = {}
  for key in keys:
    parts = key.split('.')
    for n in range(1, len(parts) + 1):
      suffix = '.'.join(parts[-n:])
      if sum(k == suffix or k.endswith('.' + suffix) for k in keys) == 1:
        short[key] = suffix
        break
  return short


def expand(grid):
  """Cartesian product of the grid (first key slowest) as named runs."""
  short = _short_keys([key for key, _ in grid])
  runs = []
  for values in itertools.product(*[vals for _, vals in grid]):
    overrides = tuple((key, v) for (key, _), v in zip(grid, values))
    name = ','.join(f'{short[k]}={re.sub(r"[^A-Za-z0-9._-]", "_", v)}' for k, v in overrides)
    runs.append(Run(name or 'base', overrides))
  names = collections.Counter(r.name for r in runs)
  clash = next((n for n, c in names.items() if c > 1), None)
  if clash:
    raise InputError(f'--grid: several runs would be named {clash} (repeated or similar values)')
  return runs


def run_command(run_cmd, config_path, workdir, sets, run):
  """argv of one run; the grid values come last so they win over --set."""
  return [*run_cmd, f'--config={config_path}', f'--workdir={workdir}',
          '--config.output.quiet=True',
          *[f'--config.{k}={v}' for k, v in (*sets, *run.overrides)]]


def is_finished(workdir):
  return os.path.exists(os.path.join(workdir, 'metrics.json'))


def _last_line(path):
  with open(path, errors='replace') as f:
    lines = [l.strip() for l in f if l.strip()]
  return lines[-1] if lines else ''


def _child_env(slot, parallel, gpus_per_run):
  env = dict(os.environ)
  if gpus_per_run:
    visible = env.get('CUDA_VISIBLE_DEVICES')
    ids = visible.split(',') if visible else [str(i) for i in range(parallel * gpus_per_run)]
    env['CUDA_VISIBLE_DEVICES'] = ','.join(ids[slot * gpus_per_run:(slot + 1) * gpus_per_run])
  elif parallel > 1:
    # Runs sharing an accelerator must not each pre-allocate 75% of its memory.
    env['XLA_PYTHON_CLIENT_PREALLOCATE'] = 'false'
  return env


def execute(runs, sweep_dir, make_cmd, *, parallel=1, gpus_per_run=0, poll_s=0.2):
  """Runs every unfinished run, `parallel` at a time; returns one Outcome per run.

  `make_cmd(run, workdir)` gives the argv. With gpus_per_run = g, the s-th concurrent
  slot sees GPUs s*g .. s*g+g-1 (of $CUDA_VISIBLE_DEVICES when set).
  """
  outcomes = {}
  pending = collections.deque()
  for run in runs:
    if is_finished(os.path.join(sweep_dir, run.name)):
      outcomes[run.name] = Outcome(run, 'skipped')
    else:
      pending.append(run)
  print(f'sweep: {len(runs)} runs, {len(outcomes)} already finished, {len(pending)} to run',
        flush=True)
  free_slots = list(range(parallel))
  running = {}  # slot -> (run, process, start time)
  try:
    while pending or running:
      while pending and free_slots:
        run, slot = pending.popleft(), free_slots.pop(0)
        workdir = os.path.join(sweep_dir, run.name)
        os.makedirs(workdir, exist_ok=True)
        cmd = make_cmd(run, workdir)
        with open(os.path.join(workdir, 'console.log'), 'a') as console:
          console.write(f'# {time.strftime("%Y-%m-%d %H:%M:%S")} {" ".join(cmd)}\n')
          console.flush()
          # Own session: a Ctrl-C at the terminal reaches the sweep only, which then
          # sends each run exactly one SIGTERM (a second one makes the trainer give up).
          proc = subprocess.Popen(cmd, stdout=console, stderr=subprocess.STDOUT,
                                  env=_child_env(slot, parallel, gpus_per_run),
                                  start_new_session=True)
        running[slot] = (run, proc, time.time())
        print(f'start  {run.name}', flush=True)
      for slot, (run, proc, started) in list(running.items()):
        if proc.poll() is None:
          continue
        del running[slot]
        free_slots.append(slot)
        outcome = _outcome(run, proc.returncode, os.path.join(sweep_dir, run.name))
        outcomes[run.name] = outcome
        detail = '' if outcome.status == 'done' else (
            f' (exit {outcome.returncode}): {outcome.last_line}')
        print(f'{outcome.status:6} {run.name} in {time.time() - started:.0f}s{detail}',
              flush=True)
      time.sleep(poll_s)
  except KeyboardInterrupt:
    for _, proc, _ in running.values():
      proc.terminate()
    for _, proc, _ in running.values():
      proc.wait()
    raise
  return [outcomes[run.name] for run in runs]


def _outcome(run, returncode, workdir):
  if returncode == 0 and is_finished(workdir):
    return Outcome(run, 'done', returncode)
  return Outcome(run, 'failed', returncode, _last_line(os.path.join(workdir, 'console.log')))


def _scalars(d):
  return {k: v for k, v in d.items()
          if v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))}


def _metric_order(names):
  return ([n for n in _FIRST_METRICS if n in names] +
          sorted(n for n in names if n not in _FIRST_METRICS))


def table(runs, sweep_dir):
  """(columns, rows) of the sweep: grid values, then metrics; a missing value is None."""
  grid_keys = [k for k, _ in runs[0].overrides]
  metrics = {}
  for run in runs:
    path = os.path.join(sweep_dir, run.name, 'metrics.json')
    if os.path.exists(path):
      with open(path) as f:
        metrics[run.name] = json.load(f)
  means = {name: _scalars(m.get('mean', {})) for name, m in metrics.items()}
  mean_cols = _metric_order({k for m in means.values() for k in m})
  groups = sorted({g for m in metrics.values() for g in m.get('groups', {})})
  group_cols = [(g, k) for g in groups for k in mean_cols] if len(groups) > 1 else []
  columns = grid_keys + mean_cols + [f'{g}:{k}' for g, k in group_cols]
  rows = []
  for run in runs:
    m = metrics.get(run.name, {})
    group_values = [_scalars(m.get('groups', {}).get(g, {})).get(k) for g, k in group_cols]
    rows.append([v for _, v in run.overrides] +
                [means.get(run.name, {}).get(k) for k in mean_cols] + group_values)
  return columns, rows


def to_markdown(columns, rows, num_grid_keys):
  """Markdown table; metric columns right-aligned with 3 decimals, missing values '-'."""
  def cell(v):
    return '-' if v is None else (f'{v:.3f}' if isinstance(v, float) else str(v))

  align = ['---'] * num_grid_keys + ['---:'] * (len(columns) - num_grid_keys)
  lines = ['| ' + ' | '.join(columns) + ' |', '|' + '|'.join(align) + '|']
  lines += ['| ' + ' | '.join(cell(v) for v in row) + ' |' for row in rows]
  return '\n'.join(lines) + '\n'


def to_csv(columns, rows, runs):
  """CSV with the run name first and full-precision metrics; missing values empty."""
  buf = io.StringIO()
  writer = csv.writer(buf, lineterminator='\n')
  writer.writerow(['run'] + columns)
  for run, row in zip(runs, rows):
    writer.writerow([run.name] + ['' if v is None else v for v in row])
  return buf.getvalue()


def _check_manifest(sweep_dir, config_path, sets, runs):
  """Refuses to mix runs of different base settings in one sweep directory."""
  path = os.path.join(sweep_dir, 'sweep.json')
  base = {'config': config_path, 'set': [list(kv) for kv in sets]}
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    if {k: old.get(k) for k in base} != base:
      sets_were = ' '.join(f'--set={k}={v}' for k, v in old.get('set', [])) or 'no --set'
      raise InputError(f'{path}: this sweep was started with --config={old.get("config")} and '
                       f'{sets_were}; its finished runs would not match, use another --workdir')
  fileio.atomic_write_json(path, {**base, 'runs': {r.name: dict(r.overrides) for r in runs}})


def sweep(config_path, grid_specs, set_specs, sweep_dir, run_cmd, *, parallel=1, gpus_per_run=0):
  """Runs the grid into `sweep_dir` and writes the tables; returns (outcomes, markdown)."""
  if parallel < 1 or gpus_per_run < 0:
    raise InputError(f'--parallel={parallel} --gpus_per_run={gpus_per_run}: need parallel >= 1 '
                     'and gpus_per_run >= 0')
  visible = os.environ.get('CUDA_VISIBLE_DEVICES')
  if gpus_per_run and visible and len(visible.split(',')) < parallel * gpus_per_run:
    raise InputError(f'CUDA_VISIBLE_DEVICES={visible}: fewer than --parallel x --gpus_per_run '
                     f'= {parallel * gpus_per_run} GPUs')
  config_path = os.path.abspath(config_path)
  grid, sets = parse_grid(grid_specs), parse_sets(set_specs)
  flags.check_keys(flags.load_config(config_path), [k for k, _ in grid] + [k for k, _ in sets],
                    config_path)
  runs = expand(grid)
  try:
    os.makedirs(sweep_dir, exist_ok=True)
    _check_manifest(sweep_dir, config_path, sets, runs)
  except OSError as e:
    raise InputError(f'{sweep_dir}: cannot write the sweep directory ({e.strerror})') from None

  def make_cmd(run, workdir):
    return run_command(run_cmd, config_path, workdir, sets, run)

  outcomes = execute(runs, sweep_dir, make_cmd, parallel=parallel, gpus_per_run=gpus_per_run)
  columns, rows = table(runs, sweep_dir)
  markdown = to_markdown(columns, rows, len(grid))
  fileio.atomic_write_text(os.path.join(sweep_dir, 'results.md'), markdown)
  fileio.atomic_write_text(os.path.join(sweep_dir, 'results.csv'), to_csv(columns, rows, runs))
  return outcomes, markdown


def run_cli(config_path, grid_specs, set_specs, sweep_dir, run_cmd, **kwargs) -> int:
  """`sweep` for bin/sweep.py: prints the table and failures; exit 0 (all finished),
  1 (some run failed), 2 (bad input) or 130 (interrupted)."""
  try:
    with errors.sigterm_as_interrupt():
      outcomes, markdown = sweep(config_path, grid_specs, set_specs, sweep_dir, run_cmd, **kwargs)
  except InputError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print('sweep interrupted; rerun the same command to resume', file=sys.stderr)
    return 130
  print(f'\n{markdown}\n(tables: {os.path.join(sweep_dir, "results.md")}, results.csv)')
  failed = [o for o in outcomes if o.status == 'failed']
  for o in failed:
    print(f'FAILED {o.run.name} (exit {o.returncode}): {o.last_line}  '
          f'[log: {os.path.join(sweep_dir, o.run.name, "console.log")}]')
  return 1 if failed else 0
