"""PRM backward rule against a direct numpy computation; peak response maps."""
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from coseg_jax.instance import prm

_DN = ('NHWC', 'HWIO', 'NHWC')


def _np_conv(x, w, stride, pad, groups):
  """Direct NHWC/HWIO convolution of one image with symmetric zero padding."""
  xp = np.pad(x, ((pad, pad), (pad, pad), (0, 0)))
  kh, kw, cin_g, cout = w.shape
  ho, wo = (xp.shape[0] - kh) // stride + 1, (xp.shape[1] - kw) // stride + 1
  y = np.zeros((ho, wo, cout))
  for i, j, o in itertools.product(range(ho), range(wo), range(cout)):
    g = o // (cout // groups)
    patch = xp[i * stride:i * stride + kh, j * stride:j * stride + kw, g * cin_g:(g + 1) * cin_g]
    y[i, j, o] = np.sum(patch * w[..., o])
  return y


def _np_conv_transpose(gy, w, x_shape, stride, pad, groups):
  """Adjoint of `_np_conv` with respect to its input."""
  kh, kw, cin_g, cout = w.shape
  gx = np.zeros((x_shape[0] + 2 * pad, x_shape[1] + 2 * pad, x_shape[2]))
  for i, j, o in itertools.product(range(gy.shape[0]), range(gy.shape[1]), range(cout)):
    g = o // (cout // groups)
    window = (slice(i * stride, i * stride + kh), slice(j * stride, j * stride + kw),
              slice(g * cin_g, (g + 1) * cin_g))
    gx[window] += gy[i, j, o] * w[..., o]
  return gx[pad:pad + x_shape[0], pad:pad + x_shape[1]]


def _np_prm_backward(x, w, g, stride, pad, groups):
  x_shift = x - x.min()
  w_pos = np.maximum(w, 0)
  z = _np_conv(x_shift, w_pos, stride, pad, groups)
  return x_shift * _np_conv_transpose(g / (z + 1e-10), w_pos, x.shape, stride, pad, groups)


def _prm(x, w, stride, pad, groups):
  return prm.conv_general_dilated(x, w, (stride, stride), [(pad, pad), (pad, pad)],
                                  dimension_numbers=_DN, feature_group_count=groups)


@pytest.mark.slow
@pytest.mark.parametrize('stride,pad,groups', [(2, 1, 1), (1, 1, 2), (2, 0, 4)])
def test_backward_matches_numpy(stride, pad, groups):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 7, 6, 4))
  w = rng.normal(size=(3, 3, 4 // groups, 4))
  y, vjp = jax.vjp(lambda v: _prm(v, jnp.asarray(w, jnp.float32), stride, pad, groups),
                   jnp.asarray(x, jnp.float32))
  np.testing.assert_allclose(y[0], _np_conv(x[0], w, stride, pad, groups), rtol=1e-4, atol=1e-4)
  g = rng.uniform(size=y.shape)
  (g_in,) = vjp(jnp.asarray(g, jnp.float32))
  # The min is taken per image: each image's result equals the single-image rule.
  for b in range(2):
    np.testing.assert_allclose(g_in[b], _np_prm_backward(x[b], w, g[b], stride, pad, groups),
                               rtol=2e-4, atol=1e-5)


def test_rule_conserves_signal_and_ignores_weights():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.uniform(size=(1, 8, 8, 4)), jnp.float32)
  w = jnp.asarray(rng.uniform(0.1, 1.0, size=(3, 3, 2, 6)), jnp.float32)
  f = lambda v, k: _prm(v, k, 2, 1, 2)
  y, vjp = jax.vjp(f, x, w)
  g = np.zeros(y.shape, np.float32)
  g[0, 1, 2, 3] = 1.0
  g_in, g_w = vjp(jnp.asarray(g))
  # Each output's signal is redistributed over its inputs in proportion to their share
  # of conv(x~, W+), so the total is preserved.
  assert float(g_in.sum()) == pytest.approx(1.0, rel=1e-4)
  assert np.all(np.asarray(g_w) == 0)


class _Net(nn.Module):
  @nn.compact
  def __call__(self, x):
    conv = lambda c, **kw: nn.Conv(c, (3, 3), conv_general_dilated=prm.conv_general_dilated, **kw)
    x = nn.relu(conv(4, strides=2)(x))
    x = nn.max_pool(x, (2, 2), (2, 2))
    x = nn.relu(conv(4, feature_group_count=4)(x))
    return conv(1)(x)[0, ..., 0]


@pytest.mark.slow
def test_peak_response_maps_match_single_peak_vjp():
  net = _Net()
  x = jnp.asarray(np.random.default_rng(2).uniform(size=(1, 16, 16, 3)), jnp.float32)
  variables = net.init(jax.random.key(0), x)
  peaks = [(0, 0), (2, 3), (3, 1)]
  maps = prm.peak_response_maps(net.apply, variables, x, peaks, chunk=2)
  assert maps.shape == (3, 16, 16)
  single = jax.jit(lambda onehot: jax.vjp(lambda v: net.apply(variables, v), x)[1](onehot)[0])
  for m, (py, px) in zip(maps, peaks):
    onehot = jnp.zeros((4, 4)).at[py, px].set(1.0)
    np.testing.assert_allclose(m, single(onehot)[0].sum(-1), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(prm.peak_response_map(net.apply, variables, x, (2, 3)), maps[1],
                             rtol=1e-5, atol=1e-7)
  assert not np.allclose(maps[0], maps[1])
