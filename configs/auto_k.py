"""The thesis method with K per group: from its classes.txt, else estimated.

  python bin/run.py --config=configs/auto_k.py --config.data.root=/path/to/groups

Each group's classes.txt gives its K, so one run scores a dataset of groups with different
K; a group without one gets K estimated (K = 1..max_classes; the run log, metrics.json's
num_classes_estimated and the report show the estimate and the loss per K). Without a data
root it runs the built-in two-class demo group; outputs land in runs/auto_k/.
"""
from coseg_jax.core import config as defaults


def get_config():
  c = defaults.multiclass()
  c.num_classes = None  # K: unset, so read from classes.txt or estimated per group.
  return c
