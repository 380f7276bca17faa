"""Runs one experiment: python bin/run.py --config=configs/three_class.py [--workdir=DIR].

Override any field with --config.section.field=value, e.g.
  python bin/run.py --config=configs/three_class.py --config.data.image_size=128
"""
import os
import sys

from absl import app
from absl import flags
from ml_collections import config_dict
from ml_collections import config_flags

from coseg_jax import sweep
from coseg_jax.errors import InputError

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Experiment config file (configs/*.py).', lock_config=True)
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Output directory; default runs/<config file name>.')
flags.mark_flags_as_required(['config'])


def _usage_error(message):
  print(f'error: {message}', file=sys.stderr)
  sys.exit(2)


def _config_problem(argv):
  """One line for a config file or override that ml_collections reports with a traceback."""
  path, keys = None, []
  for i, arg in enumerate(argv[1:], 1):
    if arg.startswith('--config='):
      path = arg.partition('=')[2]
    elif arg == '--config' and i + 1 < len(argv):
      path = argv[i + 1]
    elif arg.startswith('--config.'):
      keys.append(arg[len('--config.'):].partition('=')[0])
  try:
    sweep.check_keys(sweep.load_config(path), keys, path)
  except InputError as e:
    return str(e)
  return None


def _parse_flags(argv):
  """absl's flag parsing, but every bad flag, config file or config field is one line
  'error: ...' on stderr and exit status 2 (absl prints usage, ml_collections a traceback)."""
  try:
    rest = flags.FLAGS(argv)
  except flags.Error as e:
    _usage_error(' '.join(str(e).split()))
  except (AttributeError, KeyError) as e:  # ml_collections: no such config field
    _usage_error(_config_problem(argv) or ' '.join(str(e).split()))
  # A config file that fails to load is only reported when the config is first read.
  if not isinstance(_CONFIG.value, config_dict.ConfigDict):
    _usage_error(_config_problem(argv) or 'cannot load the --config file')
  return rest


def main(argv):
  if len(argv) > 1:
    _usage_error(f'unexpected arguments: {" ".join(argv[1:])}')
  workdir = _WORKDIR.value
  if workdir is None:
    config_path = config_flags.get_config_filename(flags.FLAGS['config'])
    workdir = os.path.join('runs', os.path.splitext(os.path.basename(config_path))[0])
  # Imported here so that flag errors are reported before jax loads (seconds).
  from coseg_jax import main as coseg_main
  sys.exit(coseg_main.run_cli(_CONFIG.value, workdir))


if __name__ == '__main__':
  app.run(main, flags_parser=_parse_flags)
