"""bin/run.py's flag parsing: every bad flag, config file or config field is one line
'error: ...' on stderr with exit status 2 (absl prints usage, ml_collections a traceback).

Light on purpose (no jax import), so flag errors come back before jax loads.
"""
import importlib.util
import os
import sys

from absl import flags
from ml_collections import config_dict

from coseg_jax.core.errors import InputError
from coseg_jax.core.errors import one_line


def usage_error(message):
  print(f'error: {one_line(message)}', file=sys.stderr)
  sys.exit(2)


def _config_args(argv):
  """The --config file named in `argv` (None if absent) and the fields overridden."""
  path, keys = None, []
  for i, arg in enumerate(argv[1:], 1):
    if arg == '--':
      break
    if arg.startswith('--config='):
      path = arg.partition('=')[2]
    elif arg == '--config' and i + 1 < len(argv):
      path = argv[i + 1]
    elif arg.startswith('--config.'):
      keys.append(arg[len('--config.'):].partition('=')[0])
  # ml_collections passes 'file.py:arg' on to get_config; only the file matters here.
  if path and not os.path.isfile(path) and ':' in path:
    path = path.rpartition(':')[0]
  return path, keys


def _config_problem(argv, keys_too=True):
  """One line for a config file or override that ml_collections reports with a traceback."""
  path, keys = _config_args(argv)
  if path is None:
    return None  # absl reports the missing required flag
  try:
    config = load_config(path)
    if keys_too:
      check_keys(config, keys, path)
  except InputError as e:
    return str(e)
  return None


def load_config(config_path):
  """The ConfigDict of a configs/*.py file, as bin/run.py would load it; a file that is
  missing, does not import, has no get_config() or whose get_config() raises is one
  InputError naming the file."""
  if not config_path or not os.path.isfile(config_path):
    raise InputError(f'{config_path}: no such config file')
  try:
    spec = importlib.util.spec_from_file_location('_coseg_config', config_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
  except SyntaxError as e:
    raise InputError(f'{config_path}: syntax error at line {e.lineno}: {e.msg}') from None
  except Exception as e:  # whatever the file's top level raises
    raise InputError(f'{config_path}: cannot import ({type(e).__name__}: {e})') from None
  if not callable(getattr(module, 'get_config', None)):
    raise InputError(f'{config_path}: defines no get_config()')
  try:
    return module.get_config()
  except Exception as e:
    raise InputError(f'{config_path}: get_config() raised {type(e).__name__}: {e}') from None


def check_keys(config, keys, config_path):
  """Every key names a field of `config`: a typo fails here, not in every run."""
  seen = set()
  for key in keys:
    if key in seen:
      raise InputError(f'{key}: overridden twice (in --grid or --set)')
    seen.add(key)
    node = config
    for part in key.split('.'):
      if not hasattr(node, 'keys') or part not in node:
        raise InputError(f'{config_path}: no config field {key}')
      node = node[part]


def parse_flags(argv, config_flag=None):
  """absl's flag parsing with one-line errors; `config_flag` is the DEFINE_config_file
  holder (None: --config is a plain path, as in bin/sweep.py)."""
  if config_flag is not None:
    # ml_collections loads the file while parsing flags and reports a missing file (with
    # overrides), a syntax error or a get_config that raises with a traceback: check first.
    problem = _config_problem(argv, keys_too=False)
    if problem:
      usage_error(problem)
  try:
    rest = flags.FLAGS(argv)
  except flags.Error as e:
    usage_error(' '.join(str(e).split()))
  except (AttributeError, KeyError) as e:  # ml_collections: no such config field
    usage_error(_config_problem(argv) or ' '.join(str(e).split()))
  # A config file that fails to load is only reported when the config is first read.
  if config_flag is not None and not isinstance(config_flag.value, config_dict.ConfigDict):
    usage_error(_config_problem(argv) or 'cannot load the --config file')
  return rest
