"""Library entry point behind bin/run.py: work directory, log, dispatch, exit codes."""
import logging
import os
import sys

from absl import logging as absl_logging

from coseg_jax import errors
from coseg_jax import fileio
from coseg_jax import report
from coseg_jax import train
from coseg_jax.errors import DivergedError, InputError

log = logging.getLogger('coseg_jax')

# Every backbone has stride 32: smaller inputs have no feature map to speak of.
MIN_IMAGE_SIZE = 32


def _prepare_workdir(workdir):
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise InputError(f'{workdir}: cannot create work directory ({e.strerror})') from None
  probe = os.path.join(workdir, '.write-test')
  try:
    with open(probe, 'w'):
      pass
    os.unlink(probe)
  except OSError as e:
    raise InputError(f'{workdir}: work directory is not writable ({e.strerror})') from None


def _setup_logging(workdir):
  # orbax and jax log every checkpoint step at INFO through absl; keep the console readable.
  absl_logging.set_verbosity(absl_logging.WARNING)
  log.setLevel(logging.INFO)
  for h in list(log.handlers):
    log.removeHandler(h)
  fh = logging.FileHandler(os.path.join(workdir, 'run.log'))
  fh.setFormatter(logging.Formatter('%(asctime)s %(levelname)s %(message)s'))
  log.addHandler(fh)
  sh = logging.StreamHandler(sys.stdout)
  sh.setFormatter(logging.Formatter('%(message)s'))
  log.addHandler(sh)
  log.propagate = False


def _check_shared(config):
  """Fields every method reads, checked before anything is written; each method's run
  checks its own fields."""
  if config.data.image_size < MIN_IMAGE_SIZE:
    raise InputError(f'config.data.image_size: must be at least {MIN_IMAGE_SIZE} (the backbones '
                     f'downsample {MIN_IMAGE_SIZE}x), got {config.data.image_size}')
  if config.data.batch_size < 1:
    raise InputError(f'config.data.batch_size: must be at least 1, got {config.data.batch_size}')


def run(config, workdir):
  """Runs the experiment `config` into `workdir`; returns the metrics dict."""
  _check_shared(config)
  _prepare_workdir(workdir)
  _setup_logging(workdir)
  train.initialize_distributed(config.distributed)
  fileio.atomic_write_text(os.path.join(workdir, 'config.json'), config.to_json_best_effort(indent=2) + '\n')
  if config.method == 'multiclass':
    from coseg_jax import multiclass
    metrics = multiclass.run(config, workdir)
  elif config.method == 'instance':
    from coseg_jax import instance
    metrics = instance.run(config, workdir)
  else:
    raise InputError(f'config.method: unknown method {config.method!r} (multiclass | instance)')
  log.info('report: %s', report.write(workdir))
  return metrics


def run_cli(config, workdir) -> int:
  """`run` with user errors as one line on stderr and exit status 2.

  SIGTERM stops the run like SIGINT (the trainer checkpoints first; elsewhere the atomic
  writers leave no partial file) instead of killing it without a word.
  """
  try:
    with errors.sigterm_as_interrupt():
      run(config, workdir)
  except InputError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  except DivergedError as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    print('interrupted; rerun the same command to resume from the last checkpoint', file=sys.stderr)
    return 130
  return 0
