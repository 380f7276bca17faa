"""Published ImageNet weights -> Flax variable trees of `backbones`, by explicit name maps.

Each map is a list of `Rule`s: source tensor names -> a Flax module path + a transform.
Sources: Keras notop HDF5 (VGG16; ResNet-50 in the tf.keras and the keras-applications
v0.2 naming), torchvision state_dicts (VGG16, ResNet-50) and the EfficientNet-Lite0
state_dict of lukemelas' EfficientNet-PyTorch (its BatchNorms folded into the convs).
Names the map needs but the file lacks, and names the file has but the map does not
know, fail loudly with both lists.
"""
import collections
import dataclasses
import functools
from typing import Callable

import h5py
import numpy as np

from coseg_jax.backbones import modules as backbones
from coseg_jax.backbones import torch_pickle
from coseg_jax.core.errors import InputError

_HDF5_MAGIC = b'\x89HDF\r\n\x1a\n'
_MAX_LISTED = 40

# BatchNorm epsilon of the code each source was trained / published with.
_LITE0_BN_EPS = 1e-3  # efficientnet_lite_builder / EfficientNet-PyTorch global params
_KERAS_RESNET_EPS = {'tf.keras': 1.001e-5, 'keras-applications': 1e-3}
_TORCH_BN_EPS = 1e-5


@dataclasses.dataclass(frozen=True)
class Rule:
  """`sources` (tensor names in the file) -> leaves of Flax module `target` via `fn`.

  `fn(*arrays)` returns {(collection, leaf): array}, e.g. {('params', 'kernel'): ...}.
  """
  sources: tuple[str, ...]
  target: tuple[str, ...]
  fn: Callable[..., dict[tuple[str, str], np.ndarray]]


@dataclasses.dataclass(frozen=True)
class Converted:
  """A converted file: Flax variables plus how to build and feed the matching module."""
  name: str
  variables: dict
  module_fields: dict
  preprocessing: str  # 'caffe' (Keras) or 'imagenet' (torchvision, EfficientNet)
  format: str


def _torch_kernel(w_OxIxKxK):
  # torch [out, in/groups, kh, kw] -> Flax [kh, kw, in/groups, out]; depthwise [C, 1, k, k]
  # becomes [k, k, 1, C], which Flax reads with feature_group_count=C.
  if w_OxIxKxK.ndim != 4:
    raise ValueError(f'conv weight must be 4-D, got shape {w_OxIxKxK.shape}')
  return np.ascontiguousarray(w_OxIxKxK.transpose(2, 3, 1, 0))


def _torch_conv(w, b=None):
  bias = np.zeros(w.shape[0], np.float32) if b is None else b
  return {('params', 'kernel'): _torch_kernel(w), ('params', 'bias'): bias}


def _keras_conv(kernel, bias=None):
  if kernel.ndim != 4:
    raise ValueError(f'conv kernel must be 4-D, got shape {kernel.shape}')
  bias = np.zeros(kernel.shape[-1], np.float32) if bias is None else bias
  return {('params', 'kernel'): kernel, ('params', 'bias'): bias}


def _batch_norm(scale, bias, mean, var):
  return {('params', 'scale'): scale, ('params', 'bias'): bias,
          ('batch_stats', 'mean'): mean, ('batch_stats', 'var'): var}


def _torch_conv_bn_folded(w, scale, bias, mean, var, *, eps):
  # Inference BN after a bias-free conv is an affine map per output channel.
  mult = scale / np.sqrt(var + eps)
  return {('params', 'kernel'): _torch_kernel(w * mult[:, None, None, None]),
          ('params', 'bias'): (bias - mean * mult).astype(np.float32)}


def _bn_names(prefix, torch_style):
  roles = (('weight', 'bias', 'running_mean', 'running_var') if torch_style else
           ('gamma', 'beta', 'moving_mean', 'moving_variance'))
  sep = '.' if torch_style else '/'
  return tuple(f'{prefix}{sep}{r}' for r in roles)


def vgg16_keras_rules() -> list[Rule]:
  return [Rule((f'block{s}_conv{c}/kernel', f'block{s}_conv{c}/bias'), (f'conv{s}_{c}',),
               _keras_conv) for s, c in _vgg16_convs()]


def vgg16_torch_rules() -> list[Rule]:
  # torchvision's `features` Sequential: conv, ReLU pairs with a MaxPool after each stage.
  rules, index = [], 0
  for s, c in _vgg16_convs():
    rules.append(Rule((f'features.{index}.weight', f'features.{index}.bias'), (f'conv{s}_{c}',),
                      _torch_conv))
    index += 2 + (c == _vgg16_stage_len(s))
  return rules


def _vgg16_convs():
  return [(s, c) for s in range(1, 6) for c in range(1, _vgg16_stage_len(s) + 1)]


def _vgg16_stage_len(s):
  return 2 if s <= 2 else 3


def _resnet50_blocks():
  """(layer 1..4, block index) of every bottleneck."""
  return [(i, j) for i, blocks in enumerate((3, 4, 6, 3), 1) for j in range(blocks)]


def resnet50_torch_rules() -> list[Rule]:
  rules = [Rule(('conv1.weight',), ('conv1',), _torch_conv),
           Rule(_bn_names('bn1', True), ('bn1',), _batch_norm)]
  for i, j in _resnet50_blocks():
    src, dst = f'layer{i}.{j}', f'layer{i}_{j}'
    for k in (1, 2, 3):
      rules.append(Rule((f'{src}.conv{k}.weight',), (dst, f'conv{k}'), _torch_conv))
      rules.append(Rule(_bn_names(f'{src}.bn{k}', True), (dst, f'bn{k}'), _batch_norm))
    if j == 0:
      rules.append(Rule((f'{src}.downsample.0.weight',), (dst, 'downsample_conv'), _torch_conv))
      rules.append(Rule(_bn_names(f'{src}.downsample.1', True), (dst, 'downsample_bn'),
                        _batch_norm))
  return rules


def resnet50_keras_rules(naming: str) -> list[Rule]:
  """`naming`: 'tf.keras' (conv2_block1_1_conv) or 'keras-applications' (res2a_branch2a)."""
  if naming == 'tf.keras':
    stem_conv, stem_bn = 'conv1_conv', 'conv1_bn'
    layer = lambda i, j, part, kind: f'conv{i + 1}_block{j + 1}_{part}_{kind}'
  else:
    stem_conv, stem_bn = 'conv1', 'bn_conv1'
    branch = lambda part: 'branch1' if part == 0 else 'branch2' + 'abc'[part - 1]
    layer = lambda i, j, part, kind: (
        f"{'res' if kind == 'conv' else 'bn'}{i + 1}{'abcdef'[j]}_{branch(part)}")
  conv = lambda name, dst: Rule((f'{name}/kernel', f'{name}/bias'), dst, _keras_conv)
  bn = lambda name, dst: Rule(_bn_names(name, False), dst, _batch_norm)
  rules = [conv(stem_conv, ('conv1',)), bn(stem_bn, ('bn1',))]
  for i, j in _resnet50_blocks():
    dst = f'layer{i}_{j}'
    for k in (1, 2, 3):
      rules.append(conv(layer(i, j, k, 'conv'), (dst, f'conv{k}')))
      rules.append(bn(layer(i, j, k, 'bn'), (dst, f'bn{k}')))
    if j == 0:
      rules.append(conv(layer(i, j, 0, 'conv'), (dst, 'downsample_conv')))
      rules.append(bn(layer(i, j, 0, 'bn'), (dst, 'downsample_bn')))
  return rules


def efficientnet_lite0_rules() -> list[Rule]:
  fold = functools.partial(_torch_conv_bn_folded, eps=_LITE0_BN_EPS)
  conv_bn = lambda conv, bn, dst: Rule((f'{conv}.weight',) + _bn_names(bn, True), dst, fold)
  rules = [conv_bn('_conv_stem', '_bn0', ('stem',))]
  for i, (expand, *_) in enumerate(backbones.LITE0_BLOCKS):
    src, dst = f'_blocks.{i}', f'blocks_{i}'
    if expand != 1:
      rules.append(conv_bn(f'{src}._expand_conv', f'{src}._bn0', (dst, 'expand_conv')))
    rules.append(conv_bn(f'{src}._depthwise_conv', f'{src}._bn1', (dst, 'depthwise_conv')))
    rules.append(conv_bn(f'{src}._project_conv', f'{src}._bn2', (dst, 'project_conv')))
  rules.append(conv_bn('_conv_head', '_bn1', ('head',)))
  return rules


def describe_names(**labelled) -> str:
  """'missing [a, b]; unexpected [c]' for the non-empty lists (underscores -> spaces)."""
  parts = []
  for label, names in labelled.items():
    if names:
      names = sorted(names)
      more = f' ... ({len(names)} in all)' if len(names) > _MAX_LISTED else ''
      parts.append(f"{label.replace('_', ' ')} [{', '.join(names[:_MAX_LISTED])}{more}]")
  return '; '.join(parts)


def apply_rules(arrays, rules, *, ignore=lambda name: False, path, what) -> dict:
  """Builds {'params': ..., 'batch_stats': ...} from `arrays` by `rules`.

  Every name in `arrays` must be used by a rule or ignored, and every rule's sources must
  exist; otherwise InputError lists the missing and unexpected names.
  """
  needed = [s for rule in rules for s in rule.sources]
  missing = [s for s in needed if s not in arrays]
  unexpected = set(arrays) - set(needed)
  unexpected = [n for n in unexpected if not ignore(n)]
  if missing or unexpected:
    raise InputError(f'{path}: not {what} weights: '
                     + describe_names(missing=missing, unexpected=unexpected))
  variables = {}
  for rule in rules:
    try:
      leaves = rule.fn(*(np.asarray(arrays[s], np.float32) for s in rule.sources))
    except ValueError as e:
      raise InputError(f'{path}: {", ".join(rule.sources)}: {e}') from e
    for (collection, leaf), value in leaves.items():
      node = variables.setdefault(collection, {})
      for part in rule.target:
        node = node.setdefault(part, {})
      node[leaf] = np.asarray(value, np.float32)
  return variables


def read_keras_h5(path) -> 'collections.OrderedDict[str, np.ndarray]':
  """Keras HDF5 weights as 'layer/role' -> array (role: kernel, bias, gamma, beta, ...).

  Handles weights stored directly in the layer group and in a nested group (the weight
  names are paths relative to the layer group), whole-model files ('model_weights'), and
  Keras 1 weight names ('block1_conv1_W_1:0') by the order Keras saves weights in.
  """
  out = collections.OrderedDict()
  try:
    with h5py.File(path, 'r') as f:
      root = f['model_weights'] if 'model_weights' in f else f
      if 'layer_names' not in root.attrs:
        raise InputError(f'{path}: not a Keras HDF5 weights file (no layer_names attribute)')
      for layer in map(_decode, root.attrs['layer_names']):
        group = root[layer]
        weight_names = [_decode(n) for n in group.attrs.get('weight_names', [])]
        for role, wname in zip(_roles(weight_names), weight_names):
          out[f'{layer}/{role}'] = np.asarray(group[wname], np.float32)
  except (OSError, KeyError, ValueError) as e:
    raise InputError(f'{path}: unreadable Keras HDF5 weights ({e})') from e
  return out


_KERAS_ROLES = ('kernel', 'bias', 'gamma', 'beta', 'moving_mean', 'moving_variance')
_KERAS_ROLES_BY_COUNT = {1: ('kernel',), 2: ('kernel', 'bias'),
                         4: ('gamma', 'beta', 'moving_mean', 'moving_variance')}


def _roles(weight_names):
  roles = [n.rsplit('/', 1)[-1].split(':')[0] for n in weight_names]
  if all(r in _KERAS_ROLES for r in roles):
    return roles
  if len(weight_names) not in _KERAS_ROLES_BY_COUNT:
    raise ValueError(f'unrecognised weights {weight_names}')
  return _KERAS_ROLES_BY_COUNT[len(weight_names)]


def _decode(name):
  return name.decode('utf8') if isinstance(name, bytes) else str(name)


def _is_hdf5(path):
  with open(path, 'rb') as f:
    return f.read(8) == _HDF5_MAGIC


def _top_layers(*prefixes):
  return lambda name: name.split('/')[0] in prefixes


def _torch_ignored(*prefixes):
  return lambda name: name.endswith('num_batches_tracked') or name.startswith(prefixes)


def convert_file(name: str, path: str) -> Converted:
  """Reads weight file `path` for backbone `name` (format detected from its content)."""
  try:
    keras = _is_hdf5(path)
  except OSError as e:
    raise InputError(f'{path}: cannot read ({e.strerror or e})') from e
  if name == 'efficientnet_lite0':
    if keras:
      raise InputError(f'{path}: EfficientNet-Lite0 weights must be the PyTorch state_dict')
    arrays = torch_pickle.load_state_dict(path)
    variables = apply_rules(arrays, efficientnet_lite0_rules(), ignore=_torch_ignored('_fc.'),
                            path=path, what='EfficientNet-Lite0 (EfficientNet-PyTorch)')
    return Converted(name, variables, {}, 'imagenet', 'EfficientNet-PyTorch state_dict')
  if name == 'vgg16':
    if keras:
      variables = apply_rules(read_keras_h5(path), vgg16_keras_rules(), path=path,
                              ignore=_top_layers('fc1', 'fc2', 'predictions'),
                              what='Keras VGG16')
      return Converted(name, variables, {}, 'caffe', 'Keras HDF5')
    variables = apply_rules(torch_pickle.load_state_dict(path), vgg16_torch_rules(), path=path,
                            ignore=_torch_ignored('classifier.'), what='torchvision VGG16')
    return Converted(name, variables, {}, 'imagenet', 'torchvision state_dict')
  if name == 'resnet50':
    if keras:
      arrays = read_keras_h5(path)
      naming = 'tf.keras' if 'conv1_conv/kernel' in arrays else 'keras-applications'
      variables = apply_rules(arrays, resnet50_keras_rules(naming), path=path,
                              ignore=_top_layers('fc1000', 'predictions'),
                              what=f'Keras ResNet-50 ({naming} naming)')
      fields = {'stride_in_1x1': True, 'bn_eps': _KERAS_RESNET_EPS[naming]}
      return Converted(name, variables, fields, 'caffe', f'Keras HDF5, {naming} naming')
    variables = apply_rules(torch_pickle.load_state_dict(path), resnet50_torch_rules(),
                            path=path, ignore=_torch_ignored('fc.'),
                            what='torchvision ResNet-50')
    fields = {'stride_in_1x1': False, 'bn_eps': _TORCH_BN_EPS}
    return Converted(name, variables, fields, 'imagenet', 'torchvision state_dict')
  raise ValueError(f'unknown backbone {name!r}; expected one of {backbones.NAMES}')


def efficientnet_lite0_classifier(path) -> tuple[np.ndarray, np.ndarray]:
  """The ImageNet classifier `_fc` of the EfficientNet-Lite0 file: (W_1280x1000, b_1000)."""
  arrays = torch_pickle.load_state_dict(path)
  if '_fc.weight' not in arrays or '_fc.bias' not in arrays:
    raise InputError(f'{path}: no classifier (_fc.weight, _fc.bias) in the state_dict')
  return arrays['_fc.weight'].T.copy(), arrays['_fc.bias']
