"""Frozen ImageNet backbones as Flax modules returning named intermediate taps.

Inputs are NHWC and already preprocessed for the weights' source (`weights.Backbone.apply`
does that). Every conv receives the module's `conv_general_dilated` so that DeepCO3's peak
back-propagation can swap in a custom_vjp convolution; ReLU, max-pool and residual adds
stay plain jax ops. The convolution, max-pool and ReLU6 come from `cpu_kernels`, which runs
its CPU rewrites on CPU and XLA's own kernels elsewhere.
"""
from typing import Callable

from flax import linen as nn
import jax

from coseg_jax.backbones import cpu_kernels

ConvFn = Callable[..., jax.Array]

NAMES = ('vgg16', 'resnet50', 'efficientnet_lite0')

_VGG16_STAGES = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))

# ResNet-50: (bottleneck width, blocks) per layer; outputs are 4 x width channels.
_RESNET50_LAYERS = ((64, 3), (128, 4), (256, 6), (512, 3))

# EfficientNet-Lite0 MBConv stages (efficientnet_lite_builder): repeats, kernel, stride,
# expand ratio, output channels. Stem (32 ch) and head (1280 ch) are not width-scaled.
_LITE0_STAGES = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80),
                 (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320))
_LITE0_STEM, _LITE0_HEAD = 32, 1280


def _lite0_blocks():
  """Per block: (expand ratio, kernel, stride, input channels, output channels)."""
  blocks, cin = [], _LITE0_STEM
  for repeats, kernel, stride, expand, cout in _LITE0_STAGES:
    for r in range(repeats):
      blocks.append((expand, kernel, stride if r == 0 else 1, cin, cout))
      cin = cout
  return tuple(blocks)


LITE0_BLOCKS = _lite0_blocks()


def _conv(conv_fn, features, kernel, name, *, stride=1, padding='SAME', groups=1):
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=padding,
                 feature_group_count=groups, name=name, conv_general_dilated=conv_fn)


def _sym(p):
  return ((p, p), (p, p))


def tap_info(name: str) -> dict[str, tuple[int, int]]:
  """Each tap of backbone `name` -> (stride w.r.t. the input, channels), in forward order."""
  info = {}
  if name == 'vgg16':
    for s, widths in enumerate(_VGG16_STAGES, 1):
      for c, width in enumerate(widths, 1):
        info[f'conv{s}_{c}'] = (2**(s - 1), width)
      info[f'pool{s}'] = (2**s, widths[-1])
  elif name == 'resnet50':
    info['stem'] = (4, 64)
    for i, (width, _) in enumerate(_RESNET50_LAYERS, 1):
      info[f'layer{i}'] = (4 * 2**(i - 1), 4 * width)
  elif name == 'efficientnet_lite0':
    strides = _lite0_block_strides()
    info['stem'] = (2, _LITE0_STEM)
    for i, ((*_, cout), stride) in enumerate(zip(LITE0_BLOCKS, strides)):
      info[f'block{i}'] = (stride, cout)
    info['head'] = (strides[-1], _LITE0_HEAD)
    info.update({alias: info[block] for alias, block in lite0_stride_aliases().items()})
  else:
    raise ValueError(f'unknown backbone {name!r}; expected one of {NAMES}')
  return info


def _lite0_block_strides():
  strides, stride = [], 2  # the stem halves the input
  for _, _, s, _, _ in LITE0_BLOCKS:
    stride *= s
    strides.append(stride)
  return strides


def lite0_stride_aliases() -> dict[str, str]:
  """'strideN' -> the last EfficientNet-Lite0 block at that stride."""
  # Later blocks overwrite earlier ones at the same stride.
  return {f'stride{s}': f'block{i}' for i, s in enumerate(_lite0_block_strides())}


class VGG16(nn.Module):
  """VGG16 conv1_1 ... conv5_3 (post-ReLU) and pool1 ... pool5; no fully connected layers."""
  conv_general_dilated: ConvFn = cpu_kernels.conv_general_dilated

  @nn.compact
  def __call__(self, x_BxHxWx3) -> dict[str, jax.Array]:
    taps, x = {}, x_BxHxWx3
    for s, widths in enumerate(_VGG16_STAGES, 1):
      for c, width in enumerate(widths, 1):
        name = f'conv{s}_{c}'
        x = nn.relu(_conv(self.conv_general_dilated, width, 3, name, padding=_sym(1))(x))
        taps[name] = x
      x = cpu_kernels.max_pool(x, 2, 2)
      taps[f'pool{s}'] = x
    return taps


class _Bottleneck(nn.Module):
  width: int
  stride: int
  downsample: bool
  stride_in_1x1: bool
  bn_eps: float
  conv_general_dilated: ConvFn

  @nn.compact
  def __call__(self, x):
    conv = lambda feat, k, name, **kw: _conv(self.conv_general_dilated, feat, k, name, **kw)
    bn = lambda name: nn.BatchNorm(use_running_average=True, epsilon=self.bn_eps, name=name)
    # Keras' ResNet50 (v1) strides the first 1x1 conv, torchvision's (v1.5) the 3x3 one.
    s1, s3 = (self.stride, 1) if self.stride_in_1x1 else (1, self.stride)
    y = nn.relu(bn('bn1')(conv(self.width, 1, 'conv1', stride=s1, padding=_sym(0))(x)))
    y = nn.relu(bn('bn2')(conv(self.width, 3, 'conv2', stride=s3, padding=_sym(1))(y)))
    y = bn('bn3')(conv(4 * self.width, 1, 'conv3', padding=_sym(0))(y))
    if self.downsample:
      x = bn('downsample_bn')(
          conv(4 * self.width, 1, 'downsample_conv', stride=self.stride, padding=_sym(0))(x))
    return nn.relu(y + x)


class ResNet50(nn.Module):
  """Inference-mode ResNet-50 (BatchNorm from `batch_stats`); taps stem, layer1..layer4.

  Keras weights: stride_in_1x1=True and the BN epsilon of the Keras code that published
  them; torchvision: stride_in_1x1=False, bn_eps=1e-5 (its convs' biases stay zero).
  """
  stride_in_1x1: bool = False
  bn_eps: float = 1e-5
  conv_general_dilated: ConvFn = cpu_kernels.conv_general_dilated

  @nn.compact
  def __call__(self, x_BxHxWx3) -> dict[str, jax.Array]:
    x = _conv(self.conv_general_dilated, 64, 7, 'conv1', stride=2, padding=_sym(3))(x_BxHxWx3)
    x = nn.BatchNorm(use_running_average=True, epsilon=self.bn_eps, name='bn1')(x)
    # Padding with -inf (torchvision) equals Keras' zero padding after the ReLU.
    x = cpu_kernels.max_pool(nn.relu(x), 3, 2, pad=1)
    taps = {'stem': x}
    for i, (width, blocks) in enumerate(_RESNET50_LAYERS, 1):
      for j in range(blocks):
        x = _Bottleneck(width, stride=2 if (j == 0 and i > 1) else 1, downsample=j == 0,
                        stride_in_1x1=self.stride_in_1x1, bn_eps=self.bn_eps,
                        conv_general_dilated=self.conv_general_dilated,
                        name=f'layer{i}_{j}')(x)
      taps[f'layer{i}'] = x
    return taps


class _MBConv(nn.Module):
  """Inverted residual with BN folded into each conv (kernel + bias), ReLU6, no SE."""
  expand: int
  kernel: int
  stride: int
  cin: int
  cout: int
  conv_general_dilated: ConvFn

  @nn.compact
  def __call__(self, x):
    conv = lambda feat, k, name, **kw: _conv(self.conv_general_dilated, feat, k, name, **kw)
    hidden = self.cin * self.expand
    y = x
    if self.expand != 1:
      y = cpu_kernels.relu6(conv(hidden, 1, 'expand_conv')(y))
    # TF-style SAME padding (asymmetric for stride 2), as the weights were trained with.
    y = cpu_kernels.relu6(conv(hidden, self.kernel, 'depthwise_conv', stride=self.stride,
                   groups=hidden)(y))
    y = conv(self.cout, 1, 'project_conv')(y)
    if self.stride == 1 and self.cin == self.cout:
      y = y + x
    return y


class EfficientNetLite0(nn.Module):
  """EfficientNet-Lite0 features: taps stem, block0..block15, head, stride2..stride32."""
  conv_general_dilated: ConvFn = cpu_kernels.conv_general_dilated

  @nn.compact
  def __call__(self, x_BxHxWx3) -> dict[str, jax.Array]:
    x = cpu_kernels.relu6(_conv(self.conv_general_dilated, _LITE0_STEM, 3, 'stem', stride=2)(x_BxHxWx3))
    taps = {'stem': x}
    for i, (expand, kernel, stride, cin, cout) in enumerate(LITE0_BLOCKS):
      x = _MBConv(expand, kernel, stride, cin, cout, self.conv_general_dilated,
                  name=f'blocks_{i}')(x)
      taps[f'block{i}'] = x
    taps['head'] = cpu_kernels.relu6(_conv(self.conv_general_dilated, _LITE0_HEAD, 1, 'head')(x))
    for alias, block in lite0_stride_aliases().items():
      taps[alias] = taps[block]
    return taps


def make(name: str, **fields) -> nn.Module:
  """The backbone module called `name` (one of NAMES) with the given dataclass fields."""
  modules = {'vgg16': VGG16, 'resnet50': ResNet50, 'efficientnet_lite0': EfficientNetLite0}
  if name not in modules:
    raise ValueError(f'unknown backbone {name!r}; expected one of {NAMES}')
  return modules[name](**fields)
