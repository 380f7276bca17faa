"""Runs one experiment: python bin/run.py --config=configs/three_class.py [--workdir=DIR].

Override any field with --config.section.field=value, e.g.
  python bin/run.py --config=configs/three_class.py --config.data.image_size=128
"""
import os
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from coseg_jax import main as coseg_main

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Experiment config file (configs/*.py).', lock_config=True)
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Output directory; default runs/<config file name>.')
flags.mark_flags_as_required(['config'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  workdir = _WORKDIR.value
  if workdir is None:
    name = os.path.splitext(os.path.basename(config_flags.get_config_filename(flags.FLAGS['config'])))[0]
    workdir = os.path.join('runs', name)
  sys.exit(coseg_main.run_cli(_CONFIG.value, workdir))


if __name__ == '__main__':
  app.run(main)
