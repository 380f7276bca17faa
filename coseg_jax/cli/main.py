"""Library entry point behind bin/run.py: work directory, log, dispatch, exit codes."""
import logging
import os
import sys

from absl import logging as absl_logging

from coseg_jax.core import errors
from coseg_jax.core import fileio
from coseg_jax.core import report
from coseg_jax.core import train
from coseg_jax.core.errors import DivergedError
from coseg_jax.core.errors import InputError

log = logging.getLogger('coseg_jax')

# Every backbone has stride 32: smaller inputs have no feature map to speak of.


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


def _pipeline(config):
  """The method's pipeline module (imported on demand: each pulls in its own models)."""
  if config.method == 'multiclass':
    from coseg_jax.multiclass import pipeline
  elif config.method == 'instance':
    from coseg_jax.instance import pipeline
  else:
    raise InputError(f'config.method: unknown method {config.method!r} (multiclass | instance)')
  return pipeline


def run(config, workdir):
  """Runs the experiment `config` into `workdir`; returns the metrics dict."""
  pipeline = _pipeline(config)
  pipeline.check_config(config)
  _prepare_workdir(workdir)
  _setup_logging(workdir)
  train.initialize_distributed(config.distributed)
  fileio.atomic_write_text(os.path.join(workdir, 'config.json'), config.to_json_best_effort(indent=2) + '\n')
  metrics = pipeline.run(config, workdir)
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
