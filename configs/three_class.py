"""Thesis setting with K = 3 foreground classes.

  python bin/run.py --config=configs/three_class.py

With no --config.data.root this runs the built-in demo group (generated from images
that ship with scikit-image, exact masks known) and prints per-image P/J and the group
mean; outputs land in runs/three_class/. CPU-fast variant:
  python bin/run.py --config=configs/three_class.py --config.data.image_size=128
On your own data: --config.data.root=/path/to/group_or_dataset.
"""
from coseg_jax.core import config as defaults


def get_config():
  c = defaults.multiclass()
  c.num_classes = 3  # K: foreground classes shared by the group.
  return c
