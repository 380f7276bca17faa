"""Runs one experiment: python bin/run.py --config=configs/three_class.py [--workdir=DIR].

Override any field with --config.section.field=value, e.g.
  python bin/run.py --config=configs/three_class.py --config.data.image_size=128
"""
import functools
import os
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from coseg_jax.cli import flags as cli_flags

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Experiment config file (configs/*.py).', lock_config=True)
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Output directory; default runs/<config file name>.')
flags.mark_flags_as_required(['config'])


def main(argv):
  if len(argv) > 1:
    cli_flags.usage_error(f'unexpected arguments: {" ".join(argv[1:])}')
  workdir = _WORKDIR.value
  if workdir is None:
    config_path = config_flags.get_config_filename(flags.FLAGS['config'])
    workdir = os.path.join('runs', os.path.splitext(os.path.basename(config_path))[0])
  # Imported here so that flag errors are reported before jax loads (seconds).
  from coseg_jax.cli import main as coseg_main
  sys.exit(coseg_main.run_cli(_CONFIG.value, workdir))


if __name__ == '__main__':
  app.run(main, flags_parser=functools.partial(cli_flags.parse_flags, config_flag=_CONFIG))
