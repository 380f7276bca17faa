"""Multi-class co-attention loss (thesis Eqs. 4-7, reconstructed in SPEC §3)."""
import jax
import jax.numpy as jnp


def pool_features(feat_NxhxwxD, masks_NxHxW, mode):
  """Pools f's dense features of masked images into one vector each.

  'global': plain global average pooling (the thesis). Masked-out pixels are black, so an
  empty or faint mask yields the feature of a black image for every image, which
  makes d+ = 0 a trivial optimum. 'masked': average weighted by the mask (area-pooled to
  the feature grid), so the vector describes the content the mask selects, whatever
  its size, and empty or uniform masks no longer look alike.
  """
  if mode == 'global':
    return feat_NxhxwxD.mean(axis=(1, 2))
  if mode != 'masked':
    raise ValueError(f'pooling {mode!r} not in (masked, global)')
  n, h, w, _ = feat_NxhxwxD.shape
  big_h, big_w = masks_NxHxW.shape[1:]
  # Mask area per feature cell; SAME-padded strided nets have ceil(H / stride) cells,
  # so pad the mask with zeros up to a whole number of cells.
  sh, sw = -(-big_h // h), -(-big_w // w)
  padded = jnp.pad(masks_NxHxW, ((0, 0), (0, h * sh - big_h), (0, w * sw - big_w)))
  weights_Nxhxw = padded.reshape(n, h, sh, w, sw).mean(axis=(2, 4))
  return (jnp.einsum('nhw,nhwd->nd', weights_Nxhxw, feat_NxhxwxD)
          / (weights_Nxhxw.sum(axis=(1, 2))[:, None] + 1e-6))


def normalize_features(feat_NxD, mode, scale):
  """'l2': unit vectors times `scale` (squared distances in [0, 4 scale^2]); 'none': raw."""
  if mode == 'l2':
    feat_NxD = feat_NxD / jnp.sqrt(jnp.sum(feat_NxD ** 2, axis=-1, keepdims=True) + 1e-12)
  elif mode != 'none':
    raise ValueError(f'feature_norm {mode!r} not in (l2, none)')
  return scale * feat_NxD


def coattention_loss(feat_BxK1xD):
  """Mean over ordered pairs i != j and foreground classes k of softplus(d+ - d-).

  feat_BxK1xD[b, l] is f(I_b ⊙ S_b^l), with l = 0 the background. -log p of Eq. 5 equals
  softplus(d+ - d-), which stays finite where exp(-d) underflows. The mean replaces the
  sum of Eq. 4 so the loss scale does not grow with B and K.
  """
  b, k1, _ = feat_BxK1xD.shape
  k = k1 - 1
  sq_BxK1 = jnp.sum(feat_BxK1xD ** 2, axis=-1)
  # ||f_il - f_im||^2 within each image, and ||f_ik - f_jk||^2 across images per class.
  within_BxK1xK1 = (sq_BxK1[:, :, None] + sq_BxK1[:, None, :]
                    - 2 * jnp.einsum('bld,bmd->blm', feat_BxK1xD, feat_BxK1xD))
  across_K1xBxB = (sq_BxK1.T[:, :, None] + sq_BxK1.T[:, None, :]
                   - 2 * jnp.einsum('ild,jld->lij', feat_BxK1xD, feat_BxK1xD))
  within_BxK1xK1 = jnp.maximum(within_BxK1xK1, 0.0)
  across_K1xBxB = jnp.maximum(across_K1xBxB, 0.0)
  # Sum over l != k of the within-image distances (the diagonal is zero).
  neg_BxK1 = within_BxK1xK1.sum(axis=-1)
  d_pos_KxBxB = across_K1xBxB[1:]
  d_neg_KxBxB = (neg_BxK1.T[1:, :, None] + neg_BxK1.T[1:, None, :]) / (2 * k)
  off_diag = 1.0 - jnp.eye(b)
  terms_KxBxB = jax.nn.softplus(d_pos_KxBxB - d_neg_KxBxB) * off_diag
  return terms_KxBxB.sum() / (k * b * (b - 1))
