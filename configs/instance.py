"""DeepCO3 instance co-segmentation with the authors' hyper-parameters (SPEC §4).

  python bin/run.py --config=configs/instance.py

Without a data root it runs the built-in instance demo group (several instances per
image, exact instance masks known) and prints mAP^r at IoU 0.25/0.5/0.75 and CorLoc^r;
outputs land in runs/instance/.
"""
from coseg_jax import config as defaults


def get_config():
  return defaults.instance()
