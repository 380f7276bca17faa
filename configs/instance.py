"""DeepCO3 instance co-segmentation (SPEC §4) on the default EfficientNet-Lite0 backbone.

  python bin/run.py --config=configs/instance.py

Without a data root it runs the built-in instance demo group (1-3 cat heads per image,
a salient distractor in every other image, exact instance masks known) and prints
mAP^r at IoU 0.25/0.5/0.75 and CorLoc^r; outputs land in runs/instance/. The
saliency-only baseline (SPEC §6(b)), scored by the same code:

  python bin/run.py --config=configs/instance.py --config.baseline=saliency

The authors' setting (448 px, batch 6, Adam, weight decay 5e-4, Eq. 7 ranking) except,
for EfficientNet-Lite0 on real photographs (BUILD.md, "Real photographs (DeepCO3)"):
the ImageNet backbone is fine-tuned at lr 1e-5 and the zero-initialised saliency head at
100x that (1e-3): with the whole network at 1e-3 the saliency loss did not move in 40
steps on fudanped24 (0.114 -> 0.106, S > 0.5 almost everywhere), at 1e-5 / 1e-3 it fell
to 0.039; 40 steps instead of 40 epochs (train.steps: the saliency loss is lowest near
step 40 on a group of any size, and 10 epochs of the 74-image fudanped, 130 steps, lost
half its mAP^r@0.25); the saliency prior is 'ddt_mbd', instance peaks must be salient
(config.rank.peak_min_score), and Eq. 7 ranks the saliency baseline's instances (the
prior's connected components, redrawn by the dense CRF and cut side by side by the group's
shape: config.saliency.refine, config.saliency.split) instead of superpixel proposals
(config.proposals.source='none'), every one of them a detection scored by its best peak
(config.rank.detections='auto'; a peak's best candidate only with proposals, as in the
paper). The paper's setting, e.g. with VGG16 weights and MCG proposals in a folder:

  --config.train.learning_rate=1e-6 --config.train.head_lr_mult=1
  --config.train.steps=0 --config.train.epochs=40
  --config.saliency.prior=mbd --config.rank.peak_min_score=-inf
  --config.proposals.source=folder --config.proposals.folder=<MCG masks>
  --config.proposals.prior_components=False
"""
from coseg_jax.core import config as defaults


def get_config():
  # The library's defaults are this file's (the Python API, coseg_jax.instances, uses them).
  return defaults.instance()
