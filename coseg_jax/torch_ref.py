"""PyTorch twins of the JAX computations, for parity tests and benchmarks only.

Never imported by the main job (torch is the optional `torch` extra). Everything is NCHW.

Backbones use the published layouts (torchvision VGG16 / ResNet-50 names,
lukemelas' EfficientNet-PyTorch names with TF 'SAME' padding), so their state_dicts are
what `convert` reads. `backbone_state_dict` goes the other way: it inverts convert's
rules to turn a Flax variable tree into the state_dict of the twin module
(`make_backbone`), whose parameters then correspond one to one to the Flax leaves (the
EfficientNet-Lite0 twin is built with its BatchNorms folded, like the Flax module).

Resizing: jax.image.resize(..., 'bilinear') uses half-pixel centres and, when it
downsamples, a triangle kernel widened by the scale (antialiasing).
F.interpolate(mode='bilinear', align_corners=False, antialias=True) computes the same
weights in both directions (without antialias it differs when downsampling), so
`resize_bilinear` uses it.
"""
import math

from flax import traverse_util
import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

from coseg_jax.backbones import convert
from coseg_jax.backbones import modules as backbones
from coseg_jax.instance import model as deepco3
from coseg_jax.multiclass import attention
from coseg_jax.multiclass import baseline
from coseg_jax.multiclass import generator

# Written from the published preprocessing, not imported, so a wrong constant on the JAX
# side shows up in the parity tests.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)


def preprocess(x01_Bx3xHxW, mode):
  """Float RGB in [0, 1] -> the input the weights were trained on ('caffe' | 'imagenet')."""
  shape = (1, 3, 1, 1)
  if mode == 'caffe':
    return x01_Bx3xHxW.flip(1) * 255.0 - torch.tensor(CAFFE_MEAN_BGR).view(shape)
  if mode == 'imagenet':
    return (x01_Bx3xHxW - torch.tensor(IMAGENET_MEAN).view(shape)) / torch.tensor(
        IMAGENET_STD).view(shape)
  raise ValueError(f'unknown preprocessing {mode!r}')


def resize_bilinear(x_BxCxHxW, size):
  """jax.image.resize(x, ..., 'bilinear') on the last two axes (see module docstring)."""
  return F.interpolate(x_BxCxHxW, size=tuple(size), mode='bilinear', align_corners=False,
                       antialias=True)


def same_pad(x, k, s):
  """TensorFlow 'SAME' padding (the extra pixel goes after) for a k x k, stride-s conv."""
  ih, iw = x.shape[-2:]
  ph = max((-(-ih // s) - 1) * s + k - ih, 0)
  pw = max((-(-iw // s) - 1) * s + k - iw, 0)
  return F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))


class _Backbone(nn.Module):
  """`forward(x, taps=None)` returns the named taps; it stops once the asked-for ones exist."""

  def forward(self, x, taps=None):
    out = {}
    for name, y in self.iter_taps(x):
      out[name] = y
      if taps is not None and all(t in out for t in taps):
        break
    if taps is None:
      return out
    return {t: out[t] for t in taps}

  def iter_taps(self, x):
    raise NotImplementedError


class VGG16(_Backbone):
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

  def iter_taps(self, x):
    stage, conv = 1, 0
    for layer in self.features:
      x = layer(x)
      if isinstance(layer, nn.ReLU):
        conv += 1
        yield f'conv{stage}_{conv}', x
      elif isinstance(layer, nn.MaxPool2d):
        yield f'pool{stage}', x
        stage, conv = stage + 1, 0


class _Bottleneck(nn.Module):

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


class ResNet50(_Backbone):
  """torchvision naming; `keras` = Keras ResNet50 v1 semantics (stride in the first 1x1
  conv, conv biases, zero padding before the stem max-pool)."""

  def __init__(self, keras=False, eps=1e-5):
    super().__init__()
    self.keras = keras
    self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=keras)
    self.bn1 = nn.BatchNorm2d(64, eps=eps)
    cin = 64
    for i, (width, blocks) in enumerate(((64, 3), (128, 4), (256, 6), (512, 3)), 1):
      layer = []
      for j in range(blocks):
        layer.append(_Bottleneck(cin, width, 2 if (i > 1 and j == 0) else 1, keras, eps))
        cin = 4 * width
      setattr(self, f'layer{i}', nn.Sequential(*layer))

  def iter_taps(self, x):
    x = F.relu(self.bn1(self.conv1(x)))
    if self.keras:
      x = F.max_pool2d(F.pad(x, (1, 1, 1, 1)), 3, 2)
    else:
      x = F.max_pool2d(x, 3, 2, padding=1)
    yield 'stem', x
    for i in range(1, 5):
      x = getattr(self, f'layer{i}')(x)
      yield f'layer{i}', x


def _conv_bn(cin, cout, k, stride, groups, folded):
  """A bias-free conv + BN (published), or one conv with a bias (BN folded into it)."""
  conv = nn.Conv2d(cin, cout, k, stride=stride, groups=groups, bias=folded)
  bn = nn.Identity() if folded else nn.BatchNorm2d(cout, eps=1e-3, momentum=0.01)
  return conv, bn


class _MBConv(nn.Module):

  def __init__(self, cin, cout, k, s, e, folded):
    super().__init__()
    hidden, self.k, self.s, self.e = cin * e, k, s, e
    self.skip = s == 1 and cin == cout
    if e != 1:
      self._expand_conv, self._bn0 = _conv_bn(cin, hidden, 1, 1, 1, folded)
    self._depthwise_conv, self._bn1 = _conv_bn(hidden, hidden, k, s, hidden, folded)
    self._project_conv, self._bn2 = _conv_bn(hidden, cout, 1, 1, 1, folded)

  def forward(self, inputs):
    x = inputs
    if self.e != 1:
      x = F.relu6(self._bn0(self._expand_conv(x)))
    x = F.relu6(self._bn1(self._depthwise_conv(same_pad(x, self.k, self.s))))
    x = self._bn2(self._project_conv(x))
    return x + inputs if self.skip else x


class EfficientNetLite0(_Backbone):
  """EfficientNet-Lite0 in lukemelas' EfficientNet-PyTorch naming.

  `folded=False`: the published layout (BN layers, the `_fc` classifier), whose
  state_dict `convert` reads. `folded=True`: convs with biases and no BN, no `_fc`,
  the twin of the Flax module. Taps: stem, block0..block15, head, and 'strideN' for the
  last block at each stride N.
  """
  # efficientnet_lite_builder: r1_k3_s11_e1_i32_o16, r2_k3_s22_e6_i16_o24, ... as
  # (repeats, kernel, stride, expand, in, out); written out here, not taken from
  # coseg_jax.backbones, so that a wrong table there shows up in the parity tests.
  STAGES = ((1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40),
            (3, 3, 2, 6, 40, 80), (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192),
            (1, 3, 1, 6, 192, 320))

  def __init__(self, folded=False):
    super().__init__()
    self._conv_stem, self._bn0 = _conv_bn(3, 32, 3, 2, 1, folded)
    blocks, strides, stride = [], [], 2
    for repeats, k, s, e, cin, cout in self.STAGES:
      for r in range(repeats):
        blocks.append(_MBConv(cin if r == 0 else cout, cout, k, s if r == 0 else 1, e, folded))
        stride *= s if r == 0 else 1
        strides.append(stride)
    self._blocks = nn.ModuleList(blocks)
    self._aliases = {i: f'stride{n}' for i, n in enumerate(strides)
                     if i + 1 == len(strides) or strides[i + 1] != n}
    self._conv_head, self._bn1 = _conv_bn(320, 1280, 1, 1, 1, folded)
    if not folded:
      self._fc = nn.Linear(1280, 1000)

  def iter_taps(self, x):
    x = F.relu6(self._bn0(self._conv_stem(same_pad(x, 3, 2))))
    yield 'stem', x
    for i, block in enumerate(self._blocks):
      x = block(x)
      yield f'block{i}', x
      if i in self._aliases:
        yield self._aliases[i], x
    yield 'head', F.relu6(self._bn1(self._conv_head(x)))


def make_backbone(name):
  """The torch twin of `backbones.make(name)` (torchvision ResNet-50 semantics)."""
  modules = {'vgg16': VGG16, 'resnet50': ResNet50,
             'efficientnet_lite0': lambda: EfficientNetLite0(folded=True)}
  if name not in modules:
    raise ValueError(f'unknown backbone {name!r}; expected one of {backbones.NAMES}')
  return modules[name]()


_RULES = {'vgg16': convert.vgg16_torch_rules, 'resnet50': convert.resnet50_torch_rules,
          'efficientnet_lite0': convert.efficientnet_lite0_rules}
_BN_ROLES = (('params', 'scale'), ('params', 'bias'), ('batch_stats', 'mean'),
             ('batch_stats', 'var'))


def _kernel_to_torch(kernel):
  # Flax conv [kh, kw, in/groups, out] -> torch [out, in/groups, kh, kw]; Dense [in, out]
  # -> Linear [out, in].
  kernel = np.asarray(kernel)
  return kernel.transpose(3, 2, 0, 1) if kernel.ndim == 4 else kernel.T


def backbone_state_dict(name, variables):
  """Flax variables of backbone `name` -> state_dict of `make_backbone(name)`.

  Inverts convert's torch rules: a conv rule maps kernel/bias to weight/bias (the
  torchvision ResNet convs have no bias, so theirs must be zero), a BN rule maps
  scale/bias/mean/var, and a folded conv+BN rule of EfficientNet-Lite0 maps to the
  twin's conv with bias. Also maps gradient trees given as {'params': grads}: only the
  leaves present are mapped.
  """
  flat = traverse_util.flatten_dict(dict(variables))
  state, used = {}, set()

  def take(rule, role):
    key = (role[0], *rule.target, role[1])
    if key in flat:
      used.add(key)
      return np.asarray(flat[key])
    return None

  for rule in _RULES[name]():
    if len(rule.sources) == 4:  # BatchNorm
      for src, role in zip(rule.sources, _BN_ROLES):
        value = take(rule, role)
        if value is not None:
          state[src] = value
      continue
    kernel, bias = take(rule, ('params', 'kernel')), take(rule, ('params', 'bias'))
    weight_name = rule.sources[0]
    if kernel is not None:
      state[weight_name] = _kernel_to_torch(kernel)
    if bias is None:
      continue
    if len(rule.sources) == 1:  # conv without a bias in the published layout
      if np.any(bias != 0):
        raise ValueError(f'{name}: {"/".join(rule.target)} has a non-zero bias, which the '
                         'torch layout cannot hold')
    else:
      state[weight_name[:-len('weight')] + 'bias'] = bias
  unused = ['/'.join(k) for k in flat if k not in used]
  if unused:
    raise ValueError(f'{name}: Flax leaves without a torch counterpart: {unused}')
  return {k: _tensor(v) for k, v in state.items()}


def _module_state_dict(tree):
  """Generic Flax params of Dense/Conv layers and scalars -> torch names."""
  state = {}
  for path, value in traverse_util.flatten_dict(dict(tree)).items():
    *prefix, leaf = path
    if leaf == 'kernel':
      value, leaf = _kernel_to_torch(value), 'weight'
    state['.'.join((*prefix, leaf))] = _tensor(value)
  return state


def _tensor(array):
  """A float tensor copy (float64 stays float64, so a float64 module loads it exactly)."""
  array = np.asarray(array)
  return torch.tensor(array, dtype=torch.float64 if array.dtype == np.float64 else torch.float32)


def load_state(module, state):
  """Loads `state` into `module`; every parameter and buffer must be given exactly."""
  expected = {k for k in module.state_dict() if not k.endswith('num_batches_tracked')}
  missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
  if missing or unexpected:
    raise ValueError(f'state does not fit {type(module).__name__}: missing {missing}, '
                     f'unexpected {unexpected}')
  module.load_state_dict(state, strict=False)
  return module


class Attention(nn.Module):
  """Twin of `attention.AttentionModule` on NCHW maps (Linear layers act on B x M x C)."""

  def __init__(self, channels, spec: attention.AttentionSpec):
    super().__init__()
    self.spec = spec
    d = max(channels // spec.reduction, 1)
    parts = spec.mode.split('_')
    if 'sa' in parts:
      self.sa_query, self.sa_key = nn.Linear(channels, d), nn.Linear(channels, d)
      self.sa_value = nn.Linear(channels, channels)
    if 'ma' in parts:
      self.ma_query, self.ma_key = nn.Linear(channels, d), nn.Linear(channels, d)
      self.ma_value = nn.Linear(channels, d)
      self.ma_out = nn.Linear(2 * d, channels)
    if spec.mode != 'none':
      self.gamma = nn.Parameter(torch.zeros(()))

  def forward(self, feat_BxCxHxW):
    if self.spec.mode == 'none':
      return feat_BxCxHxW
    b, c, h, w = feat_BxCxHxW.shape
    coarse_hw = -(-h // self.spec.pool), -(-w // self.spec.pool)
    flat_BxMxC = resize_bilinear(feat_BxCxHxW, coarse_hw).flatten(2).transpose(1, 2)
    out_BxMxC = torch.zeros_like(flat_BxMxC)
    parts = self.spec.mode.split('_')
    if 'sa' in parts:
      q, k = self.sa_query(flat_BxMxC), self.sa_key(flat_BxMxC)
      out_BxMxC = out_BxMxC + torch.softmax(q @ k.transpose(1, 2), -1) @ self.sa_value(flat_BxMxC)
    if 'ma' in parts:
      q, k = self.ma_query(flat_BxMxC), self.ma_key(flat_BxMxC)
      scale = float(coarse_hw[0] * coarse_hw[1]) ** -self.spec.mutual_scale_power
      out_BxMxC = out_BxMxC + self.ma_out(
          mutual_attention(q, k, self.ma_value(flat_BxMxC), scale))
    out_BxCxHxW = resize_bilinear(out_BxMxC.transpose(1, 2).reshape(b, c, *coarse_hw), (h, w))
    return feat_BxCxHxW + self.gamma * out_BxCxHxW


def mutual_attention(q_BxMxD, k_BxMxD, v_BxMxD, scale):
  """Twin of `attention.mutual_attention`: the B(B-1) pairs j != i as one batched matmul."""
  b = q_BxMxD.shape[0]
  others_BxR = torch.tensor([[j for j in range(b) if j != i] for i in range(b)])
  # a[i, r] = row-softmax(Q_j K_i^T), j = others[i, r]: reference j's pixels over anchor i's.
  a_BxRxMxM = torch.softmax(torch.einsum('irmd,ind->irmn', q_BxMxD[others_BxR], k_BxMxD), -1)
  w_BxMx1 = torch.sigmoid(scale * a_BxRxMxM.sum(2)).mean(1).unsqueeze(-1)
  fg_BxMxD = w_BxMx1 * v_BxMxD
  return torch.cat([fg_BxMxD, v_BxMxD - fg_BxMxD], -1)


def select_taps(out, taps):
  """Twin of `baseline.select_taps`: one tap as it is; several unit per pixel, resized to
  the finest grid and concatenated."""
  if len(taps) == 1:
    return out[taps[0]]
  h, w = max(out[t].shape[2] for t in taps), max(out[t].shape[3] for t in taps)
  return torch.cat([resize_bilinear(out[t] / out[t].norm(dim=1, keepdim=True).clamp_min(1e-12),
                                    (h, w)) for t in taps], 1)


class Generator(nn.Module):
  """Twin of `generator.Generator`: encoder -> attention -> 1x1 classifier -> resize -> softmax."""

  def __init__(self, spec: generator.GeneratorSpec, encoder_name):
    super().__init__()
    self.spec = spec
    self.taps = baseline.split_taps(spec.tap)
    channels = sum(backbones.tap_info(encoder_name)[t][1] for t in self.taps)
    self.encoder = make_backbone(encoder_name)
    self.attention = Attention(channels, spec.attention)
    self.classifier = nn.Conv2d(channels, spec.num_classes + 1, 1)

  def forward(self, x01_Bx3xHxW):
    feat = select_taps(self.encoder(preprocess(x01_Bx3xHxW, self.spec.preprocessing),
                                    taps=self.taps), self.taps)
    logits = self.classifier(self.attention(feat))
    return torch.softmax(resize_bilinear(logits, x01_Bx3xHxW.shape[-2:]), dim=1)


def generator_state_dict(encoder_name, params):
  """Flax generator params (or their gradients) -> torch `Generator` names."""
  state = {f'encoder.{k}': v for k, v in
           backbone_state_dict(encoder_name, {'params': params['encoder']}).items()}
  rest = {k: v for k, v in params.items() if k != 'encoder'}
  state.update(_module_state_dict(rest))
  return state


def generator_from_flax(spec, encoder_name, params, dtype=torch.float32):
  return load_state(Generator(spec, encoder_name).to(dtype),
                    generator_state_dict(encoder_name, params))


def backbone_from_flax(name, variables, dtype=torch.float32):
  """Frozen (eval, no grad) torch twin with the Flax variables' weights."""
  module = load_state(make_backbone(name).to(dtype), backbone_state_dict(name, variables))
  return module.eval().requires_grad_(False)


def normalize_features(feat_NxD, mode, scale):
  if mode == 'l2':
    feat_NxD = feat_NxD / torch.sqrt((feat_NxD ** 2).sum(-1, keepdim=True) + 1e-12)
  elif mode != 'none':
    raise ValueError(f'feature_norm {mode!r} not in (l2, none)')
  return scale * feat_NxD


def coattention_loss(feat_BxK1xD):
  """Eqs. 4-7 from explicit differences (the JAX version expands the squares)."""
  b, k1, _ = feat_BxK1xD.shape
  k = k1 - 1
  within_BxK1xK1 = ((feat_BxK1xD[:, :, None] - feat_BxK1xD[:, None]) ** 2).sum(-1)
  across_BxBxK1 = ((feat_BxK1xD[:, None] - feat_BxK1xD[None]) ** 2).sum(-1)
  neg_BxK1 = within_BxK1xK1.sum(-1)
  d_pos_BxBxK = across_BxBxK1[:, :, 1:]
  d_neg_BxBxK = (neg_BxK1[:, None, 1:] + neg_BxK1[None, :, 1:]) / (2 * k)
  pairs = ~torch.eye(b, dtype=torch.bool)
  return F.softplus(d_pos_BxBxK - d_neg_BxBxK)[pairs].mean()


def pool_features(feat_NxDxhxw, masks_NxHxW, mode):
  """Twin of `losses.pool_features` ('global' | 'masked')."""
  if mode == 'global':
    return feat_NxDxhxw.mean((2, 3))
  if mode != 'masked':
    raise ValueError(f'pooling {mode!r} not in (masked, global)')
  h, w = feat_NxDxhxw.shape[-2:]
  sh, sw = -(-masks_NxHxW.shape[1] // h), -(-masks_NxHxW.shape[2] // w)
  padded = F.pad(masks_NxHxW, (0, w * sw - masks_NxHxW.shape[2], 0, h * sh - masks_NxHxW.shape[1]))
  weights_Nxhxw = F.avg_pool2d(padded[:, None], (sh, sw))[:, 0]
  return ((feat_NxDxhxw * weights_Nxhxw[:, None]).sum((2, 3))
          / (weights_Nxhxw.sum((1, 2))[:, None] + 1e-6))


def multiclass_loss(gen, extractor, extractor_tap, extractor_preprocessing, x01_Bx3xHxW,
                    loss_cfg):
  """Twin of `multiclass.loss_fn`: the B*(K+1) masked images through f as one batch.

  Returns (loss, maps); `loss_cfg` is the config's `loss` section.
  """
  maps_BxK1xHxW = gen(x01_Bx3xHxW)
  b, k1, h, w = maps_BxK1xHxW.shape
  masks_BxK1xHxW = maps_BxK1xHxW
  if loss_cfg.normalize_maps:
    masks_BxK1xHxW = maps_BxK1xHxW / (maps_BxK1xHxW.amax((2, 3), keepdim=True) + 1e-6)
  masks_NxHxW = masks_BxK1xHxW.reshape(b * k1, h, w)
  masked = (x01_Bx3xHxW[:, None] * masks_BxK1xHxW[:, :, None]).reshape(b * k1, 3, h, w)
  feat = extractor(preprocess(masked, extractor_preprocessing), taps=(extractor_tap,))
  pooled_NxD = normalize_features(
      pool_features(feat[extractor_tap], masks_NxHxW, loss_cfg.pooling), loss_cfg.feature_norm,
      loss_cfg.feature_scale)
  return coattention_loss(pooled_NxD.reshape(b, k1, -1)), maps_BxK1xHxW


def make_adam(params, tc):
  """torch.optim.Adam with coupled weight decay: the twin of `train.make_optimizer(tc)`."""
  return torch.optim.Adam(params, lr=tc.learning_rate, betas=(tc.b1, tc.b2), eps=tc.eps,
                          weight_decay=tc.weight_decay)


# --- DeepCO3 (twins of coseg_jax.deepco3) ---


def l2_normalize(feat_BxCxHxW, eps):
  return feat_BxCxHxW / torch.sqrt((feat_BxCxHxW ** 2).sum(1, keepdim=True) + eps)


def correlation(feat_n_PxCxHxW, feat_m_PxCxHxW, sal_n_PxHxW, sal_m_PxHxW):
  """T of every pair p: S~n(p) S~m(q) <f^n(p), f^m(q)>, P x H x W x H x W."""
  t = torch.einsum('pcij,pcst->pijst', feat_n_PxCxHxW, feat_m_PxCxHxW)
  return sal_n_PxHxW[:, :, :, None, None] * sal_m_PxHxW[:, None, None] * t


def window_max(x, batch_dims=0):
  """Max over the 3x...x3 window of every element, -inf outside; one axis at a time
  (a box max is separable). The leading `batch_dims` axes are not windowed."""
  for axis in range(batch_dims, x.dim()):
    n = x.shape[axis]
    pad = [0, 0] * (x.dim() - 1 - axis) + [1, 1]
    padded = F.pad(x, pad, value=-math.inf)
    x = torch.maximum(torch.maximum(padded.narrow(axis, 0, n), padded.narrow(axis, 1, n)),
                      padded.narrow(axis, 2, n))
  return x


def median(x, batch_dims=0):
  """numpy's median over the trailing axes (the mean of the two middle values for an
  even count), one per index of the leading `batch_dims` axes."""
  flat = x.flatten(batch_dims) if batch_dims else x.flatten()
  n = flat.shape[-1]
  lower = flat.kthvalue((n + 1) // 2, dim=-1).values
  upper = flat.kthvalue(n // 2 + 1, dim=-1).values
  return (lower + upper) / 2


def local_maxima(x, batch_dims=0):
  """Twin of `deepco3.local_maxima`: equal to the window max and >= the median."""
  med = median(x, batch_dims).reshape(x.shape[:batch_dims] + (1,) * (x.dim() - batch_dims))
  return (x >= window_max(x, batch_dims)) & (x >= med)


def copeak_loss(t_PxHxWxHxW, mask_PxHxWxHxW):
  """Mean over pairs of softplus(-mean of T at the co-peaks)."""
  mask = mask_PxHxWxHxW.to(t_PxHxWxHxW.dtype)
  x_P = (t_PxHxWxHxW * mask).flatten(1).sum(1) / mask.flatten(1).sum(1)
  return F.softplus(-x_P).mean()


def affinity_loss(feat_PxC, sal_P, alpha):
  a_PxP = feat_PxC @ feat_PxC.T
  both_salient = sal_P[:, None] * sal_P[None, :]
  differ = (sal_P[:, None] - sal_P[None, :]) ** 2
  return (both_salient * (1.0 - a_PxP)).mean() + alpha * (differ * a_PxP).mean()


def saliency_loss(sal_BxHxW, prior_BxHxW):
  fg = (prior_BxHxW > prior_BxHxW.mean((1, 2), keepdim=True)).to(sal_BxHxW.dtype)
  fg_fraction = fg.mean((1, 2), keepdim=True)
  weight = fg * (1.0 - fg_fraction) + (1.0 - fg) * fg_fraction
  return (weight * (sal_BxHxW - fg) ** 2).mean((1, 2)).mean()


class DeepCO3(nn.Module):
  """Twin of `deepco3.DeepCO3` with a `deepco3.BackboneFeatures` feature function."""

  def __init__(self, backbone_name, tap, preprocessing, l2_eps=1e-2):
    super().__init__()
    self.tap, self.preprocessing, self.l2_eps = tap, preprocessing, l2_eps
    self.backbone = make_backbone(backbone_name)
    self.head = nn.Conv2d(backbones.tap_info(backbone_name)[tap][1], 1, 1)

  def forward(self, x01_Bx3xHxW):
    feat = self.backbone(preprocess(x01_Bx3xHxW, self.preprocessing), taps=(self.tap,))[self.tap]
    score_Bxhxw = self.head(feat)[:, 0]  # the head reads the raw features
    score_full = resize_bilinear(score_Bxhxw[:, None], x01_Bx3xHxW.shape[-2:])[:, 0]
    return {'feat': l2_normalize(feat, self.l2_eps), 'score': score_Bxhxw,
            'sal_small': torch.sigmoid(score_Bxhxw), 'sal_full': torch.sigmoid(score_full)}


def deepco3_state_dict(backbone_name, params):
  """DeepCO3 params {'backbone', 'head'} (or their gradients) -> torch `DeepCO3` names."""
  state = {f'backbone.{k}': v for k, v in
           backbone_state_dict(backbone_name, {'params': params['backbone']}).items()}
  state.update(_module_state_dict({'head': params['head']}))
  return state


def deepco3_from_flax(backbone_name, tap, preprocessing, params, l2_eps=1e-2,
                      dtype=torch.float32):
  return load_state(DeepCO3(backbone_name, tap, preprocessing, l2_eps).to(dtype),
                    deepco3_state_dict(backbone_name, params))


def deepco3_loss(model, x01_Bx3xHxW, prior_BxHxW, weights: deepco3.LossWeights):
  """Twin of `deepco3.deepco3_loss`: (loss, terms, co-peak masks)."""
  out = model(x01_Bx3xHxW)
  feat, sal = out['feat'], out['sal_small']
  half = feat.shape[0] // 2
  t_Pxhxwxhxw = correlation(feat[:half], feat[half:], sal[:half], sal[half:])
  masks = local_maxima(t_Pxhxwxhxw.detach(), batch_dims=1)
  copeak = copeak_loss(t_Pxhxwxhxw, masks)
  affinity = affinity_loss(feat.permute(0, 2, 3, 1).reshape(-1, feat.shape[1]), sal.reshape(-1),
                           weights.affinity_alpha)
  saliency = saliency_loss(out['sal_full'], prior_BxHxW)
  loss = weights.copeak * copeak + weights.affinity * affinity + weights.saliency * saliency
  return loss, {'copeak': copeak, 'affinity': affinity, 'saliency': saliency}, masks
