"""Library entry point behind bin/run.py: work directory, lock, fingerprint, log, dispatch,
exit codes.

A rerun into an existing work directory resumes it only when it would compute the same
result: `fingerprint.json` records everything that shapes the result (the resolved config
less output-only fields, and every input image and annotation by name, size and hash);
a rerun that differs stops with one line naming the differences, or with
`--config.train.on_mismatch=fresh` starts over in a new subfolder `rerun-<n>`.
"""
import errno
import fcntl
import hashlib
import json
import logging
import os
import sys

from absl import logging as absl_logging
import numpy as np

from coseg_jax.core import errors
from coseg_jax.core import fileio
from coseg_jax.core import report
from coseg_jax.core import train
from coseg_jax.core.errors import DivergedError
from coseg_jax.core.errors import InputError

log = logging.getLogger('coseg_jax')

FINGERPRINT = 'fingerprint.json'
LOCK = '.lock'
# Files and folders the run itself writes at the top of its work directory: a group
# folder of the same name would be overwritten by (or overwrite) them.
RESERVED_NAMES = ('metrics.json', 'config.json', 'report.html', 'run.log', FINGERPRINT, LOCK,
                  'console.log', 'demo_data', 'sweep.json', 'results.md', 'results.csv')
# Config fields that do not change what is computed: where things go and how they are
# shown, how often checkpoints are kept, where the converted weights are cached.
OUTPUT_ONLY = ('output', 'distributed', 'weights.cache_dir', 'data.root', 'data.groups',
               'train.checkpoint_every', 'train.max_checkpoints', 'train.on_mismatch')


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


class _Lock:
  """An exclusive OS lock (flock) on <workdir>/.lock, released when the process ends
  however it ends; a second run into the same directory fails naming the holder."""

  def __init__(self, workdir):
    self.path = os.path.join(workdir, LOCK)
    self.fd = None

  def __enter__(self):
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      holder = os.pread(fd, 64, 0).decode('ascii', 'replace').strip() or 'unknown'
      os.close(fd)
      if e.errno in (errno.EAGAIN, errno.EACCES):
        raise InputError(f'{os.path.dirname(self.path)}: work directory is in use by another '
                         f'run (pid {holder}); wait for it or use another --workdir') from None
      raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f'{os.getpid()}\n'.encode(), 0)
    self.fd = fd
    return self

  def __exit__(self, *exc):
    os.close(self.fd)  # closing releases the lock; the file stays (unlinking would race)


def _from_orbax(record):
  """orbax logs a failed save from each of its threads with a traceback (thousands of
  lines for a full disk), and asyncio logs each of its failed writes ('Task exception was
  never retrieved' naming orbax's coroutine, or 'Future exception was never retrieved'
  naming the checkpoint's *.orbax-checkpoint-tmp folder); the trainer turns the failure
  into one error of its own."""
  if '/orbax/' in record.pathname.replace(os.sep, '/'):
    return False
  message = record.getMessage()
  if record.name == 'asyncio':
    return not ('never retrieved' in message and 'orbax' in message)
  return '/orbax/' not in message.replace(os.sep, '/')


def _close_logging():
  """Detaches run.log (the file is not held open after the run)."""
  for h in list(log.handlers):
    log.removeHandler(h)
    h.close()


def _setup_logging(workdir):
  # orbax and jax log every checkpoint step at INFO through absl; keep the console readable.
  absl_logging.set_verbosity(absl_logging.WARNING)
  for name in ('absl', 'asyncio'):
    if _from_orbax not in logging.getLogger(name).filters:
      logging.getLogger(name).addFilter(_from_orbax)
  log.setLevel(logging.INFO)
  for h in list(log.handlers):
    log.removeHandler(h)
    h.close()
  # A file name that is not valid UTF-8 is logged escaped, not as a logging error.
  fh = _QuietFileHandler(os.path.join(workdir, 'run.log'), encoding='utf-8',
                         errors='backslashreplace')
  fh.setFormatter(logging.Formatter('%(asctime)s %(levelname)s %(message)s'))
  log.addHandler(fh)
  sh = logging.StreamHandler(sys.stdout)
  sh.setFormatter(_EscapingFormatter('%(message)s'))
  log.addHandler(sh)
  log.propagate = False


class _QuietFileHandler(logging.FileHandler):
  """run.log on a full disk loses lines instead of printing a traceback per line (the
  write that fails next reports the full disk, once)."""

  def handleError(self, record):
    del record


class _EscapingFormatter(logging.Formatter):
  def format(self, record):
    return errors.escape_surrogates(super().format(record))


def _pipeline(config):
  """The method's pipeline module (imported on demand: each pulls in its own models)."""
  if config.method == 'multiclass':
    from coseg_jax.multiclass import pipeline
  elif config.method == 'instance':
    from coseg_jax.instance import pipeline
  else:
    raise InputError(f'config.method: unknown method {config.method!r} (multiclass | instance)')
  return pipeline


def _flat(d, prefix=''):
  out = {}
  for k, v in d.items():
    key = f'{prefix}{k}'
    if isinstance(v, dict):
      out.update(_flat(v, key + '.'))
    else:
      out[key] = v
  return out


def _hash_array(h, a):
  if a is not None:
    a = np.ascontiguousarray(a)
    h.update(f'{a.dtype}{a.shape}'.encode())
    h.update(a.tobytes())


def fingerprint(config, groups):
  """What shapes the result: config fields (less OUTPUT_ONLY) and, per group, every
  image and annotation by name, size and content hash."""
  fields = {k: v for k, v in _flat(json.loads(config.to_json_best_effort())).items()
            if not any(k == o or k.startswith(o + '.') for o in OUTPUT_ONLY)}
  inputs = {}
  for group in groups:
    files = {}
    for s in group.samples:
      h = hashlib.sha256()
      for a in (s.image, s.mask, *(s.instances or ())):
        _hash_array(h, a)
      files[errors.escape_surrogates(s.stem)] = (
          f'{os.path.basename(errors.escape_surrogates(s.image_path))} '
          f'{s.image.shape[1]}x{s.image.shape[0]} {h.hexdigest()[:16]}')
    inputs[errors.escape_surrogates(group.name)] = files
  return {'config': fields, 'inputs': inputs}


def _differences(old, new):
  """What differs, as short phrases ('train.learning_rate 0.0001 -> 0.5')."""
  if not old.get('config'):
    return ['no readable fingerprint.json beside its checkpoints: settings unknown']
  diffs = []
  oc, nc = old.get('config', {}), new['config']
  for key in sorted(set(oc) | set(nc)):
    if oc.get(key, '<unset>') != nc.get(key, '<unset>'):
      diffs.append(f'{key} {oc.get(key, "<unset>")!r} -> {nc.get(key, "<unset>")!r}')
  # Groups added or left out are fine (each group has its own folder); a group whose
  # images or annotations changed under the same name is not.
  oi, ni = old.get('inputs', {}), new['inputs']
  for name in sorted(set(oi) & set(ni)):
    if oi[name] != ni[name]:
      diffs.append(f'inputs of group {name!r} (other images)')
  return diffs


def _check_group_names(groups):
  for group in groups:
    if group.name in RESERVED_NAMES or group.name.startswith('rerun-'):
      raise InputError(f'{group.path}: group name {group.name!r} collides with an output of '
                       f'the run ({", ".join(RESERVED_NAMES)}, rerun-<n>); rename the folder')


def _read_fingerprint(path):
  """The recorded fingerprint, {} if unreadable, None if there is none."""
  if not os.path.exists(path):
    return None
  try:
    with open(path, encoding='utf-8') as f:
      return json.load(f)
  except (OSError, ValueError):
    return {}


def _fresh_dir(workdir, new):
  """The rerun-<n> subfolder of an earlier fresh start with these very settings (so the
  same command resumes it), else the next free one."""
  n = 1
  while os.path.exists(os.path.join(workdir, f'rerun-{n}')):
    old = _read_fingerprint(os.path.join(workdir, f'rerun-{n}', FINGERPRINT))
    if old and not _differences(old, new):
      return os.path.join(workdir, f'rerun-{n}'), old
    n += 1
  return os.path.join(workdir, f'rerun-{n}'), None


def _start(config, workdir, groups):
  """Called by the pipeline once every group is read and validated, before anything is
  built: checks group names and the fingerprint, writes config.json; returns the work
  directory to write into (a new subfolder for on_mismatch=fresh)."""
  _check_group_names(groups)
  new = fingerprint(config, groups)
  path = os.path.join(workdir, FINGERPRINT)
  old = _read_fingerprint(path)
  if old is None and any(os.path.isdir(os.path.join(workdir, g.name, 'checkpoints')) for g in groups):
    old = {}  # checkpoints of a run that recorded nothing: cannot be trusted to match
  diffs = [] if old is None else _differences(old, new)
  if diffs:
    if len(diffs) > 6:
      diffs = diffs[:5] + [f'{len(diffs) - 5} more']
    if config.train.on_mismatch != 'fresh':
      raise InputError(
          f'{workdir}: holds a run with other settings ({"; ".join(diffs)}); its checkpoints '
          'and results would be reused. Use another --workdir, or '
          '--config.train.on_mismatch=fresh to start over in a new subfolder')
    workdir, old = _fresh_dir(workdir, new)
    log.info('settings differ from the run in the work directory (%s): %s in %s',
             '; '.join(diffs), 'starting fresh' if old is None else 'resuming', workdir)
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, FINGERPRINT)
  if old:
    new = {**new, 'inputs': {**old.get('inputs', {}), **new['inputs']}}  # groups of earlier runs
  fileio.atomic_write_json(path, new)
  fileio.atomic_write_text(os.path.join(workdir, 'config.json'),
                           config.to_json_best_effort(indent=2) + '\n')
  return workdir


def run(config, workdir):
  """Runs the experiment `config` into `workdir`; returns the metrics dict."""
  pipeline = _pipeline(config)
  pipeline.check_config(config)
  _prepare_workdir(workdir)
  with _Lock(workdir):
    _setup_logging(workdir)
    try:
      train.initialize_distributed(config.distributed)
      started = {}

      def start(groups):
        started['workdir'] = _start(config, workdir, groups)
        return started['workdir']

      metrics = pipeline.run(config, workdir, start=start)
      log.info('report: %s', report.write(started.get('workdir', workdir)))
    finally:
      _close_logging()
  return metrics


def _closed_loop_noise(info):
  return isinstance(info.exc_value, RuntimeError) and str(info.exc_value) == 'Event loop is closed'


def _quiet_orbax_shutdown():
  """After a failed asynchronous save, orbax's threads call into an event loop that is
  gone; Python prints that as 'Exception ignored ... Event loop is closed' with a
  traceback under the run's one error line. Only that exception is dropped."""
  previous = sys.unraisablehook
  if getattr(previous, 'coseg_quiet', False):
    return

  def hook(info):
    if not _closed_loop_noise(info):
      previous(info)

  hook.coseg_quiet = True
  sys.unraisablehook = hook


def _print_error(message):
  print(f'error: {errors.one_line(message)}', file=sys.stderr)


def run_cli(config, workdir) -> int:
  """`run` with user errors as one line on stderr and exit status 2.

  SIGTERM stops the run like SIGINT (the trainer checkpoints first; elsewhere the atomic
  writers leave no partial file) instead of killing it without a word.
  """
  _quiet_orbax_shutdown()
  try:
    with errors.sigterm_as_interrupt():
      run(config, workdir)
  except InputError as e:
    _print_error(str(e))
    return 2
  except DivergedError as e:
    _print_error(str(e))
    return 1
  except KeyboardInterrupt:
    print('interrupted; rerun the same command to resume from the last checkpoint', file=sys.stderr)
    return 130
  except Exception as e:  # noqa: BLE001 -- only a full disk is the user's to fix
    if not fileio.is_disk_full(e):
      raise
    _print_error(str(fileio.disk_full(workdir, e)))
    return 2
  return 0
