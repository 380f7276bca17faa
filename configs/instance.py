"""DeepCO3 instance co-segmentation with the authors' hyper-parameters (SPEC §4).

  python bin/run.py --config=configs/instance.py

Without a data root it runs the built-in instance demo group (several instances per
image, exact instance masks known) and prints mAP^r at IoU 0.25/0.5/0.75 and CorLoc^r;
outputs land in runs/instance/.

The defaults are the paper's (448 px, 40 epochs, batch 6, Adam lr 1e-6). On a 2-core CPU
the demo at 448 px takes about 11 CPU-minutes; a fast CPU setting (about 3 CPU-minutes):

  python bin/run.py --config=configs/instance.py --config.data.image_size=224

With 6 images an epoch is one step, so lr 1e-6 barely moves the model in 40 steps (the
authors' groups have tens of images); BUILD.md ("DeepCO3 (instance) design notes") has
the measured effect of the learning rate. The saliency-only baseline (SPEC §6(b)):

  python bin/run.py --config=configs/instance.py --config.baseline=saliency
"""
from coseg_jax import config as defaults


def get_config():
  return defaults.instance()
