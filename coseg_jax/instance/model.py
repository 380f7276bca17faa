"""DeepCO3 co-peak search (SPEC §4): correlation, co-peaks, the three losses, the model.

Everything here is a pure jittable function; pairs are handled with `jax.vmap`.

Peaks (4D co-peaks and 2D instance peaks) share one definition, `local_maxima`: a
point is a peak when it equals the maximum of its 3x...x3 window, the window being
padded with -inf outside the array (so borders and corners are ordinary candidates),
and it is >= the median of the whole array. Ties are kept: every point of a flat
plateau that is a local maximum is a peak (a constant array is all peaks). The global
maximum of a finite array always qualifies, so there is at least one peak.
"""
import dataclasses
import functools
from typing import Any, Callable

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from coseg_jax.instance import prm


def l2_normalize(feat_BxHxWxC, eps=1e-2):
  """f / sqrt(sum f^2 + eps) per pixel; eps keeps near-zero features near zero."""
  return feat_BxHxWxC / jnp.sqrt(jnp.sum(feat_BxHxWxC ** 2, axis=-1, keepdims=True) + eps)


def correlation(feat_n_HxWxC, feat_m_HxWxC, sal_n_HxW, sal_m_HxW):
  """Saliency-guided correlation T(p, q) = S~n(p) S~m(q) <f^n(p), f^m(q)> (Eq. 2)."""
  t_HxWxHxW = jnp.einsum('ijc,stc->ijst', feat_n_HxWxC, feat_m_HxWxC)
  return sal_n_HxW[:, :, None, None] * sal_m_HxW[None, None, :, :] * t_HxWxHxW


def window_max(x):
  """Max over the 3x...x3 window of every element, -inf outside the array.

  A box max is separable: one 3-wide window per axis. On CPU, XLA runs one 3^4 window
  ~60x slower, and a max of padded, shifted slices 2-3x slower.
  """
  for axis in range(x.ndim):
    window = tuple(3 if a == axis else 1 for a in range(x.ndim))
    x = lax.reduce_window(x, -jnp.inf, lax.max, window, (1,) * x.ndim, 'SAME')
  return x


def _order_keys(x):
  """Unsigned integer keys, one per float of `x`, in the order of the values.

  Sign-magnitude floats become ordered integers by flipping every bit of the negatives
  and the sign bit of the rest (-0.0 gets the key just below 0.0's).
  """
  uint = jnp.dtype(f'uint{8 * x.dtype.itemsize}')
  sign = jnp.array(1 << (8 * x.dtype.itemsize - 1), uint)
  bits = lax.bitcast_convert_type(x, uint)
  return jnp.where(bits >= sign, ~bits, bits | sign)


def _from_order_keys(key, dtype):
  sign = jnp.array(1 << (8 * jnp.dtype(dtype).itemsize - 1), key.dtype)
  return lax.bitcast_convert_type(jnp.where(key >= sign, key ^ sign, ~key), dtype)


def _count(mask_N):
  """Number of True elements: a float32 sum where exact (fewer than 2^24 elements).

  On a flat mask, XLA's CPU backend runs that sum 1.5-3x faster than an integer one.
  """
  return jnp.sum(mask_N, dtype=jnp.float32 if mask_N.size < 2**24 else jnp.int32)


@functools.partial(jax.jit, static_argnums=1)
def kth_smallest(x, k):
  """The k-th smallest element of float `x` (k 1-based), counting repeats; x NaN-free.

  Bisection on the values' keys, one counting pass per key bit: on CPU ~50x faster
  than the sort in `jnp.median` at 3 x 28^4 elements. Jitted, so that the peak search
  of every image (called eagerly) reuses one compiled loop per map size.
  """
  x = jnp.asarray(x)
  keys = _order_keys(x.reshape(-1))

  def halve(_, lo_hi):
    lo, hi = lo_hi
    mid = lo + (hi - lo) // 2
    enough = _count(keys <= mid) >= k
    return jnp.where(enough, lo, mid + 1), jnp.where(enough, mid, hi)

  lo, _ = lax.fori_loop(0, 8 * x.dtype.itemsize, halve,
                        (jnp.array(0, keys.dtype), jnp.array(jnp.iinfo(keys.dtype).max, keys.dtype)))
  return _from_order_keys(lo, x.dtype)


def median(x):
  """numpy's median of all elements of float `x` (NaN-free), by selection, not sorting."""
  x = jnp.asarray(x)
  n = x.size
  lower = kth_smallest(x, (n + 1) // 2)
  if n % 2:
    return lower
  # The next order statistic: `lower` again if it is repeated, else the next value up.
  flat = x.reshape(-1)
  upper = jnp.where(_count(flat <= lower) > n // 2, lower,
                    jnp.min(jnp.where(flat > lower, flat, jnp.inf)))
  return (lower + upper) / 2


def local_maxima(x):
  """Bool mask of the peaks of `x` (any rank; definition in the module docstring)."""
  return (x >= window_max(x)) & (x >= median(x))


def copeak_mask(t_HxWxHxW):
  """Co-peaks: 4D local maxima of T in a 3x3x3x3 window that are >= the median of T."""
  return local_maxima(t_HxWxHxW)


def copeak_loss(t_HxWxHxW, mask_HxWxHxW):
  """softplus(-x) = -log sigmoid(x), x = mean of T over the co-peaks.

  The mask is a constant, so the gradient reaches T at the co-peaks only. A finite T
  has at least one co-peak; a non-finite one gives NaN, which stops training.
  """
  mask = lax.stop_gradient(mask_HxWxHxW).astype(t_HxWxHxW.dtype)
  return jax.nn.softplus(-jnp.sum(t_HxWxHxW * mask) / jnp.sum(mask))


def affinity_loss(feat_PxC, sal_P, alpha=4.0):
  """mean[S~p S~q (1 - A)] + alpha mean[(S~p - S~q)^2 A] over all pixel pairs (errata Eq. 4).

  P stacks every pixel of every image of the batch, so same-image pairs are included.
  A is the inner product of the L2-normalised features (their cosine similarity up to
  the normalisation's eps, as in the authors' code).
  """
  a_PxP = feat_PxC @ feat_PxC.T
  both_salient = sal_P[:, None] * sal_P[None, :]
  differ = (sal_P[:, None] - sal_P[None, :]) ** 2
  return jnp.mean(both_salient * (1.0 - a_PxP)) + alpha * jnp.mean(differ * a_PxP)


def saliency_loss(sal_BxHxW, prior_BxHxW):
  """Class-balanced squared error to the prior binarised at its per-image mean (Eq. 6).

  Foreground (prior > its mean) pixels weigh the background fraction and background
  pixels the foreground fraction, so both regions count equally; per image the sum is
  divided by H*W, then averaged over the batch. A constant prior has no foreground and
  contributes nothing.
  """
  fg = (prior_BxHxW > jnp.mean(prior_BxHxW, axis=(1, 2), keepdims=True)).astype(sal_BxHxW.dtype)
  fg_fraction = jnp.mean(fg, axis=(1, 2), keepdims=True)
  weight = fg * (1.0 - fg_fraction) + (1.0 - fg) * fg_fraction
  return jnp.mean(jnp.mean(weight * (sal_BxHxW - fg) ** 2, axis=(1, 2)))


def instance_peaks(score_HxW):
  """(y, x) peaks of the pre-sigmoid small score map (3x3 window, >= median), row-major."""
  mask = np.asarray(local_maxima(jnp.asarray(score_HxW, jnp.float32)))
  return [(int(y), int(x)) for y, x in np.argwhere(mask)]


def init_head(num_channels):
  """Zero-initialised 1x1 conv to one channel: S~ = 0.5 everywhere at the start."""
  return {'kernel': jnp.zeros((1, 1, num_channels, 1), jnp.float32),
          'bias': jnp.zeros((1,), jnp.float32)}


@dataclasses.dataclass(frozen=True)
class BackboneFeatures:
  """`(backbone_params, frozen, image01_BxHxWx3) -> feat_BxhxwxC` of one backbone tap.

  `frozen` holds the backbone's non-trainable collections (e.g. BN statistics) or is None.
  """
  backbone: Any
  tap: str

  def __call__(self, backbone_params, frozen, image01_BxHxWx3):
    variables = {'params': backbone_params, **(frozen or {})}
    return self.backbone.apply(variables, image01_BxHxWx3, taps=(self.tap,))[self.tap]


@dataclasses.dataclass(frozen=True)
class DeepCO3:
  """Backbone features f -> 1x1 saliency head; per-pixel L2-normalised f for the correlations.

  As in the authors' network the head reads the raw features (only the correlation and
  affinity branches read the normalised ones). This also keeps peak back-propagation
  positive: the normalisation's backward pass subtracts the feature direction, which
  for non-negative (ReLU) features turns every peak response map negative.

  params = {'backbone': ..., 'head': init_head(C)}; `with_peak_backprop()` gives the
  same network with the PRM rule in every conv, for `prm.peak_response_maps`.
  """
  features: Callable
  l2_eps: float = 1e-2
  conv_general_dilated: Callable = lax.conv_general_dilated

  def __call__(self, params, frozen, image01_BxHxWx3):
    """Returns feat (normalised, Bxhxwxc), score (pre-sigmoid, Bxhxw), sal_small, sal_full (BxHxW)."""
    feat = self.features(params['backbone'], frozen, image01_BxHxWx3)
    head = params['head']
    score_Bxhxw = self.conv_general_dilated(
        feat, head['kernel'], (1, 1), 'VALID',
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))[..., 0] + head['bias'][0]
    b, h, w = image01_BxHxWx3.shape[:3]
    # The full map upsamples the score, not the sigmoid, with a fixed bilinear kernel.
    score_full = jax.image.resize(score_Bxhxw, (b, h, w), 'bilinear')
    return {'feat': l2_normalize(feat, self.l2_eps), 'score': score_Bxhxw,
            'sal_small': jax.nn.sigmoid(score_Bxhxw), 'sal_full': jax.nn.sigmoid(score_full)}

  def with_peak_backprop(self):
    """This network with `prm.conv_general_dilated` in the backbone and the head.

    Needs `features` to be a BackboneFeatures around a `weights.Backbone`.
    """
    bb = self.features.backbone
    backbone = dataclasses.replace(bb, module=bb.module.clone(conv_general_dilated=prm.conv_general_dilated))
    return dataclasses.replace(self, features=dataclasses.replace(self.features, backbone=backbone),
                               conv_general_dilated=prm.conv_general_dilated)

  def score(self, params_and_frozen, image01_1xHxWx3):
    """The hxw score map of one image: the `apply_fn` of `prm.peak_response_maps`."""
    params, frozen = params_and_frozen
    return self(params, frozen, image01_1xHxWx3)['score'][0]


@dataclasses.dataclass(frozen=True)
class LossWeights:
  """Weights of the three terms (Eq. 1) and the affinity loss' alpha."""
  copeak: float = 0.5
  affinity: float = 0.1
  affinity_alpha: float = 4.0
  saliency: float = 1.0

  @classmethod
  def from_config(cls, config):
    l = config.loss
    return cls(copeak=l.copeak_weight, affinity=l.affinity_weight,
               affinity_alpha=l.affinity_alpha, saliency=l.saliency_weight)


def to_unit_range(image_BxHxWx3):
  """uint8 images to float32 [0, 1]; float images are assumed to be in [0, 1] already."""
  if image_BxHxWx3.dtype == jnp.uint8:
    return image_BxHxWx3.astype(jnp.float32) / 255.0
  return image_BxHxWx3.astype(jnp.float32)


def deepco3_loss(params, frozen, batch, *, model: DeepCO3, weights: LossWeights = LossWeights()):
  """Total DeepCO3 loss of one batch; `functools.partial` it for `train.fit`.

  Args:
    params: {'backbone': ..., 'head': ...}, all trained.
    frozen: the backbone's non-trainable collections, or None.
    batch: 'image' (BxHxWx3, uint8 or float in [0, 1]) and 'prior' (BxHxW saliency
      prior). Image i is paired with image i + B/2.

  Returns:
    (loss, aux) with the three unweighted terms and the mean number of co-peaks per pair.
  """
  image = batch['image']
  b = image.shape[0]
  if b % 2:
    raise ValueError(f'DeepCO3 pairs image i with i + B/2, so the batch size must be even '
                     f'(got {b})')
  out = model(params, frozen, to_unit_range(image))
  feat, sal = out['feat'], out['sal_small']
  half = b // 2
  t_Pxhxwxhxw = jax.vmap(correlation)(feat[:half], feat[half:], sal[:half], sal[half:])
  mask = jax.vmap(copeak_mask)(lax.stop_gradient(t_Pxhxwxhxw))
  copeak = jnp.mean(jax.vmap(copeak_loss)(t_Pxhxwxhxw, mask))
  affinity = affinity_loss(feat.reshape(-1, feat.shape[-1]), sal.reshape(-1), weights.affinity_alpha)
  saliency = saliency_loss(out['sal_full'], batch['prior'].astype(jnp.float32))
  loss = weights.copeak * copeak + weights.affinity * affinity + weights.saliency * saliency
  aux = {'copeak': copeak, 'affinity': affinity, 'saliency': saliency,
         'copeaks_per_pair': jnp.mean(jnp.sum(mask, axis=(1, 2, 3, 4)).astype(jnp.float32))}
  return loss, aux
