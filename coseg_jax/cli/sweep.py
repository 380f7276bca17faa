"""Flag sweeps: a grid of `--config.*` overrides run as separate experiments, one table.

Every run is `RUN_CMD --config=FILE --workdir=SWEEP/NAME --config.k=v ...` (RUN_CMD is
`python bin/run.py`) in its own subprocess and session, quiet, with its console output
in SWEEP/NAME/console.log. NAME spells the run's grid values (`attention=sa,method=crf`).

Resuming: a run whose metrics.json exists is finished and skipped; any other run is
started again in the same work directory, where the trainer resumes from its last
checkpoint. SIGINT/SIGTERM to the sweep forward one SIGTERM to the running runs (each
writes a checkpoint) and stop the sweep. A failed run is reported and the others go on.

On a cluster each grid point is one task of a job array (`task_sweep`): `--task_index=N`
(by default read from the scheduler's array index variable, ARRAY_INDEX_VARIABLES) runs
grid point N of `--list` alone into SWEEP/NAME; `--collect` then tabulates whatever has
finished and names the runs that are missing or failed (a failed run leaves
SWEEP/NAME/failed.json).

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


FAILED_NAME = 'failed.json'


def _outcome(run, returncode, workdir):
  failed_path = os.path.join(workdir, FAILED_NAME)
  if returncode == 0 and is_finished(workdir):
    if os.path.exists(failed_path):
      os.unlink(failed_path)
    return Outcome(run, 'done', returncode)
  outcome = Outcome(run, 'failed', returncode, _last_line(os.path.join(workdir, 'console.log')))
  # What --collect reports for a run that stopped (another machine may have run it).
  fileio.atomic_write_json(failed_path, {'returncode': returncode, 'last_line': outcome.last_line,
                                         'time': time.strftime('%Y-%m-%d %H:%M:%S')})
  return outcome


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


# Array schedulers' task index variables, read in this order: (variable, its first index).
# SGE and LSF number array tasks from 1 (grid point = value - 1); the others give the
# index as submitted, so submit 0..N-1, the indices `--list` prints.
ARRAY_INDEX_VARIABLES = (
    ('SLURM_ARRAY_TASK_ID', 0),        # sbatch --array=0-N-1
    ('PBS_ARRAY_INDEX', 0),            # PBS Pro: qsub -J 0-N-1
    ('PBS_ARRAYID', 0),                # Torque: qsub -t 0-N-1
    ('SGE_TASK_ID', 1),                # SGE / UGE: qsub -t 1-N ('undefined' outside arrays)
    ('LSB_JOBINDEX', 1),               # LSF: bsub -J 'name[1-N]' (0 outside arrays)
    ('AWS_BATCH_JOB_ARRAY_INDEX', 0),  # AWS Batch array jobs of size N
    ('CLOUD_RUN_TASK_INDEX', 0),       # Cloud Run jobs, --tasks=N
    ('JOB_COMPLETION_INDEX', 0),       # Kubernetes Indexed Jobs, completions N
)


def task_index_from_env(environ=None):
  """(grid index, variable) from the first array index variable set, or None."""
  environ = os.environ if environ is None else environ
  for name, first in ARRAY_INDEX_VARIABLES:
    value = environ.get(name, '').strip()
    if not value or (name == 'SGE_TASK_ID' and value == 'undefined') or (
        name == 'LSB_JOBINDEX' and value == '0'):
      continue
    if not value.isdigit():
      raise InputError(f'${name}={value}: not a task index')
    index = int(value) - first
    if index < 0:
      raise InputError(f'${name}={value}: {name} counts from {first}')
    return index, f'${name}={value}'
  return None


def resolve_task_index(flag_value, environ=None):
  """`--task_index`: None (flag unset: the array variable if one is set, else the whole
  grid), 'all' (the whole grid), 'auto' (the array variable, which must be set) or N.
  Returns (index or None, where it came from)."""
  if flag_value is None or flag_value == 'auto':
    found = task_index_from_env(environ)
    if found is None and flag_value == 'auto':
      names = ', '.join(n for n, _ in ARRAY_INDEX_VARIABLES)
      raise InputError(f'--task_index=auto: none of {names} is set')
    return found if found is not None else (None, 'the whole grid')
  if flag_value == 'all':
    return None, '--task_index=all'
  if not str(flag_value).isdigit():
    raise InputError(f'--task_index={flag_value}: expected a grid index (see --list), auto or all')
  return int(flag_value), f'--task_index={flag_value}'


def _prepare(config_path, grid_specs, set_specs):
  config_path = os.path.abspath(config_path)
  grid, sets = parse_grid(grid_specs), parse_sets(set_specs)
  flags.check_keys(flags.load_config(config_path), [k for k, _ in grid] + [k for k, _ in sets],
                   config_path)
  return config_path, grid, sets, expand(grid)


def format_list(runs):
  """One line per grid point: its index, its run folder, its overrides."""
  width = len(str(len(runs) - 1))
  return '\n'.join(f'{i:{width}d}  {r.name}  ' + ' '.join(f'--config.{k}={v}' for k, v in r.overrides)
                   for i, r in enumerate(runs))


def run_status(sweep_dir, run):
  """'done' | 'failed' | 'started' (folder, no result: running, or killed) | 'missing'."""
  workdir = os.path.join(sweep_dir, run.name)
  if is_finished(workdir):
    return 'done'
  if os.path.exists(os.path.join(workdir, FAILED_NAME)):
    return 'failed'
  return 'started' if os.path.isdir(workdir) else 'missing'


def write_tables(runs, sweep_dir, num_grid_keys):
  columns, rows = table(runs, sweep_dir)
  markdown = to_markdown(columns, rows, num_grid_keys)
  fileio.atomic_write_text(os.path.join(sweep_dir, 'results.md'), markdown)
  fileio.atomic_write_text(os.path.join(sweep_dir, 'results.csv'), to_csv(columns, rows, runs))
  return markdown


def collect(config_path, grid_specs, set_specs, sweep_dir):
  """The tables of whatever runs of the grid have finished: (markdown, {status: [(index,
  run)]}) for the statuses of `run_status`."""
  config_path, grid, sets, runs = _prepare(config_path, grid_specs, set_specs)
  if not os.path.isdir(sweep_dir):
    raise InputError(f'{sweep_dir}: no such sweep directory')
  manifest = os.path.join(sweep_dir, 'sweep.json')
  if os.path.exists(manifest):
    with open(manifest) as f:
      old = json.load(f)
    if (old.get('config'), old.get('set')) != (config_path, [list(kv) for kv in sets]):
      raise InputError(f'{manifest}: this sweep was started with other settings '
                       f'(--config={old.get("config")}, --set {old.get("set")})')
  by_status = collections.defaultdict(list)
  for i, run in enumerate(runs):
    by_status[run_status(sweep_dir, run)].append((i, run))
  return write_tables(runs, sweep_dir, len(grid)), dict(by_status)


def _open(sweep_dir, run_cmd, config_path, sets, runs):
  """Creates `sweep_dir` (checking its manifest against this grid) and returns the
  make_cmd(run, workdir) that `execute` runs."""
  try:
    os.makedirs(sweep_dir, exist_ok=True)
    _check_manifest(sweep_dir, config_path, sets, runs)
  except OSError as e:
    raise InputError(f'{sweep_dir}: cannot write the sweep directory ({e.strerror})') from None
  return lambda run, workdir: run_command(run_cmd, config_path, workdir, sets, run)


def task_sweep(config_path, grid_specs, set_specs, sweep_dir, run_cmd, task_index, *,
               num_tasks=None):
  """Grid point `task_index` alone (a job array's task), into the same SWEEP/NAME and with
  the same command as `sweep` gives it; with `num_tasks` = W, the grid points
  task_index, task_index + W, ... one after another. Returns the outcomes."""
  config_path, grid, sets, runs = _prepare(config_path, grid_specs, set_specs)
  if task_index >= len(runs) or (num_tasks is not None and not 0 <= task_index < num_tasks):
    raise InputError(f'task index {task_index}: the grid has {len(runs)} runs (0..{len(runs) - 1}'
                     + (f'; --num_tasks={num_tasks}' if num_tasks else '') + ')')
  chosen = runs[task_index::num_tasks] if num_tasks else [runs[task_index]]
  return execute(chosen, sweep_dir, _open(sweep_dir, run_cmd, config_path, sets, runs))


def sweep(config_path, grid_specs, set_specs, sweep_dir, run_cmd, *, parallel=1, gpus_per_run=0):
  """Runs the grid into `sweep_dir` and writes the tables; returns (outcomes, markdown)."""
  if parallel < 1 or gpus_per_run < 0:
    raise InputError(f'--parallel={parallel} --gpus_per_run={gpus_per_run}: need parallel >= 1 '
                     'and gpus_per_run >= 0')
  visible = os.environ.get('CUDA_VISIBLE_DEVICES')
  if gpus_per_run and visible and len(visible.split(',')) < parallel * gpus_per_run:
    raise InputError(f'CUDA_VISIBLE_DEVICES={visible}: fewer than --parallel x --gpus_per_run '
                     f'= {parallel * gpus_per_run} GPUs')
  config_path, grid, sets, runs = _prepare(config_path, grid_specs, set_specs)
  make_cmd = _open(sweep_dir, run_cmd, config_path, sets, runs)
  outcomes = execute(runs, sweep_dir, make_cmd, parallel=parallel, gpus_per_run=gpus_per_run)
  return outcomes, write_tables(runs, sweep_dir, len(grid))


def _print_failures(outcomes, sweep_dir):
  failed = [o for o in outcomes if o.status == 'failed']
  for o in failed:
    print(f'FAILED {o.run.name} (exit {o.returncode}): {o.last_line}  '
          f'[log: {os.path.join(sweep_dir, o.run.name, "console.log")}]')
  return 1 if failed else 0


def list_cli(config_path, grid_specs, set_specs) -> int:
  """bin/sweep.py --list: the grid with its indices (what --task_index selects)."""
  try:
    runs = _prepare(config_path, grid_specs, set_specs)[3]
  except InputError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(format_list(runs))
  print(f'({len(runs)} runs: task indices 0..{len(runs) - 1})')
  return 0


def collect_cli(config_path, grid_specs, set_specs, sweep_dir) -> int:
  """bin/sweep.py --collect: the table of the finished runs, then the runs that are not;
  exit 0 when every run has finished, 1 otherwise, 2 on bad input."""
  try:
    markdown, by_status = collect(config_path, grid_specs, set_specs, sweep_dir)
  except InputError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(f'{markdown}\n(tables: {os.path.join(sweep_dir, "results.md")}, results.csv)')
  total = sum(len(v) for v in by_status.values())
  print(f'{len(by_status.get("done", []))} of {total} runs finished')
  for status, what in (('failed', 'failed'), ('started', 'started, no result yet (running or killed)'),
                       ('missing', 'missing (never started)')):
    for i, run in by_status.get(status, []):
      detail = ''
      if status == 'failed':
        with open(os.path.join(sweep_dir, run.name, FAILED_NAME)) as f:
          record = json.load(f)
        detail = f' (exit {record.get("returncode")}): {record.get("last_line", "")}'
      print(f'{i:>4} {run.name}: {what}{detail}')
  return 0 if len(by_status.get('done', [])) == total else 1


def task_cli(config_path, grid_specs, set_specs, sweep_dir, run_cmd, task_flag, *,
             num_tasks=None, environ=None, **kwargs) -> int:
  """bin/sweep.py with --task_index (or an array index variable set): one grid point
  (`task_sweep`); otherwise the whole grid (`run_cli`)."""
  try:
    index, source = resolve_task_index(task_flag, environ)
  except InputError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  if index is None:
    if num_tasks is not None:
      print('error: --num_tasks needs a task index (--task_index or an array variable)',
            file=sys.stderr)
      return 2
    return run_cli(config_path, grid_specs, set_specs, sweep_dir, run_cmd, **kwargs)
  print(f'sweep task {index} (from {source})', flush=True)
  try:
    with errors.sigterm_as_interrupt():
      outcomes = task_sweep(config_path, grid_specs, set_specs, sweep_dir, run_cmd, index,
                            num_tasks=num_tasks)
  except InputError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print('sweep task interrupted; rerun it to resume', file=sys.stderr)
    return 130
  print('(collect the table with --collect once the tasks are done)')
  return _print_failures(outcomes, sweep_dir)


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
  return _print_failures(outcomes, sweep_dir)
