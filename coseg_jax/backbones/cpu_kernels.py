"""The backbones' convolution, max-pool and ReLU6, rewritten for XLA's CPU backend.

XLA's CPU backend runs grouped convolutions, 1x1 and k x k kernel gradients, strided input
gradients and `nn.max_pool`'s backward 2-100x slower than PyTorch (BENCHMARKS.md). The
public `conv_general_dilated` and `max_pool` pick the rewrites with `lax.platform_dependent`
when lowering for CPU and XLA's own ops for every other platform, whose compilers have fast
kernels for them; the values and gradients are the same (tests/test_backbones.py runs both
branches on CPU).
"""
import functools
import operator

from flax import linen as nn
import jax
from jax import lax
import jax.numpy as jnp


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, batch_group_count=1,
                         precision=None, preferred_element_type=None):
  """`lax.conv_general_dilated`; on CPU, `cpu_conv_general_dilated`."""
  kwargs = dict(window_strides=window_strides, padding=padding, lhs_dilation=lhs_dilation,
                rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                feature_group_count=feature_group_count, batch_group_count=batch_group_count,
                precision=precision, preferred_element_type=preferred_element_type)
  return lax.platform_dependent(
      lhs, rhs, cpu=functools.partial(cpu_conv_general_dilated, **kwargs),
      default=functools.partial(lax.conv_general_dilated, **kwargs))


def max_pool(x_BxHxWxC, k, s, pad=0):
  """k x k max-pool, stride s, -inf padding; on CPU, `cpu_max_pool`."""
  return lax.platform_dependent(x_BxHxWxC, cpu=lambda x: cpu_max_pool(x, k, s, pad),
                                default=lambda x: xla_max_pool(x, k, s, pad))


def xla_max_pool(x_BxHxWxC, k, s, pad=0):
  """`max_pool` off CPU: flax's reduce-window max-pool (select-and-scatter backward)."""
  return nn.max_pool(x_BxHxWxC, (k, k), (s, s), ((pad, pad), (pad, pad)))


def _strided_slice(x_BxHxWxC, dy, dx, ho, wo, sh, sw):
  """x[:, dy::sh, dx::sw] cut to ho x wo."""
  b, _, _, c = x_BxHxWxC.shape
  limit = (b, dy + sh * (ho - 1) + 1, dx + sw * (wo - 1) + 1, c)
  return lax.slice(x_BxHxWxC, (0, dy, dx, 0), limit, (1, sh, sw, 1))


def cpu_conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, batch_group_count=1,
                         precision=None, preferred_element_type=None):
  """`lax.conv_general_dilated` for CPU: NHWC depthwise convs as k*k shifted slices, 1x1 as
  dots, other dense convs with their own gradients (`_dense_conv_bwd`).

  XLA's CPU backend runs grouped convolutions 10-100x slower than PyTorch (forward and
  both gradients); the slices times the per-channel taps are elementwise ops that XLA
  fuses, with elementwise gradients. A 1x1 conv's kernel gradient is a GEMM as a dot but
  a whole-image-window convolution as a conv, which XLA runs slowly; so is a k x k conv's,
  and a strided conv's input gradient convolves a zero-dilated input.
  """
  nhwc = lax.conv_dimension_numbers(lhs.shape, rhs.shape, ('NHWC', 'HWIO', 'NHWC'))
  kh, kw = rhs.shape[:2]
  plain = (batch_group_count == 1 and preferred_element_type is None
           and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) == nhwc
           and all(d == 1 for d in tuple(lhs_dilation or ()) + tuple(rhs_dilation or ())))
  if plain and isinstance(padding, str):
    padding = lax.padtype_to_pads(lhs.shape[1:3], (kh, kw), window_strides, padding)
  if (plain and feature_group_count == 1 and (kh, kw) == (1, 1)
      and all(p == 0 for pads in padding for p in pads)):
    sh, sw = window_strides
    x = _strided_slice(lhs, 0, 0, -(-lhs.shape[1] // sh), -(-lhs.shape[2] // sw), sh, sw)
    return lax.dot_general(x, rhs[0, 0], (((3,), (0,)), ((), ())), precision=precision)
  if plain and feature_group_count == 1 and all(p >= 0 for pads in padding for p in pads):
    return _dense_conv(lhs, rhs, tuple(window_strides), tuple(map(tuple, padding)), precision)
  if not (plain and feature_group_count == lhs.shape[3] > 1 and rhs.shape[2] == 1):
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                    dimension_numbers, feature_group_count, batch_group_count,
                                    precision, preferred_element_type)
  x = lax.pad(lhs, jnp.zeros((), lhs.dtype), [(0, 0, 0), *((lo, hi, 0) for lo, hi in padding),
                                              (0, 0, 0)])
  sh, sw = window_strides
  ho, wo = (x.shape[1] - kh) // sh + 1, (x.shape[2] - kw) // sw + 1
  return functools.reduce(operator.add, [
      _strided_slice(x, dy, dx, ho, wo, sh, sw) * rhs[dy, dx, 0]
      for dy in range(kh) for dx in range(kw)])


_NHWC = ('NHWC', 'HWIO', 'NHWC')

# Size of a band's im2col matrix in `_kernel_grad_banded`: of 0.75-12 MB, 6 MB gave the
# fastest VGG16 kernel gradients at both 128 and 384 (`bin/bench.py`'s shapes).
_BAND_BYTES = 6 << 20


def _kernel_grad_banded(kernel_hw, strides, padding, precision, x_BxHxWxC, g_BxHoxWoxO):
  """dL/dW of a dense NHWC convolution, one GEMM per band of output rows.

  A band's transposed im2col matrix (its k*k shifted, strided inputs, channel-major)
  times its output gradient, summed over bands. XLA's CPU backend computes this as a
  convolution with an image-sized window, 4-7x slower than PyTorch at VGG16's
  high-resolution layers; the whole image's im2col matrix would be k*k times the input.
  The input is transposed to channels-first once, so each band's matrix is the GEMM's
  row-major K x P operand (the P x K one ran ~1.4x slower). Where whole images fit in a
  band, a band holds several (VGG16's 8x8 layers at 128 px: 1.5x faster).
  """
  (kh, kw), (sh, sw) = kernel_hw, strides
  b, ho, wo, o = g_BxHoxWoxO.shape
  c, itemsize = x_BxHxWxC.shape[3], x_BxHxWxC.dtype.itemsize
  x_CxBxHxW = lax.pad(jnp.transpose(x_BxHxWxC, (3, 0, 1, 2)), jnp.zeros((), x_BxHxWxC.dtype),
                      [(0, 0, 0), (0, 0, 0), *((lo, hi, 0) for lo, hi in padding)])
  row_bytes = wo * kh * kw * c * itemsize
  fits = lambda n: n == 1 or n * row_bytes <= _BAND_BYTES
  rows = max(r for r in range(1, ho + 1) if ho % r == 0 and fits(r))
  images = max(n for n in range(1, b + 1) if b % n == 0 and (n == 1 or fits(n * ho)))
  bands = ho // rows
  in_rows, wp = sh * (rows - 1) + kh, x_CxBxHxW.shape[3]

  def add_band(acc_KxO, index):
    image, band = index // bands * images, index % bands
    x_band = lax.dynamic_slice(x_CxBxHxW, (0, image, band * rows * sh, 0),
                               (c, images, in_rows, wp))
    cols_KxP = jnp.stack([
        lax.slice(x_band, (0, 0, dy, dx),
                  (c, images, dy + sh * (rows - 1) + 1, dx + sw * (wo - 1) + 1), (1, 1, sh, sw))
        for dy in range(kh) for dx in range(kw)]).reshape(kh * kw * c, images * rows * wo)
    g_band = lax.dynamic_slice(g_BxHoxWoxO, (image, band * rows, 0, 0), (images, rows, wo, o))
    return acc_KxO + lax.dot(cols_KxP, g_band.reshape(images * rows * wo, o),
                             precision=precision), None

  acc_KxO, _ = lax.scan(add_band, jnp.zeros((kh * kw * c, o), g_BxHoxWoxO.dtype),
                        jnp.arange(b // images * bands))
  return acc_KxO.reshape(kh, kw, c, o)


# Below this many input channels a strided conv's input gradient takes all taps in one
# GEMM (`_input_grad_phases`): ResNet-50's stem (3) ran 1.4x faster that way, its
# stride-2 3x3 convs (128-512) 2x faster as phase convolutions.
_TAP_GEMM_CHANNELS = 16


def _input_grad_phases(x_shape, strides, padding, precision, w_KxKxCxO, g_BxHoxWoxO):
  """dL/dx of a strided dense NHWC convolution, computed per phase of x.

  The padded input position s*u + r receives from the taps r, r + s, ... only, so each of
  the s x s phases r is g convolved with the flipped sub-kernel w[ry::s, rx::s] (stride 1),
  and the phases interleave into x. XLA's CPU backend instead convolves a zero-dilated g
  with the whole kernel (s^2 times the work): 1.5-2.7x PyTorch's time at ResNet-50's
  stride-2 convs, the same or better this way. With few input channels those stride-1
  convs have few outputs and run slowly; then one GEMM gives every tap's contribution
  (k*k*C columns) and a phase sums its taps' contributions, shifted.
  """
  (sh, sw), ((plo, phi), (qlo, qhi)) = strides, padding
  kh, kw, c, _ = w_KxKxCxO.shape
  b, h, wd, _ = x_shape
  _, ho, wo, _ = g_BxHoxWoxO.shape
  u, v = -(-(h + plo + phi) // sh), -(-(wd + qlo + qhi) // sw)  # phase sizes
  if c < _TAP_GEMM_CHANNELS:
    # Positions first, as g is: with taps first XLA wrote g channels-first from inside the
    # fusion that produces it (ResNet-50's stem backward: 36 vs ~8 ms at 12 x 128 px).
    taps_BxHoxWoxKxKxC = jnp.einsum('ijco,bhwo->bhwijc', w_KxKxCxO, g_BxHoxWoxO,
                                    precision=precision)

  def phase(ry, rx):
    my, mx = -(-(kh - ry) // sh), -(-(kw - rx) // sw)  # taps reaching this phase per axis
    if not my * mx:  # stride larger than the kernel
      return jnp.zeros((b, u, v, c), g_BxHoxWoxO.dtype)
    if c < _TAP_GEMM_CHANNELS:
      zero = jnp.zeros((), g_BxHoxWoxO.dtype)
      return sum(lax.pad(taps_BxHoxWoxKxKxC[:, :, :, ry + sh * ty, rx + sw * tx], zero,
                         [(0, 0, 0), (ty, u - ho - ty, 0), (tx, v - wo - tx, 0), (0, 0, 0)])
                 for ty in range(my) for tx in range(mx))
    k_MxNxOxC = jnp.swapaxes(jnp.flip(w_KxKxCxO[ry::sh, rx::sw], (0, 1)), 2, 3)
    return lax.conv_general_dilated(g_BxHoxWoxO, k_MxNxOxC, (1, 1),
                                    ((my - 1, u - ho), (mx - 1, v - wo)),
                                    dimension_numbers=_NHWC, precision=precision)

  dx_BxUxSxVxSxC = jnp.stack([jnp.stack([phase(ry, rx) for rx in range(sw)], axis=3)
                              for ry in range(sh)], axis=2)
  return dx_BxUxSxVxSxC.reshape(b, u * sh, v * sw, c)[:, plo:plo + h, qlo:qlo + wd]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _dense_conv(x, w, strides, padding, precision):
  return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=_NHWC,
                                  precision=precision)


def _dense_conv_fwd(x, w, strides, padding, precision):
  return _dense_conv(x, w, strides, padding, precision), (x, w)


def _dense_conv_bwd(strides, padding, precision, residuals, g):
  """The phase input gradient (strided convs; XLA's own for stride 1) and the banded
  kernel gradient."""
  x, w = residuals
  if strides != (1, 1):
    dx = _input_grad_phases(x.shape, strides, padding, precision, w, g)
  else:
    conv = functools.partial(lax.conv_general_dilated, window_strides=strides, padding=padding,
                             dimension_numbers=_NHWC, precision=precision)
    dx = jax.vjp(lambda x: conv(x, w), x)[1](g)[0]
  return dx, _kernel_grad_banded(w.shape[:2], strides, padding, precision, x, g)


_dense_conv.defvjp(_dense_conv_fwd, _dense_conv_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def cpu_max_pool(x_BxHxWxC, k, s, pad=0):
  """k x k max-pool, stride s, -inf padding, as a max of k*k strided slices.

  Same forward and gradient as `nn.max_pool`: a window's gradient goes to its first
  maximum, as in PyTorch (differentiating `jnp.maximum` would split ties, which the flat
  regions of masked images have). XLA's CPU backend lowers `nn.max_pool`'s
  select-and-scatter to an arg-max `reduce_window` plus a scatter, 10-100x the forward;
  here the backward is elementwise, from the first maximum's tap index.
  """
  return _max_pool_fwd(x_BxHxWxC, k, s, pad)[0]


def _max_pool_fwd(x_BxHxWxC, k, s, pad):
  x = jnp.pad(x_BxHxWxC, ((0, 0), (pad, pad), (pad, pad), (0, 0)), constant_values=-jnp.inf)
  ho, wo = (x.shape[1] - k) // s + 1, (x.shape[2] - k) // s + 1
  taps = [_strided_slice(x, dy, dx, ho, wo, s, s) for dy in range(k) for dx in range(k)]
  y = functools.reduce(jnp.maximum, taps)
  first_BxHoxWoxC = functools.reduce(
      lambda index, t: jnp.where(taps[t] == y, jnp.int8(t), index), reversed(range(k * k)),
      jnp.zeros(y.shape, jnp.int8))
  return y, (first_BxHoxWoxC, x_BxHxWxC.shape)


def _max_pool_bwd(k, s, pad, residuals, g_BxHoxWoxC):
  first_BxHoxWoxC, (_, h, w, _) = residuals
  _, ho, wo, _ = g_BxHoxWoxC.shape
  hp, wp = h + 2 * pad, w + 2 * pad
  zero = jnp.zeros((), g_BxHoxWoxC.dtype)
  # Each tap's share, placed on its strided grid of the padded input.
  grad_BxHpxWpxC = sum(
      lax.pad(jnp.where(first_BxHoxWoxC == dy * k + dx, g_BxHoxWoxC, zero), zero,
              [(0, 0, 0), (dy, hp - dy - s * (ho - 1) - 1, s - 1),
               (dx, wp - dx - s * (wo - 1) - 1, s - 1), (0, 0, 0)])
      for dy in range(k) for dx in range(k))
  return (grad_BxHpxWpxC[:, pad:pad + h, pad:pad + w],)


cpu_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


@jax.custom_jvp
def relu6(x):
  """`jax.nn.relu6` whose derivative is computed from the output, not the input.

  Same values and derivative (1 where 0 < x < 6, else 0; 0 < x < 6 iff 0 < relu6(x) < 6).
  XLA fuses the derivative's mask into the k*k shifted reads of the depthwise conv's
  backward; computed from the input, those fusions of the stride-1 blocks took ~6x longer
  (EfficientNet-Lite0 input gradient, 12 images at 128, one core: 300 -> 237 ms in all).
  """
  return jnp.minimum(jnp.maximum(x, 0.0), 6.0)


@relu6.defjvp
def _relu6_jvp(primals, tangents):
  y = relu6(*primals)
  return y, jnp.where((y > 0) & (y < 6), tangents[0], jnp.zeros_like(tangents[0]))


