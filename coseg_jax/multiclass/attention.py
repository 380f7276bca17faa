"""Self-attention (Eq. 2) and mutual attention (Fig. 4) of the thesis, and their aggregation (Eq. 3).

The attention maths are pure functions on flattened maps (M = h*w positions); the Flax
module only owns the 1x1 projections and gamma.
"""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

MODES = ('none', 'sa', 'ma', 'sa_ma')


def self_attention(q_MxD, k_MxD, v_MxC):
  """SA(F) = softmax(Q K^T) V with the softmax over each row (Eq. 2)."""
  return jax.nn.softmax(q_MxD @ k_MxD.T, axis=-1) @ v_MxC


def _pair_weights(q_ref_MxD, k_anchor_MxD, scale):
  """How strongly one reference's pixels pick each anchor pixel (M), and what the VJP needs.

  Each pixel of the reference softly matches the anchor's pixels (row softmax of
  Q_ref K_anchor^T); the column sums count how many reference pixels chose each anchor
  pixel (they total M), and w = sigmoid(scale * column sums). The column sums are the
  GEMV e^T (1 / rowsum): the softmax is never written.
  """
  s_MxM = q_ref_MxD @ k_anchor_MxD.T
  e_MxM = jnp.exp(s_MxM - s_MxM.max(axis=-1, keepdims=True))
  inv_M = 1.0 / e_MxM.sum(axis=-1)
  col_M = inv_M @ e_MxM
  w_M = jax.nn.sigmoid(scale * col_M)
  return w_M, (e_MxM, inv_M, col_M, w_M)


def _mutual_weights_mean(q_BxMxD, k_BxMxD, scale):
  """w of every anchor averaged over its references j != i (B x M), and per-pair residuals.

  One M x M score block per pair, so the temporaries of a pair stay in cache; stacking an
  anchor's references into one GEMM wrote (B-1) M x M blocks and took 1.1-1.9x longer.
  """
  b = q_BxMxD.shape[0]
  pairs = {(i, j): _pair_weights(q_BxMxD[j], k_BxMxD[i], scale)
           for i in range(b) for j in range(b) if j != i}
  w_BxM = jnp.stack([sum(pairs[i, j][0] for j in range(b) if j != i) / (b - 1) for i in range(b)])
  return w_BxM, {pair: residuals for pair, (_, residuals) in pairs.items()}


def _mix(w_BxM, v_BxMxD):
  fg_BxMxD = w_BxM[..., None] * v_BxMxD
  return jnp.concatenate([fg_BxMxD, v_BxMxD - fg_BxMxD], axis=-1)


@jax.custom_vjp
def _mutual_attention(q_BxMxD, k_BxMxD, v_BxMxD, scale):
  return _mix(_mutual_weights_mean(q_BxMxD, k_BxMxD, scale)[0], v_BxMxD)


def _mutual_attention_fwd(q_BxMxD, k_BxMxD, v_BxMxD, scale):
  w_BxM, pairs = _mutual_weights_mean(q_BxMxD, k_BxMxD, scale)
  return _mix(w_BxM, v_BxMxD), (q_BxMxD, k_BxMxD, v_BxMxD, w_BxM, scale, pairs)


def _mutual_attention_bwd(res, dout_BxMx2D):
  # Autodiff through the softmax writes a, a transposed copy of the scores for dK and more
  # M x M passes. By hand, with g = dL/d(column sums of a) per pair, the softmax backward is
  # ds = a * (g[None, :] - (a @ g)[:, None]): one GEMV and one pass over the saved e.
  q_BxMxD, k_BxMxD, v_BxMxD, w_BxM, scale, pairs = res
  b, _, d = k_BxMxD.shape
  dfg_BxMxD, dbg_BxMxD = dout_BxMx2D[..., :d], dout_BxMx2D[..., d:]
  dv_BxMxD = dbg_BxMxD + w_BxM[..., None] * (dfg_BxMxD - dbg_BxMxD)
  # Two reductions straight from dout, so dfg - dbg is not materialised for both consumers.
  dw_BxM = jnp.sum(dfg_BxMxD * v_BxMxD, axis=-1) - jnp.sum(dbg_BxMxD * v_BxMxD, axis=-1)
  dq, dk, dscale = [0.0] * b, [0.0] * b, 0.0
  for (i, j), (e_MxM, inv_M, col_M, w_M) in pairs.items():
    dlogit_M = (dw_BxM[i] / (b - 1)) * w_M * (1.0 - w_M)
    dscale += jnp.sum(dlogit_M * col_M)
    g_M = scale * dlogit_M
    ag_M = inv_M * (e_MxM @ g_M)
    ds_MxM = e_MxM * inv_M[:, None] * (g_M[None, :] - ag_M[:, None])
    dk[i] += ds_MxM.T @ q_BxMxD[j]
    dq[j] += ds_MxM @ k_BxMxD[i]
  return (jnp.stack(dq), jnp.stack(dk), dv_BxMxD,
          jnp.asarray(dscale, jnp.result_type(scale)))


_mutual_attention.defvjp(_mutual_attention_fwd, _mutual_attention_bwd)


def mutual_attention(q_BxMxD, k_BxMxD, v_BxMxD, scale):
  """Mean over references j != i of concat(w * V_i, (1 - w) * V_i), w from `_pair_weights`.

  The foreground and background parts are linear in w, so w is averaged over the
  references before it multiplies V_i, and only the B(B-1) pairs j != i are computed.
  The 1x1 output conv is linear too, so it is applied once to this mean. The backward
  pass is hand-written (`_mutual_attention_bwd`); `tests/test_attention.py` checks it
  against autodiff of the plain formula.
  """
  return _mutual_attention(q_BxMxD, k_BxMxD, v_BxMxD, jnp.asarray(scale, q_BxMxD.dtype))


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
  mode: str = 'sa_ma'            # one of MODES
  reduction: int = 2             # Q/K/V channels C' = C // reduction
  mutual_scale_power: float = 0.5  # v is scaled by M ** -power before the sigmoid
  # Attention runs on the map resized (bilinear) by 1/pool, its output resized back: a tap
  # finer than the thesis' stride-16 conv5_3 keeps that grid's M (cost M^2 per pair).
  pool: int = 1

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f'attention mode {self.mode!r} not in {MODES}')


class AttentionModule(nn.Module):
  """F <- F + gamma * (SA(F) + MA(F)) (Eq. 3); gamma starts at 0 so training starts from F."""
  spec: AttentionSpec

  @nn.compact
  def __call__(self, feat_BxHxWxC):
    if self.spec.mode == 'none':
      return feat_BxHxWxC
    b, h, w, c = feat_BxHxWxC.shape
    coarse_hw = -(-h // self.spec.pool), -(-w // self.spec.pool)
    m = coarse_hw[0] * coarse_hw[1]
    d = max(c // self.spec.reduction, 1)
    flat_BxMxC = jax.image.resize(feat_BxHxWxC, (b, *coarse_hw, c), 'bilinear').reshape(b, m, c)
    out_BxMxC = jnp.zeros_like(flat_BxMxC)
    if 'sa' in self.spec.mode.split('_'):
      q = nn.Dense(d, name='sa_query')(flat_BxMxC)
      k = nn.Dense(d, name='sa_key')(flat_BxMxC)
      v = nn.Dense(c, name='sa_value')(flat_BxMxC)
      out_BxMxC += jax.vmap(self_attention)(q, k, v)
    if 'ma' in self.spec.mode.split('_'):
      if b < 2:
        raise ValueError('mutual attention needs at least 2 images in a mini-batch')
      q = nn.Dense(d, name='ma_query')(flat_BxMxC)
      k = nn.Dense(d, name='ma_key')(flat_BxMxC)
      v = nn.Dense(d, name='ma_value')(flat_BxMxC)
      scale = float(m) ** -self.spec.mutual_scale_power
      out_BxMxC += nn.Dense(c, name='ma_out')(mutual_attention(q, k, v, scale))
    gamma = self.param('gamma', nn.initializers.zeros, ())
    out_BxHxWxC = jax.image.resize(out_BxMxC.reshape(b, *coarse_hw, c), (b, h, w, c), 'bilinear')
    return feat_BxHxWxC + gamma * out_BxHxWxC
