"""Flax backbones vs independent torch reference forwards with the same random weights.

The torch modules below are written from the published architectures (torchvision VGG16 /
ResNet-50 naming, lukemelas' EfficientNet-PyTorch naming with TF 'SAME' padding), not
from coseg_jax; their state_dicts go through torch.save -> weights.load_backbone.
test_convert.py and test_real_weights.py reuse them.
"""
import dataclasses
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from coseg_jax import backbones
from coseg_jax import weights

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
CAFFE_MEAN_BGR = np.array([103.939, 116.779, 123.68], np.float32)
TOL = 1e-4


class RefVGG16(nn.Module):
  """torchvision's VGG16 `features` (names features.0 ... features.28)."""

  def __init__(self):
    super().__init__()
    layers, cin = [], 3
    for widths in ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)):
      for w in widths:
        layers += [nn.Conv2d(cin, w, 3, padding=1), nn.ReLU()]
        cin = w
      layers.append(nn.MaxPool2d(2))
    self.features = nn.Sequential(*layers)

  def forward(self, x):
    taps, stage, conv = {}, 1, 0
    for layer in self.features:
      x = layer(x)
      if isinstance(layer, nn.ReLU):
        conv += 1
        taps[f'conv{stage}_{conv}'] = x
      elif isinstance(layer, nn.MaxPool2d):
        taps[f'pool{stage}'] = x
        stage, conv = stage + 1, 0
    return taps


class RefBottleneck(nn.Module):

  def __init__(self, cin, width, stride, keras, eps):
    super().__init__()
    s1, s3 = (stride, 1) if keras else (1, stride)
    self.conv1 = nn.Conv2d(cin, width, 1, stride=s1, bias=keras)
    self.bn1 = nn.BatchNorm2d(width, eps=eps)
    self.conv2 = nn.Conv2d(width, width, 3, stride=s3, padding=1, bias=keras)
    self.bn2 = nn.BatchNorm2d(width, eps=eps)
    self.conv3 = nn.Conv2d(width, 4 * width, 1, bias=keras)
    self.bn3 = nn.BatchNorm2d(4 * width, eps=eps)
    self.downsample = None
    if stride != 1 or cin != 4 * width:
      self.downsample = nn.Sequential(nn.Conv2d(cin, 4 * width, 1, stride=stride, bias=keras),
                                      nn.BatchNorm2d(4 * width, eps=eps))

  def forward(self, x):
    y = F.relu(self.bn1(self.conv1(x)))
    y = F.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class RefResNet50(nn.Module):
  """torchvision naming; `keras` = Keras ResNet50 v1 semantics (stride in the first 1x1
  conv, conv biases, ZeroPadding2D before the stem max-pool)."""

  def __init__(self, keras=False, eps=1e-5):
    super().__init__()
    self.keras = keras
    self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=keras)
    self.bn1 = nn.BatchNorm2d(64, eps=eps)
    cin = 64
    for i, (width, blocks) in enumerate(((64, 3), (128, 4), (256, 6), (512, 3)), 1):
      layer = []
      for j in range(blocks):
        layer.append(RefBottleneck(cin, width, 2 if (i > 1 and j == 0) else 1, keras, eps))
        cin = 4 * width
      setattr(self, f'layer{i}', nn.Sequential(*layer))

  def forward(self, x):
    x = F.relu(self.bn1(self.conv1(x)))
    if self.keras:
      x = F.max_pool2d(F.pad(x, (1, 1, 1, 1)), 3, 2)
    else:
      x = F.max_pool2d(x, 3, 2, padding=1)
    taps = {'stem': x}
    for i in range(1, 5):
      x = getattr(self, f'layer{i}')(x)
      taps[f'layer{i}'] = x
    return taps


def same_pad(x, k, s):
  """TensorFlow 'SAME' padding (the extra pixel goes after) for a k x k, stride-s conv."""
  ih, iw = x.shape[-2:]
  ph = max((-(-ih // s) - 1) * s + k - ih, 0)
  pw = max((-(-iw // s) - 1) * s + k - iw, 0)
  return F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))


class RefMBConv(nn.Module):

  def __init__(self, cin, cout, k, s, e):
    super().__init__()
    hidden, self.k, self.s, self.e = cin * e, k, s, e
    self.skip = s == 1 and cin == cout
    if e != 1:
      self._expand_conv = nn.Conv2d(cin, hidden, 1, bias=False)
      self._bn0 = nn.BatchNorm2d(hidden, eps=1e-3, momentum=0.01)
    self._depthwise_conv = nn.Conv2d(hidden, hidden, k, stride=s, groups=hidden, bias=False)
    self._bn1 = nn.BatchNorm2d(hidden, eps=1e-3, momentum=0.01)
    self._project_conv = nn.Conv2d(hidden, cout, 1, bias=False)
    self._bn2 = nn.BatchNorm2d(cout, eps=1e-3, momentum=0.01)

  def forward(self, inputs):
    x = inputs
    if self.e != 1:
      x = F.relu6(self._bn0(self._expand_conv(x)))
    x = F.relu6(self._bn1(self._depthwise_conv(same_pad(x, self.k, self.s))))
    x = self._bn2(self._project_conv(x))
    return x + inputs if self.skip else x


class RefLite0(nn.Module):
  """EfficientNet-Lite0 in lukemelas' EfficientNet-PyTorch naming (with `_fc`)."""
  # efficientnet_lite_builder: r1_k3_s11_e1_i32_o16, r2_k3_s22_e6_i16_o24, ...
  STAGES = ((1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40),
            (3, 3, 2, 6, 40, 80), (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192),
            (1, 3, 1, 6, 192, 320))

  def __init__(self):
    super().__init__()
    self._conv_stem = nn.Conv2d(3, 32, 3, stride=2, bias=False)
    self._bn0 = nn.BatchNorm2d(32, eps=1e-3, momentum=0.01)
    blocks = []
    for r, k, s, e, cin, cout in self.STAGES:
      for i in range(r):
        blocks.append(RefMBConv(cin if i == 0 else cout, cout, k, s if i == 0 else 1, e))
    self._blocks = nn.ModuleList(blocks)
    self._conv_head = nn.Conv2d(320, 1280, 1, bias=False)
    self._bn1 = nn.BatchNorm2d(1280, eps=1e-3, momentum=0.01)
    self._fc = nn.Linear(1280, 1000)

  def forward(self, x):
    x = F.relu6(self._bn0(self._conv_stem(same_pad(x, 3, 2))))
    taps = {'stem': x}
    for i, block in enumerate(self._blocks):
      x = block(x)
      taps[f'block{i}'] = x
    taps['head'] = F.relu6(self._bn1(self._conv_head(x)))
    return taps


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


def check_parity(model, name, tmp_path, size, preprocessing='imagenet'):
  path = tmp_path / f'{name}.pth'
  torch.save(model.state_dict(), path)
  bb, variables = weights.load_backbone(
      name, weights_cfg(**{name: str(path)}, cache_dir=str(tmp_path / 'cache')))
  assert bb.preprocessing == preprocessing
  x = random_images(size)
  out = bb.apply(variables, jnp.asarray(x))
  ref = reference_taps(model, x, preprocessing)
  errors = max_rel_errors(out, ref)
  assert set(ref) <= set(out)
  bad = {k: e for k, e in errors.items() if not e < TOL}
  assert not bad, bad
  return bb, variables, out


def test_vgg16_matches_torch_reference(tmp_path):
  torch.manual_seed(0)
  bb, _, out = check_parity(randomize_batchnorm(RefVGG16(), 0), 'vgg16', tmp_path, size=32)
  assert out['pool5'].shape == (2, 1, 1, 512)
  assert isinstance(bb.module, backbones.VGG16)


def test_resnet50_matches_torch_reference(tmp_path):
  torch.manual_seed(1)
  bb, variables, _ = check_parity(randomize_batchnorm(RefResNet50(), 1), 'resnet50', tmp_path,
                                  size=48)
  assert not bb.module.stride_in_1x1 and bb.module.bn_eps == 1e-5
  assert set(variables) == {'params', 'batch_stats'}


@pytest.mark.parametrize('size', [64, 35])
def test_efficientnet_lite0_matches_torch_reference(tmp_path, size):
  # 35 is odd: TF 'SAME' padding is then symmetric for stride 2, asymmetric at 64.
  torch.manual_seed(2)
  _, variables, out = check_parity(randomize_batchnorm(RefLite0(), 2), 'efficientnet_lite0',
                                   tmp_path, size=size)
  assert 'batch_stats' not in variables  # BN folded into the convs
  for alias, block in backbones.lite0_stride_aliases().items():
    assert out[alias] is out[block]
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
