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


def mutual_weights(q_ref_MxD, k_anchor_MxD, scale):
  """Per anchor pixel, how strongly the reference's pixels pick it: sigmoid(scale * v).

  Each reference pixel softly matches anchor pixels (row softmax of Q_j K_i^T); v, the
  column sums, counts how many reference pixels chose each anchor pixel (sum of v = M).
  """
  a_MxM = jax.nn.softmax(q_ref_MxD @ k_anchor_MxD.T, axis=-1)
  return jax.nn.sigmoid(scale * a_MxM.sum(axis=0))


def mutual_attention(q_BxMxD, k_BxMxD, v_BxMxD, scale):
  """Mean over references j != i of concat(w * V_i, (1 - w) * V_i), w = mutual_weights(j, i).

  The foreground and background parts are linear in w, so w is averaged over the
  references before it multiplies V_i, and only the B(B-1) pairs j != i are computed.
  The 1x1 output conv is linear too, so it is applied once to this mean.
  """
  b = q_BxMxD.shape[0]
  others_BxR = jnp.array([[j for j in range(b) if j != i] for i in range(b)])  # R = B - 1
  per_anchor = jax.vmap(mutual_weights, in_axes=(0, None, None))            # over references
  w_BxRxM = jax.vmap(per_anchor, in_axes=(0, 0, None))(q_BxMxD[others_BxR], k_BxMxD, scale)
  w_BxMx1 = w_BxRxM.mean(axis=1)[..., None]
  return jnp.concatenate([w_BxMx1 * v_BxMxD, (1.0 - w_BxMx1) * v_BxMxD], axis=-1)


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
