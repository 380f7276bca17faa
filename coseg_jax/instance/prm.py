"""Peak back-propagation (Zhou et al., PRM, CVPR 2018) as used by DeepCO3 (SPEC §4).

`conv_general_dilated` is a drop-in for `lax.conv_general_dilated` (the attribute every
backbone conv and the saliency head take) whose forward pass is the ordinary
convolution and whose backward pass is the PRM rule: with x~ = x - min x (per image),
W+ = relu(W),

  g <- g / (conv(x~, W+) + 1e-10),   g_in = x~ * conv^T(g, W+).

The rule propagates only through the excitatory part of every filter and redistributes
the signal in proportion to each input's contribution, so the map at the input covers
the instance behind one peak. Its gradient for the weights is zero: the rule is for
visualisation, never for training. ReLU, max-pooling, bias, normalisation and the
bilinear resizes keep their standard backward passes.
"""
import functools

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from coseg_jax.backbones import cpu_kernels

_EPS = 1e-10


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, batch_group_count=1,
                         precision=None, preferred_element_type=None):
  """`lax.conv_general_dilated` with the PRM backward rule (same signature)."""
  # The backbones' convolution (depthwise as slices, 1x1 as dots: XLA's CPU grouped convs
  # are slow) in the forward and in the rule's conv / conv^T; the rule is unchanged.
  conv = functools.partial(
      cpu_kernels.conv_general_dilated, window_strides=window_strides, padding=padding,
      lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
      feature_group_count=feature_group_count, batch_group_count=batch_group_count,
      precision=precision, preferred_element_type=preferred_element_type)
  batch_axis = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers).lhs_spec[0]
  return _prm_conv(conv, batch_axis, lhs, rhs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _prm_conv(conv, batch_axis, x, w):
  del batch_axis
  return conv(x, w)


def _prm_conv_fwd(conv, batch_axis, x, w):
  return conv(x, w), (x, w)


def _prm_conv_bwd(conv, batch_axis, residuals, g):
  x, w = residuals
  # min over each image on its own, so a map does not depend on what it is batched with.
  other_axes = tuple(a for a in range(x.ndim) if a != batch_axis)
  x_shift = x - jnp.min(x, axis=other_axes, keepdims=True)
  w_pos = jax.nn.relu(w)
  norm, conv_t = jax.vjp(lambda v: conv(v, w_pos), x_shift)
  (g_in,) = conv_t(g / (norm + _EPS))
  return x_shift * g_in, jnp.zeros_like(w)


_prm_conv.defvjp(_prm_conv_fwd, _prm_conv_bwd)


@functools.partial(jax.jit, static_argnums=0)
def _maps_for_onehots(apply_fn, params, x_1xHxWx3, onehots_Kxhxw):
  _, vjp = jax.vjp(lambda x: apply_fn(params, x), x_1xHxWx3)
  (g_Kx1xHxWx3,) = jax.vmap(vjp)(onehots_Kxhxw)
  return g_Kx1xHxWx3[:, 0].sum(axis=-1)


def peak_response_maps(apply_fn, params, x_1xHxWx3, peaks_yx, *, chunk=8):
  """Input-gradient maps O, one per peak, of a one-hot signal on the score map.

  Args:
    apply_fn: `apply_fn(params, x_1xHxWx3) -> score_hxw`, the pre-sigmoid score map of a
      network built with this module's `conv_general_dilated`. It is a static jit
      argument: build it once and reuse it, so every image of a size compiles once.
    params: pytree passed to `apply_fn` (an argument, not a constant of the compiled code).
    x_1xHxWx3: one input image.
    peaks_yx: K (y, x) positions on the score map.
    chunk: peaks back-propagated together; peaks are padded to a multiple of it so the
      compiled function never depends on K.

  Returns:
    float32 KxHxW numpy array: each map summed over the input channels.
  """
  peaks_Kx2 = np.asarray(peaks_yx, np.int64).reshape(-1, 2)
  k = len(peaks_Kx2)
  score_shape = jax.eval_shape(lambda x: apply_fn(params, x), x_1xHxWx3).shape
  out = np.zeros((k,) + tuple(x_1xHxWx3.shape[1:3]), np.float32)
  for start in range(0, k, chunk):
    part = peaks_Kx2[start:start + chunk]
    onehots = np.zeros((chunk,) + score_shape, np.float32)
    onehots[np.arange(len(part)), part[:, 0], part[:, 1]] = 1.0
    maps = _maps_for_onehots(apply_fn, params, x_1xHxWx3, onehots)
    out[start:start + len(part)] = np.asarray(maps[:len(part)])
  return out


def peak_response_map(apply_fn, params, x_1xHxWx3, peak_yx):
  """The HxW map O of one peak (see `peak_response_maps`)."""
  return peak_response_maps(apply_fn, params, x_1xHxWx3, [peak_yx], chunk=1)[0]
