"""The design choices of BUILD.md ("trivial optima") on the real loss with a stand-in f."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
from ml_collections import config_dict
import numpy as np
import pytest

from coseg_jax.core import config as defaults
from coseg_jax.multiclass import attention
from coseg_jax.multiclass import generator
from coseg_jax.multiclass import pipeline as multiclass


@dataclasses.dataclass(frozen=True)
class _ConvExtractor:
  """A fixed random conv + ReLU at stride 4: like any CNN, a black image maps to one
  constant feature, which is what makes empty masks look alike."""
  name: str = 'efficientnet_lite0'

  def apply(self, w, x, taps):
    h = jax.nn.relu(jax.lax.conv_general_dilated(
        x - 0.3, w, (4, 4), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC')))
    return {taps[0]: h}


def _group(size=32):
  """Three images: a red and a blue square at different places on different greys."""
  rng = np.random.default_rng(0)
  images, truths = [], []
  for n in range(3):
    img = np.full((size, size, 3), 0.2 + 0.3 * n, np.float32) + rng.normal(0, 0.05, (size, size, 3))
    truth = np.zeros((size, size), np.int32)
    (y1, x1), (y2, x2) = rng.integers(0, size // 2 - 2, 2), rng.integers(size // 2, size - 10, 2)
    img[y1:y1 + 10, x1:x1 + 10] = [1, 0, 0]
    truth[y1:y1 + 10, x1:x1 + 10] = 1
    img[y2:y2 + 10, x2:x2 + 10] = [0, 0, 1]
    truth[y2:y2 + 10, x2:x2 + 10] = 2
    images.append(img)
    truths.append(truth)
  return jnp.asarray(np.stack(images)), np.stack(truths)


def _loss(loss_cfg, x, maps):
  w = jax.random.normal(jax.random.PRNGKey(0), (3, 3, 3, 64))
  return float(multiclass.maps_loss(_ConvExtractor(), loss_cfg, w, x, maps))


def _soft(one_hot, floor=0.02):
  return (one_hot + floor) / (1 + one_hot.shape[-1] * floor)


@pytest.mark.slow
def test_default_loss_prefers_true_segmentation_over_trivial_optima():
  x, truth = _group()
  correct = _soft(jax.nn.one_hot(truth, 3))
  # Trivial optimum 1: foreground channels (nearly) empty, background everywhere.
  empty = _soft(jax.nn.one_hot(np.zeros_like(truth), 3))
  # Trivial optimum 2: class 1 everywhere.
  everything = _soft(jax.nn.one_hot(np.ones_like(truth), 3))
  cfg = defaults.multiclass().loss
  good = _loss(cfg, x, correct)
  assert good < _loss(cfg, x, empty)
  assert good < _loss(cfg, x, everything)

  # The thesis' plain form (global pooling of raw masks) prefers empty foreground masks:
  # the reason for the defaults.
  thesis = config_dict.ConfigDict(dict(cfg))
  thesis.pooling, thesis.normalize_maps = 'global', False
  assert _loss(thesis, x, empty) < _loss(thesis, x, correct)


class _PixelEncoder(nn.Module):
  """Features = the preprocessed pixels themselves (3-d, stride 1)."""

  @nn.compact
  def __call__(self, x):
    return {'pixels': x}


def test_cluster_init_starts_from_the_kmeans_partition_with_border_as_background():
  size = 16
  images, truths = [], []
  for n in range(3):
    img = np.zeros((size, size, 3), np.float32) + [0.1, 0.6, 0.1]     # green surround
    truth = np.zeros((size, size), np.uint8)
    y, x = 3 + n, 4 + n
    img[y:y + 6, x:x + 6] = [0.9, 0.1, 0.1]                           # red object
    truth[y:y + 6, x:x + 6] = 1
    images.append(img)
    truths.append(truth)
  x = jnp.asarray(np.stack(images))
  gen = generator.Generator(
      generator.GeneratorSpec(num_classes=1, preprocessing='imagenet', tap='pixels',
                              attention=attention.AttentionSpec(mode='none')),
      encoder=_PixelEncoder())
  params = gen.init(jax.random.PRNGKey(0), x)['params']
  feats = gen.apply({'params': params}, x, method=gen.features)
  params = multiclass.cluster_init(feats, params, num_classes=1, seed=0,
                                   temperature=defaults.multiclass().model.cluster_init_temperature)
  labels = np.asarray(gen.apply({'params': params}, x)).argmax(-1)
  np.testing.assert_array_equal(labels, np.stack(truths))
