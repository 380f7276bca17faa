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
  weights_Nxhxw = cell_area(masks_NxHxW[..., None], feat_NxhxwxD.shape[1:3])[..., 0]
  return (jnp.einsum('nhw,nhwd->nd', weights_Nxhxw, feat_NxhxwxD)
          / (weights_Nxhxw.sum(axis=(1, 2))[:, None] + 1e-6))


def cell_area(maps_NxHxWxL, grid_hw):
  """Mean of each map over the pixels of each cell of a strided feature grid. SAME-padded
  strided nets have ceil(H / stride) cells, so the maps are zero-padded up to a whole
  number of cells."""
  n, big_h, big_w, l = maps_NxHxWxL.shape
  h, w = grid_hw
  sh, sw = -(-big_h // h), -(-big_w // w)
  padded = jnp.pad(maps_NxHxWxL, ((0, 0), (0, h * sh - big_h), (0, w * sw - big_w), (0, 0)))
  return padded.reshape(n, h, sh, w, sw, l).mean(axis=(2, 4))


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


def coverage_loss(dense_Bxhxwxc, maps_BxHxWxK1, scale):
  """Cross-entropy of each pixel's channel probabilities against its nearest class of the
  *other* images of the batch: the term of the co-attention loss that sees coverage.

  The co-attention loss only compares pooled vectors, so a channel that keeps a few
  stereotyped pixels of every image is optimal (collapse, BUILD.md). Here every feature
  cell of image b is assigned, with the distances of Eq. 5 (unit vectors times `scale`),
  softmax(-||scale φ_b(p) - scale c_l||^2), to the class vectors c_l pooled by the maps over
  the other images; a class pixel the channel leaves out costs. The assignment is a fixed
  target (no gradient): like a k-means step, it moves maps toward the group's partition,
  not the prototypes toward the maps. `dense_Bxhxwxc`: the frozen extractor's dense
  features of the unmasked images (any normalisation; they are made unit here).
  """
  unit = lambda x: normalize_features(x, 'l2', 1.0)
  phi_Bxhxwxc = unit(dense_Bxhxwxc)
  probs_BxhxwxK1 = cell_area(maps_BxHxWxK1, phi_Bxhxwxc.shape[1:3])
  sums_BxK1xc = jnp.einsum('bhwl,bhwc->blc', probs_BxhxwxK1, phi_Bxhxwxc)
  # Leave-one-out: the class vectors of image b come from the other images only.
  others_BxK1xc = unit(sums_BxK1xc.sum(axis=0, keepdims=True) - sums_BxK1xc)
  sim_BxhxwxK1 = jnp.einsum('bhwc,blc->bhwl', phi_Bxhxwxc, others_BxK1xc)
  # ||s u - s v||^2 = 2 s^2 (1 - <u, v>) for unit u, v; the constant drops in the softmax.
  target = jax.lax.stop_gradient(jax.nn.softmax(2 * scale ** 2 * sim_BxhxwxK1, axis=-1))
  return -jnp.mean(jnp.sum(target * jnp.log(probs_BxhxwxK1 + 1e-6), axis=-1))
