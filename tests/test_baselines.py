import jax.numpy as jnp
import numpy as np
from skimage import transform

from coseg_jax.core import data
from coseg_jax.multiclass import baseline
from coseg_jax.multiclass import metrics


def _separated_features(seed):
  """Three orthogonal feature directions with noise and random per-pixel magnitudes."""
  rng = np.random.default_rng(seed)
  directions_3xC = np.linalg.qr(rng.normal(size=(16, 3)))[0].T
  truths = [rng.integers(0, 3, shape) for shape in ((6, 8), (4, 5), (7, 3))]
  feats = [(directions_3xC[t] + rng.normal(0, 0.05, (*t.shape, 16)))
           * rng.uniform(0.5, 5.0, (*t.shape, 1)) for t in truths]
  return feats, [t.astype(np.uint8) for t in truths]


def test_kmeans_recovers_separated_clusters_deterministically():
  feats, truths = _separated_features(0)
  labels = baseline.cluster_group(feats, 3, seed=0)
  assert [l.shape for l in labels] == [t.shape for t in truths]
  assert all(l.dtype == np.uint8 for l in labels)
  score = metrics.score_group(labels, truths, 2, fixed_background=False)
  assert score['P'] == 1.0 and score['J'] == 1.0
  again = baseline.cluster_group(feats, 3, seed=0)
  for a, b in zip(labels, again):
    np.testing.assert_array_equal(a, b)


def test_soft_maps_are_bilinear_one_hot_that_sum_to_one():
  labels = np.array([[0, 2, 1], [1, 1, 0]], np.uint8)
  maps = baseline.soft_maps(labels, 3, (8, 13))
  reference = transform.resize(np.eye(3)[labels], (8, 13, 3), order=1, mode='edge',
                               anti_aliasing=False)
  np.testing.assert_allclose(maps, reference, atol=1e-6)
  np.testing.assert_allclose(maps.sum(-1), 1.0, rtol=1e-6)


class _FakeBackbone:
  """Stride-4 average colour, linearly embedded: a stand-in for a frozen extractor."""

  def __init__(self):
    self.seen = []

  def apply(self, variables, x01_BxHxWx3, taps):
    self.seen.append((x01_BxHxWx3.shape, taps))
    B, H, W, _ = x01_BxHxWx3.shape
    pooled = x01_BxHxWx3.reshape(B, H // 4, 4, W // 4, 4, 3).mean((2, 4))
    return {taps[0]: pooled @ variables['embed']}


def _three_stripes(H, W):
  truth = np.zeros((H, W), np.uint8)
  truth[:, W // 3:2 * W // 3] = 1
  truth[:, 2 * W // 3:] = 2
  colours = np.array([[128, 128, 128], [230, 20, 20], [20, 20, 230]], np.uint8)
  return colours[truth], truth


def test_cluster_baseline_segments_colour_regions_at_original_size():
  rng = np.random.default_rng(0)
  pairs = [_three_stripes(40, 57), _three_stripes(48, 48), _three_stripes(30, 70)]
  images, truths = [p[0] for p in pairs], [p[1] for p in pairs]
  backbone = _FakeBackbone()
  variables = {'embed': jnp.asarray(rng.normal(size=(3, 6)), jnp.float32)}
  maps = baseline.cluster_baseline(backbone, variables, data.resize_batch(images, 32),
                                    [im.shape[:2] for im in images], num_classes=2, seed=0,
                                    tap='feat')
  assert backbone.seen == [((1, 32, 32, 3), ('feat',))]  # traced once: no recompilation
  assert [m.shape for m in maps] == [(*im.shape[:2], 3) for im in images]
  for m in maps:
    np.testing.assert_allclose(m.sum(-1), 1.0, rtol=1e-5)
  labels = [m.argmax(-1).astype(np.uint8) for m in maps]
  score = metrics.score_group(labels, truths, 2, fixed_background=False)
  assert score['P'] > 0.9
  assert score['J'] > 0.8
