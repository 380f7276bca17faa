import jax
import jax.numpy as jnp
import numpy as np
import pytest

from coseg_jax.multiclass import losses


def _brute_force(feat, k):
  b = feat.shape[0]
  terms = []
  for i in range(b):
    for j in range(b):
      if i == j:
        continue
      for c in range(1, k + 1):
        dp = np.sum((feat[i, c] - feat[j, c]) ** 2)
        dn = sum(np.sum((feat[i, c] - feat[i, l]) ** 2) + np.sum((feat[j, c] - feat[j, l]) ** 2)
                 for l in range(k + 1) if l != c) / (2 * k)
        terms.append(-np.log(np.exp(-dp) / (np.exp(-dp) + np.exp(-dn))))
  return np.mean(terms)


@pytest.mark.slow
def test_matches_equations_4_to_7():
  feat = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (3, 4, 5))) * 0.5
  np.testing.assert_allclose(losses.coattention_loss(jnp.asarray(feat)), _brute_force(feat, 3),
                             rtol=1e-5)


@pytest.mark.slow
def test_finite_with_finite_gradients_even_when_saturated():
  feat = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 16)) * 100.0  # exp(-d) underflows
  loss, grad = jax.value_and_grad(losses.coattention_loss)(feat)
  assert np.isfinite(loss) and np.isfinite(grad).all()
  # Identical features everywhere: d+ = d- = 0, loss = log 2 and finite gradients.
  same = jnp.ones((3, 3, 4))
  loss, grad = jax.value_and_grad(lambda f: losses.coattention_loss(
      losses.normalize_features(f, 'l2', 2.0)))(same)
  np.testing.assert_allclose(loss, np.log(2.0), rtol=1e-6)
  assert np.isfinite(grad).all()


def _image(positions, size=16):
  """Grey image with a red and a blue square at the given corners."""
  img = np.full((size, size, 3), 0.5, np.float32)
  masks = np.zeros((3, size, size), np.float32)
  for cls, ((y, x), colour) in enumerate(zip(positions, ([1, 0, 0], [0, 0, 1])), start=1):
    img[y:y + 6, x:x + 6] = colour
    masks[cls, y:y + 6, x:x + 6] = 1
  masks[0] = 1 - masks[1:].sum(0)
  return img, masks


def _features(img, masks, w):
  """A fixed random conv + ReLU + global pooling as a stand-in extractor."""
  masked = img[None] * masks[..., None]
  h = jax.nn.relu(jax.lax.conv_general_dilated(
      masked, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC')))
  return losses.normalize_features(h.mean((1, 2)), 'l2', 2.0)


@pytest.mark.slow
def test_lower_when_same_class_covers_same_content():
  w = jax.random.normal(jax.random.PRNGKey(2), (3, 3, 3, 32))
  layouts = [((1, 1), (9, 9)), ((9, 2), (2, 9)), ((4, 8), (8, 1))]
  consistent, swapped = [], []
  for n, pos in enumerate(layouts):
    img, masks = _image(pos)
    consistent.append(_features(img, masks, w))
    # In half the images the class channels are swapped: class 1 covers blue there.
    swapped.append(_features(img, masks[[0, 2, 1]] if n % 2 else masks, w))
  good = losses.coattention_loss(jnp.stack(consistent))
  bad = losses.coattention_loss(jnp.stack(swapped))
  assert good < bad - 0.1


@pytest.mark.slow
def test_masked_pooling_is_mask_weighted_average():
  feat = jax.random.normal(jax.random.PRNGKey(3), (2, 4, 4, 5))
  masks = jnp.zeros((2, 16, 16)).at[:, :8, :8].set(1.0)   # top-left quarter
  pooled = losses.pool_features(feat, masks, 'masked')
  np.testing.assert_allclose(pooled, feat[:, :2, :2].mean((1, 2)), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(losses.pool_features(feat, masks, 'global'), feat.mean((1, 2)),
                             rtol=1e-6)


def _two_content_group(num_images=3, size=8):
  """Dense unit features: content A in the left half, B in the right half of every image
  (a little noise per image), and the maps of a given assignment of the halves."""
  rng = np.random.default_rng(0)
  a, b = np.eye(4)[0], np.eye(4)[1]
  feat = np.zeros((num_images, size, size, 4))
  feat[:, :, :size // 2], feat[:, :, size // 2:] = a, b
  feat += 0.05 * rng.normal(size=feat.shape)
  return jnp.asarray(feat, jnp.float32)


def _maps(num_images, size, class_cols):
  """Channel 1 on the columns class_cols[i] of image i, channel 0 elsewhere (HxWx2)."""
  m = np.zeros((num_images, size, size, 2), np.float32)
  m[..., 0] = 1.0
  for i, cols in enumerate(class_cols):
    m[i, :, cols, 1], m[i, :, cols, 0] = 1.0, 0.0
  return jnp.asarray(0.98 * m + 0.01)


def test_coverage_loss_sees_a_shrunken_channel():
  """The co-attention loss cannot tell a class channel that covers its content from one
  that keeps a few of its pixels; the coverage term can."""
  feat = _two_content_group()
  full = _maps(3, 8, [slice(0, 4)] * 3)
  shrunk = _maps(3, 8, [slice(0, 1)] * 3)  # a quarter of A; the rest leaks to background
  assert losses.coverage_loss(feat, full, 2.0) < losses.coverage_loss(feat, shrunk, 2.0) - 0.5


def test_coverage_loss_asks_the_other_images():
  """Class vectors come from the other images: a class that means A in two images and B
  in the third costs more than one that means A everywhere (leave-one-out)."""
  feat = _two_content_group()
  same = _maps(3, 8, [slice(0, 4)] * 3)
  flipped = _maps(3, 8, [slice(0, 4), slice(0, 4), slice(4, 8)])
  assert losses.coverage_loss(feat, same, 2.0) < losses.coverage_loss(feat, flipped, 2.0) - 0.5


def test_coverage_loss_gradient_pulls_leaked_pixels_back_into_the_class():
  feat = _two_content_group()
  shrunk = _maps(3, 8, [slice(0, 1)] * 3)
  grad = jax.grad(lambda m: losses.coverage_loss(feat, m, 2.0))(shrunk)
  # A pixels the channel left out (columns 1-3): more class-1 probability lowers the loss;
  # B pixels (columns 4-7): more background probability lowers it.
  assert (grad[:, :, 1:4, 1] < grad[:, :, 1:4, 0]).all()
  assert (grad[:, :, 4:, 0] < grad[:, :, 4:, 1]).all()
