import types

import numpy as np
import pytest

from coseg_jax.core import config
from coseg_jax.core import crf
from coseg_jax.multiclass import postprocess


def test_normalize_maps_divides_each_channel_by_its_max():
  rng = np.random.default_rng(0)
  S = rng.uniform(0.0, 0.5, (5, 6, 3)).astype(np.float32)
  S[..., 2] = 0.0
  out = postprocess.normalize_maps(S)
  np.testing.assert_allclose(out[..., :2].max(axis=(0, 1)), 1.0, rtol=1e-6)
  np.testing.assert_allclose(out[..., :2] * S[..., :2].max(axis=(0, 1)), S[..., :2], rtol=1e-6)
  assert np.all(out[..., 2] == 0.0)
  # Batched maps are normalised per image, not over the batch.
  batched = postprocess.normalize_maps(np.stack([S, 2 * S]))
  np.testing.assert_allclose(batched, np.stack([out, out]), rtol=1e-6)


def test_normalisation_can_change_the_argmax():
  # A weak but peaked class channel wins after Eq. 8 where raw argmax picks background.
  S = np.array([[[0.9, 0.05], [0.6, 0.1], [0.7, 0.3]]], np.float32)  # 1x3 image, 2 channels
  np.testing.assert_array_equal(postprocess.argmax_labels(S), [[0, 0, 0]])
  labels = postprocess.labels_from_maps(None, S, types.SimpleNamespace(method='argmax'))
  assert labels.dtype == np.uint8
  np.testing.assert_array_equal(labels, [[0, 0, 1]])


def _two_region_problem(seed, size=32, p_true=0.55):
  rng = np.random.default_rng(seed)
  truth = np.zeros((size, size), np.uint8)
  truth[:, size // 2:] = 1
  image = np.where(truth[..., None] == 1, 200, 40).astype(np.uint8).repeat(3, axis=-1)
  # Noisy maps whose argmax is wrong on about 40% of the pixels.
  p1 = np.clip(np.where(truth == 1, p_true, 1 - p_true) + rng.normal(0, 0.2, truth.shape),
               0.01, 0.99)
  return image, truth, np.stack([1 - p1, p1], -1).astype(np.float32)


def test_dense_crf_cleans_noisy_maps():
  image, truth, S = _two_region_problem(0)
  crf_cfg = config.multiclass().infer.crf
  argmax_acc = np.mean(postprocess.argmax_labels(S) == truth)
  crf_labels = crf.dense_crf_labels(image, S, crf_cfg)
  crf_acc = np.mean(crf_labels == truth)
  assert crf_labels.dtype == np.uint8 and crf_labels.shape == truth.shape
  assert argmax_acc < 0.8
  assert crf_acc > argmax_acc
  assert crf_acc > 0.95


def test_labels_from_maps_selects_crf_from_config():
  image, truth, S = _two_region_problem(1)
  cfg = config.multiclass().infer
  cfg.method = 'crf'
  np.testing.assert_array_equal(postprocess.labels_from_maps(image, S, cfg),
                                crf.dense_crf_labels(image, postprocess.normalize_maps(S), cfg.crf))
  cfg.method = 'argmax'
  np.testing.assert_array_equal(postprocess.labels_from_maps(image, S, cfg),
                                postprocess.argmax_labels(postprocess.normalize_maps(S)))


def test_crf_unary_power_sharpens_the_unary():
  # A high power makes the noisy unary dominate the pairwise terms: the CRF then follows
  # the pixelwise argmax instead of cleaning it.
  image, truth, S = _two_region_problem(2)
  cfg = config.multiclass().infer.crf
  argmax = postprocess.argmax_labels(S)
  agreement = {}
  for power in (1.0, 30.0):
    cfg.unary_power = power
    agreement[power] = np.mean(crf.dense_crf_labels(image, S, cfg) == argmax)
  assert agreement[30.0] > agreement[1.0] + 0.2


def _far_twin_problem(scale):
  """Two patches of one colour, far apart on a dark ground: the left one's maps say class 1,
  the right one's barely lean to background. Only an appearance kernel reaching across the
  gap carries class 1 over to the right patch. `scale` upsamples the whole problem."""
  image = np.full((24, 96, 3), 30, np.uint8)
  p1 = np.full((24, 96), 0.05)
  image[8:16, 8:16] = image[8:16, 72:80] = 220
  p1[8:16, 8:16], p1[8:16, 72:80] = 0.95, 0.45
  S = np.stack([1 - p1, p1], -1).astype(np.float32)
  up = lambda a: np.repeat(np.repeat(a, scale, axis=0), scale, axis=1)
  return up(image), up(S)


def test_crf_spatial_stds_scale_with_the_photo():
  cfg = config.multiclass().infer.crf
  cfg.bilateral_sxy, cfg.reference_area = 80.0, 24.0 * 96
  image, S = _far_twin_problem(1)
  small = crf.dense_crf_labels(image, S, cfg)
  assert small[12, 12] == 1 and small[12, 76] == 1  # the kernel spans the 64 px gap
  image2, S2 = _far_twin_problem(3)
  big = crf.dense_crf_labels(image2, S2, cfg)
  np.testing.assert_array_equal(big[1::3, 1::3], small)  # the same labels at 3x
  cfg.reference_area = 0.0  # literal pixels: at 3x the gap is out of the kernel's reach
  assert crf.dense_crf_labels(image2, S2, cfg)[36, 228] == 0


def test_unknown_method_is_a_value_error():
  with pytest.raises(ValueError, match='median'):
    postprocess.labels_from_maps(None, np.ones((2, 2, 2)), types.SimpleNamespace(method='median'))


def test_background_by_border_swaps_in_the_label_owning_the_borders():
  a = np.full((6, 6), 2, np.uint8)
  a[2:4, 2:4] = 0                     # label 0 inside, label 2 around
  b = np.full((5, 7), 2, np.uint8)
  b[1:3, 1:4] = 1
  b[3:5, 4:7] = 0                     # label 0 touches the border a little
  out = postprocess.background_by_border([a, b], 3)
  assert (out[0][2:4, 2:4] == 2).all() and out[0][0, 0] == 0
  assert (out[1][1:3, 1:4] == 1).all() and (out[1][3:5, 4:7] == 2).all()
  # Already background on the border: unchanged.
  same = postprocess.background_by_border(out, 3)
  for x, y in zip(same, out):
    np.testing.assert_array_equal(x, y)
