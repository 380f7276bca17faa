"""K when nobody knows it: the number of common classes of a group (BUILD.md, "Estimating K").

For each K = 1..max_classes + 1 the group's dense features are clustered into K + 1
k-means clusters (the clustering baseline's partition, before any training), the group's
background rule names one of them background, and the co-attention loss (Eqs. 4-7, the
same f, pooling and scale as training) is evaluated on the partition's masked images.
While every foreground cluster is a class common to the group, its masked images agree
across images and differ from the other labels', and the loss stays low; the first
cluster that is not (one image's own background, a class split in two) raises it. The
estimate is the K after which the loss rises the most, relative to its value:
argmax over K of loss(K + 1) / loss(K). The rule has no threshold to tune; it needs the
loss one K past max_classes.
"""
import jax.numpy as jnp
import numpy as np

from coseg_jax.multiclass import baseline
from coseg_jax.multiclass import losses


def partition_loss(background, images_NxSxSx3, dense_feats_list, num_classes, seed, rule,
                   prior=None):
  """Co-attention loss of the group's (K + 1)-cluster k-means partition, with the
  cluster `rule` names as background. `background`: the run's `pipeline.Background`;
  `prior`: the group's co-saliency prior, which the 'saliency' rule reads."""
  k1 = num_classes + 1
  labels = baseline.cluster_group(dense_feats_list, k1, seed)
  vectors_NxK1xD, present_NxK1 = background.label_vectors(images_NxSxSx3, labels, k1)
  bg = background.label(images_NxSxSx3, labels, k1, rule=rule,
                        vectors=(vectors_NxK1xD, present_NxK1), prior=prior)
  order = np.arange(k1)
  order[[0, bg]] = order[[bg, 0]]
  return float(losses.coattention_loss(jnp.asarray(vectors_NxK1xD[:, order])))


def choose(loss_per_k):
  """The K (all but the largest key of `loss_per_k`) after which the loss rises most,
  relative to its value; ties go to the smaller K."""
  ks = sorted(loss_per_k)[:-1]
  rise = [loss_per_k[k + 1] / max(loss_per_k[k], 1e-12) for k in ks]
  return ks[int(np.argmax(rise))]


def estimate(background, images_NxSxSx3, dense_feats_list, max_classes, seed, rule,
             prior=None):
  """(K, {K: partition loss} for K = 1..max_classes + 1)."""
  loss_per_k = {k: partition_loss(background, images_NxSxSx3, dense_feats_list, k, seed, rule,
                                  prior)
                for k in range(1, max_classes + 2)}
  return choose(loss_per_k), loss_per_k
