"""Built-in demo groups (coseg_jax.demo)."""
import os

import numpy as np
import pytest

from coseg_jax.core import data
from coseg_jax.core import demo
from coseg_jax.core.errors import InputError

# Height / width of the ellipses cut from chelsea (cat), coffee (cup), astronaut (person).
_ASPECTS = {1: 280 / 400, 2: 320 / 410, 3: 190 / 144}


def _files(folder):
  out = {}
  for dirpath, _, names in os.walk(folder):
    for name in names:
      path = os.path.join(dirpath, name)
      with open(path, 'rb') as f:
        out[os.path.relpath(path, folder)] = f.read()
  return out


def _check_ellipse(region, aspect):
  """region is one filled ellipse whose bounding box has the given height/width."""
  ys, xs = np.nonzero(region)
  h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
  assert abs(h / w - aspect) < 0.06, (h, w, aspect)
  assert abs(region.sum() / (h * w) - np.pi / 4) < 0.04


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
  a = demo.make_multiclass_demo(str(tmp_path / 'a'), 2, num_images=3, size=96, seed=5)
  b = demo.make_multiclass_demo(str(tmp_path / 'b'), 2, num_images=3, size=96, seed=5)
  c = demo.make_multiclass_demo(str(tmp_path / 'c'), 2, num_images=3, size=96, seed=6)
  files_a = _files(a)
  assert files_a == _files(b)
  assert sorted(files_a) == sorted(_files(c))
  assert files_a['images/img00.png'] != _files(c)['images/img00.png']


@pytest.mark.parametrize('num_classes', [1, 2, 3])
def test_multiclass_demo_has_every_class_with_exact_shapes(tmp_path, num_classes):
  path = demo.make_multiclass_demo(str(tmp_path), num_classes, num_images=4, size=128)
  group = data.load_group(path, num_classes=num_classes, need='masks', min_images=4)
  assert len(group.samples) == 4
  backgrounds = set()
  for s in group.samples:
    assert s.image.shape == (128, 128, 3)
    assert set(np.unique(s.mask)) == set(range(num_classes + 1))
    for k in range(1, num_classes + 1):
      _check_ellipse(s.mask == k, _ASPECTS[k])
    backgrounds.add(tuple(np.round(s.image[s.mask == 0].mean(0))))
  assert len(backgrounds) == 4  # A different background in every image.
  assert demo.multiclass_names(num_classes) == ('cat', 'cup', 'person')[:num_classes]


def test_masks_cover_exactly_the_pasted_pixels(tmp_path, monkeypatch):
  # White objects on black textures: a pixel is bright iff an object was pasted there.
  def solid_source(name):
    if name in ('chelsea', 'coffee', 'astronaut'):
      return np.full((512, 640, 3), 255, np.uint8)
    return np.zeros((300, 300, 3) if name == 'hubble_deep_field' else (300, 300), np.uint8)
  monkeypatch.setattr(demo, '_source', solid_source)
  for _, image, labels in demo.render_multiclass(3, num_images=6, size=128, seed=2):
    np.testing.assert_array_equal(image.min(-1) > 150, labels > 0)
    assert image[labels == 0].max() < 100
  for n, (_, image, labels) in enumerate(demo.render_instances(num_images=3, size=128)):
    bright = image.min(-1) > 150
    assert bright[labels > 0].all()
    # Every other image holds a distractor: pasted (bright) but not an instance.
    assert bright[labels == 0].any() == (n % 2 == 0)


def test_instance_demo(tmp_path):
  path = demo.make_instance_demo(str(tmp_path), num_images=6, size=128, seed=0)
  group = data.load_group(path, need='instances', min_images=6)
  counts = [len(s.instances) for s in group.samples]
  assert set(counts) == {1, 2, 3}
  for s in group.samples:
    assert not os.path.isdir(os.path.join(path, 'masks'))
    stacked = np.stack(s.instances)
    assert stacked.sum(0).max() == 1  # Instances never overlap.
    for inst in s.instances:
      _check_ellipse(inst, _ASPECTS[1])


def test_existing_demo_is_reused_and_repaired(tmp_path):
  path = demo.make_multiclass_demo(str(tmp_path), 2, num_images=3, size=64)
  image = os.path.join(path, 'images', 'img01.png')
  before = _files(path)
  mtime = os.stat(image).st_mtime_ns
  assert demo.make_multiclass_demo(str(tmp_path), 2, num_images=3, size=64) == path
  assert os.stat(image).st_mtime_ns == mtime
  with open(image, 'wb') as f:
    f.write(b'broken')
  demo.make_multiclass_demo(str(tmp_path), 2, num_images=3, size=64)
  assert _files(path) == before
  demo.make_multiclass_demo(str(tmp_path), 2, num_images=2, size=64)
  assert sorted(os.listdir(os.path.join(path, 'images'))) == ['img00.png', 'img01.png']
  assert len(data.load_group(path, num_classes=2, need='masks').samples) == 2


@pytest.mark.parametrize('num_classes', [0, 4])
def test_unsupported_class_count(tmp_path, num_classes):
  with pytest.raises(InputError, match='config.num_classes'):
    demo.make_multiclass_demo(str(tmp_path), num_classes)


def test_demo_group_names_its_classes(tmp_path):
  from coseg_jax.core import data
  group = data.load_group(demo.make_multiclass_demo(str(tmp_path), 2), num_classes=2)
  assert group.class_names == demo.multiclass_names(2) == ('cat', 'cup')
