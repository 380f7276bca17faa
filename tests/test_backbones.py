"""Flax backbones vs independent torch reference forwards with the same random weights.

The torch modules of coseg_jax/torch_ref.py are written from the published architectures
(torchvision VGG16 / ResNet-50 naming, lukemelas' EfficientNet-PyTorch naming with TF 'SAME'
padding), independently of coseg_jax.backbones; their state_dicts go through torch.save ->
weights.load_backbone. test_convert.py and test_real_weights.py reuse them.
"""
import dataclasses
import functools
import re
import types

from flax import linen as flax_nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch import nn

from coseg_jax.backbones import cpu_kernels
from coseg_jax.backbones import modules as backbones
from coseg_jax.backbones import weights
from coseg_jax.torch_ref import EfficientNetLite0 as RefLite0
from coseg_jax.torch_ref import ResNet50 as RefResNet50
from coseg_jax.torch_ref import VGG16 as RefVGG16

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
CAFFE_MEAN_BGR = np.array([103.939, 116.779, 123.68], np.float32)
TOL = 1e-4


def randomize_batchnorm(model, seed):
  """Non-trivial BN statistics so that a wrong mean/var/eps mapping shows."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, nn.BatchNorm2d):
        n = m.num_features
        m.weight.copy_(0.5 + torch.rand(n, generator=g))
        m.bias.copy_(0.1 * torch.randn(n, generator=g))
        m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
        m.running_var.copy_(0.5 + torch.rand(n, generator=g))
      elif isinstance(m, nn.Conv2d) and m.bias is not None:
        m.bias.copy_(0.1 * torch.randn(m.out_channels, generator=g))
  return model.eval()


def reference_taps(model, x01_BxHxWx3, preprocessing):
  if preprocessing == 'caffe':
    x = x01_BxHxWx3[..., ::-1] * 255.0 - CAFFE_MEAN_BGR
  else:
    x = (x01_BxHxWx3 - IMAGENET_MEAN) / IMAGENET_STD
  with torch.no_grad():
    taps = model(torch.from_numpy(np.ascontiguousarray(x, np.float32)).permute(0, 3, 1, 2))
  return {k: v.permute(0, 2, 3, 1).numpy() for k, v in taps.items()}


def max_rel_errors(flax_taps, ref_taps):
  """Per reference tap: max |flax - ref| / max |ref|."""
  return {k: float(np.abs(np.asarray(flax_taps[k]) - r).max() / np.abs(r).max())
          for k, r in ref_taps.items()}


def weights_cfg(**fields):
  base = dict(dir=None, vgg16=None, resnet50=None, efficientnet_lite0=None, cache_dir=None)
  return types.SimpleNamespace(**{**base, **fields})


def random_images(size, batch=2, seed=0):
  return np.random.RandomState(seed).rand(batch, size, size, 3).astype(np.float32)


def jit_apply(bb, variables, x01_BxHxWx3, taps=None):
  """`bb.apply` compiled as one program: eager, every op of a whole network compiles on
  its own (about 25 s for Lite0 on 2 cores, against 3 s jitted)."""
  return jax.jit(functools.partial(bb.apply, taps=taps))(variables, jnp.asarray(x01_BxHxWx3))


def check_parity(model, name, tmp_path, size, preprocessing='imagenet'):
  path = tmp_path / f'{name}.pth'
  torch.save(model.state_dict(), path)
  bb, variables = weights.load_backbone(
      name, weights_cfg(**{name: str(path)}, cache_dir=str(tmp_path / 'cache')))
  assert bb.preprocessing == preprocessing
  x = random_images(size)
  out = jit_apply(bb, variables, x)
  ref = reference_taps(model, x, preprocessing)
  errors = max_rel_errors(out, ref)
  assert set(ref) <= set(out)
  bad = {k: e for k, e in errors.items() if not e < TOL}
  assert not bad, bad
  return bb, variables, out


@pytest.mark.slow
def test_vgg16_matches_torch_reference(tmp_path):
  torch.manual_seed(0)
  bb, _, out = check_parity(randomize_batchnorm(RefVGG16(), 0), 'vgg16', tmp_path, size=32)
  assert out['pool5'].shape == (2, 1, 1, 512)
  assert isinstance(bb.module, backbones.VGG16)


@pytest.mark.slow
def test_resnet50_matches_torch_reference(tmp_path):
  torch.manual_seed(1)
  bb, variables, _ = check_parity(randomize_batchnorm(RefResNet50(), 1), 'resnet50', tmp_path,
                                  size=48)
  assert not bb.module.stride_in_1x1 and bb.module.bn_eps == 1e-5
  assert set(variables) == {'params', 'batch_stats'}


@pytest.mark.slow
@pytest.mark.parametrize('size', [64, 35])
def test_efficientnet_lite0_matches_torch_reference(tmp_path, size):
  # 35 is odd: TF 'SAME' padding is then symmetric for stride 2, asymmetric at 64.
  torch.manual_seed(2)
  _, variables, out = check_parity(randomize_batchnorm(RefLite0(), 2), 'efficientnet_lite0',
                                   tmp_path, size=size)
  assert 'batch_stats' not in variables  # BN folded into the convs
  for alias, block in backbones.lite0_stride_aliases().items():
    np.testing.assert_array_equal(out[alias], out[block])
    assert out[alias].shape[1] == -(-size // int(alias[len('stride'):]))


@pytest.mark.parametrize('name', backbones.NAMES)
def test_tap_info_matches_output_shapes(name):
  module = backbones.make(name)
  x = jnp.zeros((1, 64, 64, 3))
  out = jax.eval_shape(lambda: module.init_with_output(jax.random.PRNGKey(0), x)[0])
  info = backbones.tap_info(name)
  assert set(info) == set(out)
  for tap, (stride, channels) in info.items():
    assert out[tap].shape == (1, 64 // stride, 64 // stride, channels), tap


@pytest.mark.parametrize('name,num_convs', [('vgg16', 13), ('resnet50', 53),
                                            ('efficientnet_lite0', 1 + 16 * 2 + 15 + 1)])
def test_every_conv_uses_the_module_conv_function(name, num_convs):
  calls = []

  def conv_fn(*args, **kwargs):
    calls.append(1)
    return jax.lax.conv_general_dilated(*args, **kwargs)

  module = backbones.make(name)
  x = jnp.zeros((1, 32, 32, 3))
  variables = jax.eval_shape(module.init, jax.random.PRNGKey(0), x)
  swapped = module.clone(conv_general_dilated=conv_fn)
  jax.eval_shape(swapped.apply, variables, x)
  assert len(calls) == num_convs


@pytest.mark.slow
def test_backbone_apply_selects_taps_and_swaps_conv(tmp_path):
  bb, variables = weights.load_backbone('efficientnet_lite0',
                                        weights_cfg(cache_dir=str(tmp_path)))
  x = jnp.asarray(random_images(32, batch=1))
  full = bb.apply(variables, x)
  some = bb.apply(variables, x, taps=['stem', 'head'])
  assert set(some) == {'stem', 'head'}
  np.testing.assert_array_equal(some['head'], full['head'])
  doubled = lambda *a, **k: 2 * jax.lax.conv_general_dilated(*a, **k)
  bb2 = dataclasses.replace(bb, module=bb.module.clone(conv_general_dilated=doubled))
  assert not np.allclose(bb2.apply(variables, x, taps=['stem'])['stem'], some['stem'])
  with pytest.raises(ValueError, match='no taps'):
    bb.apply(variables, x, taps=['conv5_3'])


_NHWC = ('NHWC', 'HWIO', 'NHWC')


def _conv_and_grads(conv_fn, x, w, stride, padding, groups):
  f = lambda x, w: conv_fn(x, w, (stride, stride), padding, dimension_numbers=_NHWC,
                           feature_group_count=groups)
  y, vjp = jax.vjp(f, x, w)
  cotangent = jnp.asarray(np.random.RandomState(1).randn(*y.shape), jnp.float32)
  return (y, *vjp(cotangent))


def _assert_matches_lax(x, w, stride, padding, groups):
  # The two branches of cpu_kernels.conv_general_dilated, both run on this CPU.
  fast = _conv_and_grads(cpu_kernels.cpu_conv_general_dilated, x, w, stride, padding, groups)
  ref = _conv_and_grads(jax.lax.conv_general_dilated, x, w, stride, padding, groups)
  for name, a, b in zip(('output', 'input gradient', 'kernel gradient'), fast, ref):
    assert a.shape == b.shape, name
    # Sums in another order: errors relative to the largest entry, not to each one.
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * max(1.0, float(jnp.abs(b).max())),
                               err_msg=name)


# Even sizes with 'SAME' at stride 2 pad asymmetrically (TF), as in EfficientNet-Lite0.
@pytest.mark.slow
@pytest.mark.parametrize('kernel,stride,padding', [
    (3, 1, 'SAME'), (3, 2, 'SAME'), (5, 1, 'SAME'), (5, 2, 'SAME'),
    (3, 2, ((1, 1), (1, 1))), (5, 1, ((2, 1), (0, 2)))])
@pytest.mark.parametrize('height', [8, 7])
def test_depthwise_conv_matches_lax(kernel, stride, padding, height):
  rng = np.random.RandomState(0)
  x = jnp.asarray(rng.randn(2, height, 6, 4), jnp.float32)
  w = jnp.asarray(rng.randn(kernel, kernel, 1, 4), jnp.float32)
  _assert_matches_lax(x, w, stride, padding, 4)


@pytest.mark.parametrize('padding', ['SAME', 'VALID', ((0, 0), (0, 0))])
def test_1x1_conv_matches_lax(padding):
  rng = np.random.RandomState(0)
  x = jnp.asarray(rng.randn(2, 5, 6, 4), jnp.float32)
  w = jnp.asarray(rng.randn(1, 1, 4, 3), jnp.float32)
  _assert_matches_lax(x, w, 1, padding, 1)


# The kernel gradient's bands: one row each, a few rows each (~8 at 3x3, stride 1), or the
# whole image; a prime height has no bands of several rows. Stride 2 at even and odd
# sizes, TF-SAME's asymmetric pads, stride = kernel, stride > kernel.
@pytest.mark.slow
@pytest.mark.parametrize('kernel,stride,padding', [
    (3, 1, 'SAME'), (3, 2, 'SAME'), (3, 2, ((0, 1), (0, 1))), (7, 2, ((3, 3), (3, 3))),
    (5, 3, 'VALID'), (2, 2, 'VALID'), (3, 1, ((2, 0), (1, 3))), (1, 2, 'SAME'), (1, 3, 'VALID')])
@pytest.mark.parametrize('height', [40, 37])
@pytest.mark.parametrize('band_bytes', [1, 8 * 24 * 9 * 3 * 4, None])
@pytest.mark.parametrize('tap_gemm', [True, False])  # the two input gradients of strided convs
def test_dense_conv_matches_lax(kernel, stride, padding, height, band_bytes, tap_gemm, monkeypatch):
  if band_bytes:
    monkeypatch.setattr(cpu_kernels, '_BAND_BYTES', band_bytes)
  monkeypatch.setattr(cpu_kernels, '_TAP_GEMM_CHANNELS', 4 if tap_gemm else 0)
  rng = np.random.RandomState(0)
  x = jnp.asarray(rng.randn(2, height, 24, 3), jnp.float32)
  w = jnp.asarray(rng.randn(kernel, kernel, 3, 5), jnp.float32)
  _assert_matches_lax(x, w, stride, padding, 1)


def test_kernel_gradient_bands_of_whole_images(monkeypatch):
  # Room for two whole 3x3-conv images per band: 2 bands of 2 of the 4 images.
  monkeypatch.setattr(cpu_kernels, '_BAND_BYTES', 2 * 10 * 12 * 9 * 3 * 4)
  rng = np.random.RandomState(0)
  x = jnp.asarray(rng.randn(4, 10, 12, 3), jnp.float32)
  w = jnp.asarray(rng.randn(3, 3, 3, 5), jnp.float32)
  hlo = jax.jit(jax.grad(lambda w: cpu_kernels.conv_general_dilated(
      x, w, (1, 1), 'SAME', dimension_numbers=_NHWC).sum())).lower(w).compile().as_text()
  assert 'f32[27,240]' in hlo and ' while(' in hlo  # a K x P band of two images, two bands
  _assert_matches_lax(x, w, 1, 'SAME', 1)


@pytest.mark.parametrize('channels', [3, 16])  # one GEMM for all taps / phase convs
def test_dense_conv_gradients_are_banded_gemms_and_phase_convs(channels):
  # The point of the custom gradients: no image-sized-window kernel-gradient conv and no
  # zero-dilated input-gradient conv reach XLA.
  x, w = jnp.zeros((2, 16, 16, channels)), jnp.zeros((3, 3, channels, 4))
  f = lambda x, w: cpu_kernels.conv_general_dilated(x, w, (2, 2), 'SAME', dimension_numbers=_NHWC)
  hlo = jax.jit(jax.grad(lambda x, w: f(x, w).sum(), argnums=(0, 1))).lower(x, w).compile().as_text()
  windows = re.findall(r'window=\{size=(\d+)x(\d+)', hlo)
  assert all(int(h) <= 3 and int(w) <= 3 for h, w in windows), windows
  assert bool(windows) == (channels >= cpu_kernels._TAP_GEMM_CHANNELS)
  assert 'lhs_dilate' not in hlo and ' dot(' in hlo


@pytest.mark.parametrize('kernel,stride,padding,groups,cin_per_group', [
    (3, 2, 'SAME', 2, 2), (3, 1, ((-1, 1), (0, 1)), 1, 4)])
def test_other_convs_are_lax_convs(kernel, stride, padding, groups, cin_per_group):
  rng = np.random.RandomState(0)
  x = jnp.asarray(rng.randn(1, 6, 6, 4), jnp.float32)
  w = jnp.asarray(rng.randn(kernel, kernel, cin_per_group, 4), jnp.float32)
  fast = _conv_and_grads(cpu_kernels.conv_general_dilated, x, w, stride, padding, groups)
  ref = _conv_and_grads(jax.lax.conv_general_dilated, x, w, stride, padding, groups)
  for a, b in zip(fast, ref):
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_lite0_convolutions_are_slices_and_dots():
  module = backbones.make('efficientnet_lite0')
  x = jnp.zeros((1, 32, 32, 3))
  variables = jax.eval_shape(module.init, jax.random.PRNGKey(0), x)
  # What is lowered for CPU (the jaxpr also holds the other platforms' branch).
  forward = jax.jit(module.apply).lower(variables, x).as_text()
  assert forward.count('stablehlo.convolution') == 1  # the 3x3 stem
  grad = jax.grad(lambda v, x: module.apply(v, x)['head'].sum(), argnums=(0, 1))
  backward = jax.jit(grad).lower(variables, x).as_text()
  groups = re.findall(r'feature_group_count = (\d+)', backward)
  assert groups and set(groups) == {'1'}


@pytest.mark.slow
@pytest.mark.parametrize('ties', [False, True])
@pytest.mark.parametrize('k,s,pad,size', [(2, 2, 0, 8), (2, 2, 0, 7), (3, 2, 1, 8), (3, 2, 1, 7)])
def test_max_pool_matches_flax(k, s, pad, size, ties):
  # Ties (values from {0, 1, 2}, as after a ReLU) must send the gradient to the first
  # maximum of each window, as flax's select-and-scatter and PyTorch do.
  values = np.random.RandomState(0).permutation(2 * size * 5 * 3)
  x = jnp.asarray((values % 3 if ties else values).reshape(2, size, 5, 3), jnp.float32)
  flax_pool = lambda x: flax_nn.max_pool(x, (k, k), strides=(s, s), padding=((pad, pad),) * 2)
  ours = lambda x: cpu_kernels.cpu_max_pool(x, k, s, pad)
  np.testing.assert_array_equal(ours(x), flax_pool(x))
  np.testing.assert_array_equal(cpu_kernels.xla_max_pool(x, k, s, pad), flax_pool(x))
  cotangent = jnp.asarray(np.random.RandomState(1).randn(*flax_pool(x).shape), jnp.float32)
  grads = [jax.vjp(f, x)[1](cotangent)[0] for f in (ours, flax_pool)]
  # Overlapping windows add their shares in another order.
  np.testing.assert_allclose(*grads, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('platform', ['cpu', 'cuda', 'tpu'])
def test_rewrites_are_lowered_for_cpu_only(platform):
  # Lowered for each platform without its device: on GPU/TPU the grouped conv, the kernel
  # gradient and the max-pool backward stay XLA's own ops, which those compilers run fast.
  x, w = jnp.ones((2, 8, 8, 4)), jnp.ones((3, 3, 1, 4))
  def loss(x, w):
    y = cpu_kernels.conv_general_dilated(x, w, (1, 1), 'SAME', dimension_numbers=_NHWC,
                                         feature_group_count=4)
    return cpu_kernels.max_pool(y, 3, 2, 1).sum()
  exported = jax.export.export(jax.jit(jax.grad(loss, argnums=(0, 1))), platforms=[platform])
  text = exported(x, w).mlir_module()
  xla_ops = ('feature_group_count = 4' in text, 'select_and_scatter' in text)
  assert xla_ops == ((False, False) if platform == 'cpu' else (True, True))


def test_relu6_matches_jax():
  x = jnp.array([-1.0, 0.0, 0.5, 5.5, 6.0, 7.0, jnp.nan], jnp.float32)
  np.testing.assert_array_equal(cpu_kernels.relu6(x), jax.nn.relu6(x))
  grads = [jax.grad(lambda x: jnp.sum(f(x) * jnp.arange(7.0)))(x)
           for f in (cpu_kernels.relu6, jax.nn.relu6)]
  np.testing.assert_array_equal(*grads)
