"""Fully connected CRF (pydensecrf): the multi-class label maps (SPEC §3) and DeepCO3's
saliency foreground, whose instances are its connected components."""
import functools

import numpy as np
from pydensecrf import densecrf

from coseg_jax.core import errors

# Probabilities are clipped here before the log so an exact zero gives a finite unary.
_MIN_PROB = 1e-8


def dense_crf_labels(image_HxWx3, S_HxWxK1, crf_cfg):
  """Fully connected CRF labels from normalised maps and the uint8 RGB image.

  Unary = -log of S~**unary_power renormalised over channels; pairwise = Gaussian
  (gaussian_sxy, gaussian_compat) + bilateral (bilateral_sxy, bilateral_srgb,
  bilateral_compat); `iterations` mean-field steps. With `reference_area` > 0 both spatial
  stds scale by sqrt(H W / reference_area), so a photo and its upsampling get the same labels.
  """
  H, W, K1 = np.shape(S_HxWxK1)
  if np.shape(image_HxWx3) != (H, W, 3):
    raise ValueError(f'image {np.shape(image_HxWx3)} does not match maps {(H, W, K1)}')
  S = np.asarray(S_HxWxK1, np.float64) ** crf_cfg.unary_power
  prob = S / np.maximum(S.sum(-1, keepdims=True), _MIN_PROB)
  unary_K1xN = -np.log(np.clip(prob, _MIN_PROB, 1.0)).reshape(H * W, K1).T
  crf = densecrf.DenseCRF2D(W, H, K1)
  crf.setUnaryEnergy(np.ascontiguousarray(unary_K1xN, np.float32))
  scale = np.sqrt(H * W / crf_cfg.reference_area) if crf_cfg.reference_area else 1.0
  crf.addPairwiseGaussian(sxy=crf_cfg.gaussian_sxy * scale, compat=crf_cfg.gaussian_compat)
  crf.addPairwiseBilateral(sxy=crf_cfg.bilateral_sxy * scale, srgb=crf_cfg.bilateral_srgb,
                           rgbim=np.ascontiguousarray(image_HxWx3, np.uint8),
                           compat=crf_cfg.bilateral_compat)
  q_K1xN = np.asarray(crf.inference(crf_cfg.iterations))
  return np.argmax(q_K1xN, axis=0).reshape(H, W).astype(np.uint8)


def check_fields(config, section):
  """Range checks of a CRF section (`section`, e.g. 'infer.crf') as one-line InputErrors."""
  r = functools.partial(errors.check_range, config)
  r(f'{section}.iterations', 0, integer=True)
  for field in ('gaussian_sxy', 'bilateral_sxy', 'bilateral_srgb', 'unary_power'):
    r(f'{section}.{field}', 0, above=True)  # a zero std makes the CRF divide by zero
  for field in ('gaussian_compat', 'bilateral_compat', 'reference_area'):
    r(f'{section}.{field}', 0)
