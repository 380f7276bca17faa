"""Runs a grid of config overrides as separate experiments and tabulates their metrics.

  python bin/sweep.py --config=configs/three_class.py \
      --grid=model.attention=none,sa,ma,sa_ma --grid=infer.method=argmax,crf \
      --workdir=runs/ablation [--parallel=2] [--set=data.image_size=128]

Each run is `python bin/run.py` in SWEEP/<name>, e.g. runs/ablation/attention=sa,method=crf.
Rerunning the same command skips finished runs and resumes interrupted ones. The table
(rows = runs; columns = grid values, P, J, ...) is printed and written to
SWEEP/results.md and SWEEP/results.csv.

On a cluster (one job-array task per grid point; README, "Sweeps on a cluster"):
  python bin/sweep.py ... --list              # the grid with its task indices
  python bin/sweep.py ... --task_index=N      # grid point N alone (default: the array
                                              # scheduler's index, e.g. $SLURM_ARRAY_TASK_ID)
  python bin/sweep.py ... --collect           # table of the finished runs; missing/failed
"""
import functools
import os
import sys

from absl import app
from absl import flags

from coseg_jax.cli import flags as cli_flags
from coseg_jax.cli import sweep

_CONFIG = flags.DEFINE_string('config', None, 'Experiment config file (configs/*.py).')
_GRID = flags.DEFINE_multi_string(
    'grid', [], 'section.field=v1,v2,...: one sweep axis; runs are the product of all axes.')
_SET = flags.DEFINE_multi_string('set', [], 'section.field=value applied to every run.')
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Sweep directory; default runs/sweep_<config file name>.')
_PARALLEL = flags.DEFINE_integer('parallel', 1, 'Runs executed at the same time.')
_GPUS_PER_RUN = flags.DEFINE_integer(
    'gpus_per_run', 0, 'Pin each concurrent run to this many GPUs (CUDA_VISIBLE_DEVICES); '
    '0: every run sees all devices.')
_TASK_INDEX = flags.DEFINE_string(
    'task_index', None, 'Run grid point N of --list alone (one job-array task). Unset: the '
    'array index variable of the scheduler when one is set (SLURM_ARRAY_TASK_ID, '
    'PBS_ARRAY_INDEX, PBS_ARRAYID, SGE_TASK_ID - 1, LSB_JOBINDEX - 1, '
    'AWS_BATCH_JOB_ARRAY_INDEX, CLOUD_RUN_TASK_INDEX, JOB_COMPLETION_INDEX), else the whole '
    'grid; auto: that variable, which must be set; all: the whole grid.')
_NUM_TASKS = flags.DEFINE_integer(
    'num_tasks', None, 'With a task index I: run grid points I, I+W, I+2W, ... (W tasks share '
    'the grid, e.g. the workers of a TPU VM slice).')
_LIST = flags.DEFINE_bool('list', False, 'Print the grid with its task indices and exit.')
_COLLECT = flags.DEFINE_bool(
    'collect', False, 'Tabulate the finished runs, name the missing and failed ones, and exit.')
flags.mark_flags_as_required(['config'])

_RUN_PY = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'run.py')


def main(argv):
  if len(argv) > 1:
    cli_flags.usage_error(f'unexpected arguments: {" ".join(argv[1:])}')
  workdir = _WORKDIR.value or os.path.join(
      'runs', 'sweep_' + os.path.splitext(os.path.basename(_CONFIG.value))[0])
  if _LIST.value:
    sys.exit(sweep.list_cli(_CONFIG.value, _GRID.value, _SET.value))
  if _COLLECT.value:
    sys.exit(sweep.collect_cli(_CONFIG.value, _GRID.value, _SET.value, workdir))
  sys.exit(sweep.task_cli(_CONFIG.value, _GRID.value, _SET.value, workdir,
                          [sys.executable, _RUN_PY], _TASK_INDEX.value, num_tasks=_NUM_TASKS.value,
                          parallel=_PARALLEL.value, gpus_per_run=_GPUS_PER_RUN.value))


if __name__ == '__main__':
  app.run(main, flags_parser=functools.partial(cli_flags.parse_flags, config_flag=None))
