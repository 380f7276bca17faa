"""Self-attention (Eq. 2) and mutual attention (Fig. 4) of the thesis, and their aggregation (Eq. 3).

The attention maths are pure functions on flattened maps (M = h*w positions); the Flax
module only owns the 1x1 projections and gamma.
"""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

MODES = ('none', 'sa', 'ma', 'sa_ma')


def self_attention(q_MxD, k_MxD, v_MxC):
  """SA(F) = softmax(Q K^T) V with the softmax over each row (Eq. 2)."""
  return jax.nn.softmax(q_MxD @ k_MxD.T, axis=-1) @ v_MxC


def _others(b):
  """others[i] = the references j != i of anchor i, in increasing order (B x (B-1))."""
  return np.array([[j for j in range(b) if j != i] for i in range(b)])


def _mutual_weights_mean(q_BxMxD, k_BxMxD, scale):
  """Per anchor pixel, how strongly the references' pixels pick it (B x M), and what the VJP needs.

  Each pixel of reference j softly matches anchor i's pixels (row softmax of Q_j K_i^T);
  v, the column sums, counts how many reference pixels chose each anchor pixel (sum of
  v = M). w = mean over j != i of sigmoid(scale * v).
  """
  b, m, d = q_BxMxD.shape
  r = b - 1
  # An anchor's references stacked as one (B-1)M x D matrix: one GEMM per anchor, and the
  # dK GEMM's contraction over the stacked rows sums over the references for free.
  qref_BxNxD = q_BxMxD[_others(b)].reshape(b, r * m, d)  # N = (B-1) M
  s_BxNxM = jnp.einsum('bnd,bmd->bnm', qref_BxNxD, k_BxMxD)
  e_BxNxM = jnp.exp(s_BxNxM - s_BxNxM.max(axis=-1, keepdims=True))
  inv_BxRxM = (1.0 / e_BxNxM.sum(axis=-1)).reshape(b, r, m)
  # Column sums of a = e / rowsum as the GEMV e^T (1 / rowsum): a is never written.
  col_BxRxM = jnp.einsum('brnm,brn->brm', e_BxNxM.reshape(b, r, m, m), inv_BxRxM)
  w_BxRxM = jax.nn.sigmoid(scale * col_BxRxM)
  return w_BxRxM.mean(axis=1), (qref_BxNxD, e_BxNxM, inv_BxRxM, col_BxRxM, w_BxRxM)


def _mix(w_BxM, v_BxMxD):
  fg_BxMxD = w_BxM[..., None] * v_BxMxD
  return jnp.concatenate([fg_BxMxD, v_BxMxD - fg_BxMxD], axis=-1)


@jax.custom_vjp
def _mutual_attention(q_BxMxD, k_BxMxD, v_BxMxD, scale):
  return _mix(_mutual_weights_mean(q_BxMxD, k_BxMxD, scale)[0], v_BxMxD)


def _mutual_attention_fwd(q_BxMxD, k_BxMxD, v_BxMxD, scale):
  w_BxM, res = _mutual_weights_mean(q_BxMxD, k_BxMxD, scale)
  return _mix(w_BxM, v_BxMxD), (k_BxMxD, v_BxMxD, w_BxM, scale) + res


def _mutual_attention_bwd(res, dout_BxMx2D):
  # Autodiff through the softmax writes a, a transposed copy of the scores for dK and more
  # M x M passes. By hand, with g = dL/d(column sums of a) per pair, the softmax backward is
  # ds = a * (g[None, :] - (a @ g)[:, None]): one GEMV and one pass over the saved e.
  k_BxMxD, v_BxMxD, w_BxM, scale, qref_BxNxD, e_BxNxM, inv_BxRxM, col_BxRxM, w_BxRxM = res
  b, m, d = k_BxMxD.shape
  r = b - 1
  dfg_BxMxD, dbg_BxMxD = dout_BxMx2D[..., :d], dout_BxMx2D[..., d:]
  dv_BxMxD = dbg_BxMxD + w_BxM[..., None] * (dfg_BxMxD - dbg_BxMxD)
  # Two reductions straight from dout, so dfg - dbg is not materialised for both consumers.
  dw_BxM = jnp.sum(dfg_BxMxD * v_BxMxD, axis=-1) - jnp.sum(dbg_BxMxD * v_BxMxD, axis=-1)
  dlogit_BxRxM = (dw_BxM[:, None, :] / r) * w_BxRxM * (1.0 - w_BxRxM)
  dscale = jnp.sum(dlogit_BxRxM * col_BxRxM).astype(jnp.result_type(scale))
  g_BxRxM = scale * dlogit_BxRxM
  e_BxRxMxM = e_BxNxM.reshape(b, r, m, m)
  ag_BxRxM = inv_BxRxM * jnp.einsum('brnm,brm->brn', e_BxRxMxM, g_BxRxM)
  ds_BxNxM = (e_BxRxMxM * inv_BxRxM[..., None]
              * (g_BxRxM[:, :, None, :] - ag_BxRxM[..., None])).reshape(b, r * m, m)
  # Contracts ds's row axis in place (XLA's dot takes it transposed; no copy of ds).
  dk_BxMxD = jnp.einsum('bnm,bnd->bmd', ds_BxNxM, qref_BxNxD)
  dqref_BxRxMxD = jnp.einsum('bnm,bmd->bnd', ds_BxNxM, k_BxMxD).reshape(b, r, m, d)
  # Reference j's gradient sums over the anchors it served; static slices fuse into one
  # pass where a scatter-add or one-hot contraction would not.
  others_BxR = _others(b)
  dq_BxMxD = jnp.stack([sum(dqref_BxRxMxD[i, t] for i, t in zip(*np.nonzero(others_BxR == j)))
                        for j in range(b)])
  return dq_BxMxD, dk_BxMxD, dv_BxMxD, dscale


_mutual_attention.defvjp(_mutual_attention_fwd, _mutual_attention_bwd)


def mutual_attention(q_BxMxD, k_BxMxD, v_BxMxD, scale):
  """Mean over references j != i of concat(w * V_i, (1 - w) * V_i), w from `_mutual_weights_mean`.

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
    m = h * w
    d = max(c // self.spec.reduction, 1)
    flat_BxMxC = feat_BxHxWxC.reshape(b, m, c)
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
    return feat_BxHxWxC + gamma * out_BxMxC.reshape(b, h, w, c)
