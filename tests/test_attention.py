import jax
import jax.numpy as jnp
from jax.test_util import check_grads
import numpy as np
import pytest

from coseg_jax.multiclass import attention


def _rand(key, *shape):
  return jax.random.normal(jax.random.PRNGKey(key), shape)


@pytest.mark.parametrize('mode', attention.MODES)
def test_gamma_zero_is_identity(mode):
  feat = _rand(0, 3, 4, 5, 8)
  mod = attention.AttentionModule(attention.AttentionSpec(mode=mode))
  variables = mod.init(jax.random.PRNGKey(1), feat)
  np.testing.assert_array_equal(mod.apply(variables, feat), feat)
  if mode != 'none':
    assert float(variables['params']['gamma']) == 0.0
    # With gamma != 0 the module must actually change the features.
    params = dict(variables['params'], gamma=jnp.ones(()))
    assert not np.allclose(mod.apply({'params': params}, feat), feat)


@pytest.mark.parametrize('hw', [(8, 8), (7, 5)])
def test_pooled_attention_is_the_coarse_grids_residual_resized_back(hw):
  """pool=p: the attention of the map resized by 1/p (its M), its residual resized back
  to the map's grid; the same projections as on the coarse map itself."""
  feat = _rand(0, 3, *hw, 8)
  coarse_hw = tuple(-(-n // 2) for n in hw)
  coarse = jax.image.resize(feat, (3, *coarse_hw, 8), 'bilinear')
  pooled = attention.AttentionModule(attention.AttentionSpec(mode='sa_ma', pool=2))
  plain = attention.AttentionModule(attention.AttentionSpec(mode='sa_ma'))
  params = dict(plain.init(jax.random.PRNGKey(1), coarse)['params'], gamma=jnp.ones(()))
  residual = plain.apply({'params': params}, coarse) - coarse
  want = feat + jax.image.resize(residual, feat.shape, 'bilinear')
  np.testing.assert_allclose(pooled.apply({'params': params}, feat), want, rtol=1e-5, atol=1e-5)
  assert not np.allclose(pooled.apply({'params': params}, feat),
                         plain.apply({'params': params}, feat), atol=1e-3)


def test_self_attention_rows_are_convex_combinations():
  q, k, v = _rand(0, 6, 4), _rand(1, 6, 4), _rand(2, 6, 3)
  out = attention.self_attention(q, k, v)
  weights = jax.nn.softmax(q @ k.T, axis=-1)
  np.testing.assert_allclose(out, weights @ v, rtol=1e-6)
  assert out.min() >= v.min() - 1e-6 and out.max() <= v.max() + 1e-6


def test_mutual_weights_column_sums_total_m():
  # Every reference pixel distributes one unit over the anchor, so sum(v) = M; with two
  # images the foreground part of anchor i is sigmoid(scale * v) * V_i.
  q, k, v = _rand(0, 2, 9, 4), _rand(1, 2, 9, 4), jnp.ones((2, 9, 4))
  w = attention.mutual_attention(q, k, v, 1.0)[:, :, 0]
  logit = jnp.log(w / (1 - w))
  np.testing.assert_allclose(logit.sum(axis=1), [9.0, 9.0], rtol=1e-4)
  assert (w > 0).all() and (w < 1).all()


def test_mutual_attention_matches_pair_loop():
  b, m, d = 4, 6, 3
  q, k, v = _rand(0, b, m, d), _rand(1, b, m, d), _rand(2, b, m, d)
  got = attention.mutual_attention(q, k, v, 0.5)
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  for i in range(b):
    refs = []
    for j in range(b):
      if j != i:  # reference j's pixels (rows) softly pick anchor i's pixels (columns)
        logits = q[j] @ k[i].T
        a = np.exp(logits - logits.max(1, keepdims=True))
        w = 1 / (1 + np.exp(-0.5 * (a / a.sum(1, keepdims=True)).sum(0)))[:, None]
        refs.append(np.concatenate([w * v[i], (1 - w) * v[i]], axis=-1))
    np.testing.assert_allclose(got[i], np.mean(refs, axis=0), rtol=1e-5, atol=1e-6)


def test_mutual_attention_of_identical_images():
  # Documented behaviour: an image paired with an identical copy gets the same output
  # whichever is the anchor, fg + bg parts add back up to V, and a pixel that the
  # reference picks more gets a larger foreground weight.
  q1, k1, v1 = _rand(0, 5, 3), _rand(1, 5, 3), _rand(2, 5, 3)
  q, k, v = (jnp.stack([a, a]) for a in (q1, k1, v1))
  out = attention.mutual_attention(q, k, v, 1.0)
  np.testing.assert_allclose(out[0], out[1], rtol=1e-6)
  np.testing.assert_allclose(out[0, :, :3] + out[0, :, 3:], v1, rtol=1e-5, atol=1e-6)
  col_sums = jax.nn.softmax(q1 @ k1.T, axis=-1).sum(0)
  fg_weight = out[0, :, 0] / v1[:, 0]
  assert np.argmax(fg_weight) == np.argmax(col_sums)


def test_mutual_attention_permutation_equivariant():
  q, k, v = _rand(0, 3, 4, 2), _rand(1, 3, 4, 2), _rand(2, 3, 4, 2)
  perm = np.array([2, 0, 1])
  out = attention.mutual_attention(q, k, v, 0.5)
  out_p = attention.mutual_attention(q[perm], k[perm], v[perm], 0.5)
  np.testing.assert_allclose(out_p, out[perm], rtol=1e-5)


def test_mutual_attention_needs_two_images():
  mod = attention.AttentionModule(attention.AttentionSpec(mode='ma'))
  with pytest.raises(ValueError, match='at least 2'):
    mod.init(jax.random.PRNGKey(0), _rand(0, 1, 2, 2, 4))


def _plain_mutual_attention(q, k, v, scale):
  """The formula written out pair by pair, differentiated by autodiff (no custom VJP)."""
  b = q.shape[0]
  outs = []
  for i in range(b):
    w = jnp.mean(jnp.stack([jax.nn.sigmoid(scale * jax.nn.softmax(q[j] @ k[i].T, axis=-1).sum(0))
                            for j in range(b) if j != i]), axis=0)[:, None]
    outs.append(jnp.concatenate([w * v[i], (1 - w) * v[i]], axis=-1))
  return jnp.stack(outs)


def _loss(fn, cot):
  # A generic linear functional, plus a nonlinear term so the cotangent varies with the
  # output too.
  return lambda q, k, v, scale: jnp.sum(fn(q, k, v, scale) * cot) + jnp.sum(
      jnp.sin(fn(q, k, v, scale)))


@pytest.mark.slow
@pytest.mark.parametrize('b', [2, 3, 4])
def test_mutual_attention_gradients_match_autodiff_float64(b):
  # The backward pass is hand-written: it must equal autodiff of the plain formula to
  # float64 rounding, for every input and for scale.
  with jax.enable_x64(True):
    m, d = 7, 5
    q, k, v = (_rand(s, b, m, d).astype(jnp.float64) * 1.5 for s in (0, 1, 2))
    cot = _rand(3, b, m, 2 * d).astype(jnp.float64)
    scale = jnp.asarray(0.8, jnp.float64)
    got = jax.grad(_loss(attention.mutual_attention, cot), argnums=(0, 1, 2, 3))(q, k, v, scale)
    want = jax.grad(_loss(_plain_mutual_attention, cot), argnums=(0, 1, 2, 3))(q, k, v, scale)
    for g, w, name in zip(got, want, ('q', 'k', 'v', 'scale')):
      assert g.dtype == jnp.float64, name
      np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-12, err_msg=name)


@pytest.mark.slow
@pytest.mark.parametrize('b', [2, 3])
def test_mutual_attention_gradients_finite_differences(b):
  with jax.enable_x64(True):
    q, k, v = (_rand(s, b, 4, 3).astype(jnp.float64) for s in (4, 5, 6))
    cot = _rand(7, b, 4, 6).astype(jnp.float64)
    check_grads(lambda q, k, v: _loss(attention.mutual_attention, cot)(q, k, v, 0.6),
                              (q, k, v), order=1, modes=['rev'], eps=1e-6, atol=1e-7, rtol=1e-7)


@pytest.mark.slow
@pytest.mark.parametrize('b', [2, 3])
def test_mutual_attention_float32_gradients_jitted(b):
  # float32 under jit (as training runs it), against the float64 autodiff reference.
  m, d = 16, 8
  q, k, v = (_rand(s, b, m, d) for s in (8, 9, 10))
  cot = _rand(11, b, m, 2 * d)
  got = jax.jit(jax.grad(_loss(attention.mutual_attention, cot), argnums=(0, 1, 2)))(q, k, v, 0.25)
  with jax.enable_x64(True):
    args64 = [jnp.asarray(np.asarray(a), jnp.float64) for a in (q, k, v)]
    want = jax.grad(_loss(_plain_mutual_attention, jnp.asarray(np.asarray(cot), jnp.float64)),
                    argnums=(0, 1, 2))(*args64, 0.25)
    want = [np.asarray(w) for w in want]
  for g, w, name in zip(got, want, 'qkv'):
    assert g.dtype == jnp.float32, name
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5 * np.abs(w).max(), err_msg=name)
