"""DeepCO3 correlation, co-peaks, losses and model on tiny inputs."""
import functools
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from coseg_jax.backbones import weights
from coseg_jax.instance import model as deepco3
from coseg_jax.instance import prm


def _brute_force_peaks(t):
  """Reference: equals the max over its in-bounds 3^n neighbourhood and >= median."""
  med = np.median(t)
  out = np.zeros(t.shape, bool)
  for idx in itertools.product(*map(range, t.shape)):
    window = tuple(slice(max(i - 1, 0), i + 2) for i in idx)
    out[idx] = t[idx] >= t[window].max() and t[idx] >= med
  return out


def test_l2_normalize_matches_formula():
  f = np.array([[[[3.0, 4.0], [0.0, 0.0]]]])
  out = np.asarray(deepco3.l2_normalize(jnp.asarray(f), eps=1e-2))
  np.testing.assert_allclose(out[0, 0, 0], [3 / np.sqrt(25.01), 4 / np.sqrt(25.01)], rtol=1e-6)
  np.testing.assert_allclose(out[0, 0, 1], [0.0, 0.0])


def test_correlation_matches_loop():
  rng = np.random.default_rng(0)
  fn, fm = rng.normal(size=(2, 3, 4, 5))
  sn, sm = rng.uniform(size=(2, 3, 4))
  t = np.asarray(deepco3.correlation(fn, fm, sn, sm))
  ref = np.zeros((3, 4, 3, 4))
  for i, j, s, u in itertools.product(range(3), range(4), range(3), range(4)):
    ref[i, j, s, u] = sn[i, j] * sm[s, u] * np.dot(fn[i, j], fm[s, u])
  np.testing.assert_allclose(t, ref, rtol=1e-5, atol=1e-6)


def _median_cases():
  rng = np.random.default_rng(7)
  return {
      'odd_ties': rng.integers(-3, 3, (5, 7)).astype(np.float32),
      'even_ties_4d': rng.integers(-3, 3, (4, 3, 2, 5)).astype(np.float32),
      'large': rng.normal(size=(6, 5)).astype(np.float32) * 1e30,
      'negative': -rng.random((9,)).astype(np.float32),
      'signed_zeros_even': np.array([-0.0, 0.0, 0.0, -0.0, 1.0, -1.0], np.float32),
      'signed_zeros_odd': np.array([-0.0, 2.0, 0.0, -3.0, -0.0], np.float32),
      'infinities': np.array([3.0, -np.inf, np.inf, 1.0], np.float32),
      'constant': np.full((3, 4), 2.5, np.float32),
      'single': np.array([7.0], np.float32)}


@pytest.mark.slow
@pytest.mark.parametrize('name', list(_median_cases()))
def test_median_and_kth_smallest_match_numpy(name):
  x = _median_cases()[name]
  assert float(deepco3.median(x)) == np.median(x)
  for k in {1, (x.size + 1) // 2, x.size}:
    assert float(deepco3.kth_smallest(x, k)) == np.sort(x, axis=None)[k - 1]


@pytest.mark.slow
def test_median_float64():
  # Distinct in float64, all 1.0 in float32.
  x = 1.0 + np.random.default_rng(8).integers(1, 5, (6, 4)) * np.finfo(np.float64).eps
  with jax.enable_x64(True):
    got = deepco3.median(jnp.asarray(x))
    assert got.dtype == jnp.float64 and float(got) == np.median(x)


@pytest.mark.parametrize('shape', [(5, 6), (3, 4, 2, 5)])
def test_window_max_is_the_box_max(shape):
  x = np.random.default_rng(9).integers(0, 4, shape).astype(np.float32)
  want = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (3,) * x.ndim, (1,) * x.ndim, 'SAME')
  np.testing.assert_array_equal(deepco3.window_max(x), want)


@pytest.mark.slow
@pytest.mark.parametrize('shape', [(5, 7), (4, 6), (3, 4, 3, 2), (3, 3, 3, 3)])
def test_local_maxima_matches_brute_force_with_ties(shape):
  t = np.random.default_rng(10).integers(-2, 2, shape).astype(np.float32)
  np.testing.assert_array_equal(deepco3.local_maxima(t), _brute_force_peaks(t))


@pytest.mark.slow
def test_copeak_mask_matches_brute_force_on_random_tensor():
  t = np.random.default_rng(1).normal(size=(4, 3, 4, 3)).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(deepco3.copeak_mask(t)), _brute_force_peaks(t))


@pytest.mark.slow
def test_copeak_mask_plateau_border_and_median():
  t = np.zeros((4, 4, 4, 4), np.float32)
  t[0, 0, 0, 0] = 5.0                  # corner: borders count as -inf, so a peak
  t[2, 2, 2, 2] = t[2, 2, 2, 3] = 3.0  # adjacent tie: both are peaks
  mask = np.asarray(deepco3.copeak_mask(t))
  assert mask[0, 0, 0, 0] and mask[2, 2, 2, 2] and mask[2, 2, 2, 3]
  assert not mask[1, 1, 1, 1] and not mask[2, 2, 2, 1]  # next to a higher value
  assert mask[0, 3, 0, 3]  # flat zeros away from the bumps are plateau maxima >= median 0


def test_copeak_mask_excludes_local_maxima_below_median():
  t = np.full((3, 3, 3, 3), 2.0, np.float32)
  t[:2, :2, :2, :2] = 0.0
  t[0, 0, 0, 0] = 0.5  # the max of its window, but below the median (2)
  mask = np.asarray(deepco3.copeak_mask(t))
  assert not mask[0, 0, 0, 0]
  assert mask[2, 2, 2, 2]


@pytest.mark.slow
def test_copeak_loss_value_and_gradient_only_at_peaks():
  t = jnp.asarray(np.random.default_rng(2).normal(size=(3, 3, 3, 3)), jnp.float32)
  mask = deepco3.copeak_mask(t)
  x = float(np.asarray(t)[np.asarray(mask)].mean())
  assert float(deepco3.copeak_loss(t, mask)) == pytest.approx(np.log1p(np.exp(-x)), rel=1e-6)
  grad = np.asarray(jax.grad(deepco3.copeak_loss)(t, mask))
  assert np.all(grad[~np.asarray(mask)] == 0)
  np.testing.assert_allclose(grad[np.asarray(mask)], -1 / (1 + np.exp(x)) / np.asarray(mask).sum(), rtol=1e-5)


def test_affinity_loss_hand_value():
  # A = [[1, .6], [.6, 1]], S = [1, .5]: first term (2 * .5 * .4) / 4 = .1,
  # second 4 * (2 * .25 * .6) / 4 = .3.
  f = jnp.array([[1.0, 0.0], [0.6, 0.8]])
  assert float(deepco3.affinity_loss(f, jnp.array([1.0, 0.5]), alpha=4.0)) == pytest.approx(0.4, rel=1e-6)


def test_saliency_loss_hand_value_and_constant_prior():
  prior = jnp.array([[[1.0, 0.0], [0.0, 0.0]], [[0.3, 0.3], [0.3, 0.3]]])
  sal = jnp.full((2, 2, 2), 0.5)
  # Image 0: fg fraction .25; fg pixel .75 * .25, bg pixels 3 * .25 * .25; / 4 -> .09375.
  # Image 1: a constant prior has no foreground and weighs nothing.
  assert float(deepco3.saliency_loss(sal, prior)) == pytest.approx(0.09375 / 2, rel=1e-6)


def test_instance_peaks_ties_border_median():
  score = np.array([[5, 0, 0, 0],
                    [0, 0, 2, 2],
                    [-2, -2, 0, 0],
                    [-1, -4, -4, -4]], np.float32)
  # (0, 0): corner peak; (1, 2), (1, 3): a tie, both kept; (3, 0) = -1 is a local
  # maximum but below the median (0).
  assert deepco3.instance_peaks(score) == [(0, 0), (1, 2), (1, 3)]


class _TinyNet(nn.Module):
  conv_general_dilated: object = jax.lax.conv_general_dilated

  @nn.compact
  def __call__(self, x):
    conv = lambda c: nn.Conv(c, (3, 3), strides=2, conv_general_dilated=self.conv_general_dilated)
    return {'feat': nn.relu(conv(32)(nn.relu(conv(6)(x))))}


def _tiny_model():
  backbone = weights.Backbone('tiny', _TinyNet(), 'imagenet', 'test')
  model = deepco3.DeepCO3(deepco3.BackboneFeatures(backbone, 'feat'))
  variables = _TinyNet().init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
  return model, {'backbone': variables['params'], 'head': deepco3.init_head(32)}


def _batch(b=4, size=16):
  rng = np.random.default_rng(3)
  return {'image': rng.integers(0, 256, size=(b, size, size, 3), dtype=np.uint8),
          'prior': rng.uniform(size=(b, size, size)).astype(np.float32)}


@pytest.mark.slow
def test_model_outputs_at_zero_init():
  model, params = _tiny_model()
  out = model(params, None, jnp.zeros((2, 16, 16, 3)))
  assert out['feat'].shape == (2, 4, 4, 32) and out['score'].shape == (2, 4, 4)
  assert out['sal_full'].shape == (2, 16, 16)
  np.testing.assert_allclose(out['sal_small'], 0.5)
  np.testing.assert_allclose(out['sal_full'], 0.5)


def test_head_reads_raw_features_correlations_normalised_ones():
  model, params = _tiny_model()
  params['head'] = {'kernel': jnp.ones((1, 1, 32, 1)), 'bias': jnp.full((1,), 0.5)}
  x = jnp.asarray(_batch(b=2)['image'] / 255.0, jnp.float32)
  raw = model.features(params['backbone'], None, x)
  out = model(params, None, x)
  np.testing.assert_allclose(out['score'], raw.sum(-1) + 0.5, rtol=1e-5)
  np.testing.assert_allclose(out['feat'], deepco3.l2_normalize(raw, 1e-2), rtol=1e-5)


@pytest.mark.slow
def test_deepco3_loss_combines_terms_over_pairs():
  model, params = _tiny_model()
  batch = _batch()
  w = deepco3.LossWeights(copeak=0.5, affinity=0.1, affinity_alpha=4.0, saliency=1.0)
  loss_fn = jax.jit(functools.partial(deepco3.deepco3_loss, model=model, weights=w))
  (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, None, batch)
  out = model(params, None, batch['image'] / 255.0)
  f, s = out['feat'], out['sal_small']
  # Pairs (0, 2) and (1, 3) for a batch of 4.
  copeak = np.mean([float(deepco3.copeak_loss(t, deepco3.copeak_mask(t)))
                    for t in (deepco3.correlation(f[i], f[i + 2], s[i], s[i + 2]) for i in range(2))])
  assert float(aux['copeak']) == pytest.approx(copeak, rel=1e-5)
  assert float(aux['affinity']) == pytest.approx(
      float(deepco3.affinity_loss(f.reshape(-1, 32), s.reshape(-1), 4.0)), rel=1e-5)
  assert float(aux['saliency']) == pytest.approx(
      float(deepco3.saliency_loss(out['sal_full'], batch['prior'])), rel=1e-5)
  expected = 0.5 * aux['copeak'] + 0.1 * aux['affinity'] + aux['saliency']
  assert float(loss) == pytest.approx(float(expected), rel=1e-6)
  assert float(aux['copeaks_per_pair']) >= 1
  assert np.abs(np.asarray(grads['head']['kernel'])).max() > 0
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


def test_deepco3_loss_rejects_odd_batch():
  model, params = _tiny_model()
  with pytest.raises(ValueError, match='batch size must be even'):
    deepco3.deepco3_loss(params, None, _batch(b=3), model=model)


@pytest.mark.slow
def test_peak_backprop_model_same_forward_prm_backward():
  model, params = _tiny_model()
  params['head'] = {'kernel': jnp.ones((1, 1, 32, 1)), 'bias': jnp.zeros((1,))}
  prm_model = model.with_peak_backprop()
  x = jnp.asarray(_batch(b=1)['image'] / 255.0, jnp.float32)
  score = prm_model.score((params, None), x)
  assert score.shape == (4, 4)
  np.testing.assert_allclose(score, model.score((params, None), x), rtol=1e-6)
  onehot = jnp.zeros((4, 4)).at[1, 1].set(1.0)
  plain = jax.vjp(lambda v: model.score((params, None), v), x)[1](onehot)[0]
  maps = prm.peak_response_maps(prm_model.score, (params, None), x, [(1, 1), (2, 3)], chunk=2)
  assert not np.allclose(maps[0], plain[0].sum(-1))
  # Only PRM convs, ReLU and positive scalings lie between the input and the score.
  assert maps.min() >= 0
  assert maps.shape == (2, 16, 16) and np.all(np.isfinite(maps))
  # Two stride-2 3x3 'SAME' convs: score cell i sees input pixels 4i .. 4i + 6.
  for m, (y, x) in zip(maps, [(1, 1), (2, 3)]):
    inside = np.zeros_like(m, bool)
    inside[4 * y:4 * y + 7, 4 * x:4 * x + 7] = True
    assert np.all(m[~inside] == 0) and m[inside].sum() > 0
