"""bin/run.py's flag parsing: every bad flag, config file or config field is one line
'error: ...' on stderr with exit status 2 (absl prints usage, ml_collections a traceback).

Light on purpose (no jax import), so flag errors come back before jax loads.
"""
import sys

from absl import flags
from ml_collections import config_dict

from coseg_jax import sweep
from coseg_jax.errors import InputError


def usage_error(message):
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


def parse_flags(argv, config_flag):
  """absl's flag parsing with one-line errors; `config_flag` is the DEFINE_config_file holder."""
  try:
    rest = flags.FLAGS(argv)
  except flags.Error as e:
    usage_error(' '.join(str(e).split()))
  except (AttributeError, KeyError) as e:  # ml_collections: no such config field
    usage_error(_config_problem(argv) or ' '.join(str(e).split()))
  # A config file that fails to load is only reported when the config is first read.
  if not isinstance(config_flag.value, config_dict.ConfigDict):
    usage_error(_config_problem(argv) or 'cannot load the --config file')
  return rest
