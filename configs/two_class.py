"""Thesis setting with K = 2 foreground classes.

  python bin/run.py --config=configs/two_class.py --config.data.root=/path/to/groups

Without a data root it runs the built-in two-class demo group and prints P/J;
outputs land in runs/two_class/.
"""
from coseg_jax.core import config as defaults


def get_config():
  c = defaults.multiclass()
  c.num_classes = 2  # K: foreground classes shared by the group.
  return c
