"""Loading, validation and resizing of groups (coseg_jax.data)."""
import os

import numpy as np
from PIL import Image
import pytest

from coseg_jax.core import data
from coseg_jax.core.errors import InputError


def _save(path, array_or_image, **kwargs):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  im = array_or_image if isinstance(array_or_image, Image.Image) else Image.fromarray(array_or_image)
  im.save(path, **kwargs)
  return path


def _rgb(h=12, w=16, colour=(200, 40, 90)):
  return np.full((h, w, 3), colour, np.uint8)


def _palette_image(indices, colours):
  im = Image.fromarray(np.asarray(indices, np.uint8))
  flat = np.zeros((256, 3), np.uint8)
  flat[:len(colours)] = colours
  im.putpalette(flat.tobytes())
  return im


def _group(tmp_path, n=2, masks=None, h=12, w=16):
  """A group folder of n RGB images, with the given uint8 masks if any."""
  root = tmp_path / 'g'
  for i in range(n):
    _save(str(root / 'images' / f'im{i}.png'), _rgb(h, w))
    if masks is not None:
      _save(str(root / 'masks' / f'im{i}.png'), masks[i])
  return str(root)


def test_every_image_mode_becomes_uint8_rgb(tmp_path):
  d = tmp_path / 'images'
  _save(str(d / 'grey.png'), np.full((10, 14), 77, np.uint8))
  rgba = np.zeros((10, 14, 4), np.uint8)
  rgba[:, :7] = (10, 200, 30, 255)
  _save(str(d / 'rgba.png'), rgba)  # Right half fully transparent.
  _save(str(d / 'cmyk.jpg'), Image.fromarray(_rgb(16, 16, (200, 50, 30))).convert('CMYK'), quality=95)
  _save(str(d / 'palette.png'), _palette_image(np.eye(10, 14), [(5, 6, 7), (250, 1, 2)]))
  _save(str(d / 'deep.png'), np.full((10, 14), 32896, np.uint16))
  _save(str(d / 'bilevel.png'), Image.fromarray(np.eye(10, 14, dtype=bool)))
  group = data.load_group(str(tmp_path))
  images = {s.stem: s.image for s in group.samples}
  assert sorted(images) == ['bilevel', 'cmyk', 'deep', 'grey', 'palette', 'rgba']
  for name, image in images.items():
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3, name
  np.testing.assert_array_equal(images['grey'], 77)
  np.testing.assert_array_equal(images['rgba'][:, :7], np.broadcast_to((10, 200, 30), (10, 7, 3)))
  np.testing.assert_array_equal(images['rgba'][:, 7:], 255)  # Transparent over white.
  assert np.abs(images['cmyk'].astype(int) - (200, 50, 30)).max() <= 6
  np.testing.assert_array_equal(images['palette'][0, 0], (250, 1, 2))
  np.testing.assert_array_equal(images['palette'][0, 1], (5, 6, 7))
  np.testing.assert_array_equal(images['deep'], 128)  # 16-bit scaled, not clipped.
  np.testing.assert_array_equal(images['bilevel'][0, 0], 255)


def test_exif_orientation_is_applied(tmp_path):
  stored = np.zeros((20, 40, 3), np.uint8)
  stored[:, :20] = (255, 0, 0)  # Left half red as stored.
  exif = Image.Exif()
  exif[0x0112] = 6  # Rotate 90 degrees clockwise to display.
  _save(str(tmp_path / 'images' / 'rot.jpg'), stored, exif=exif, quality=95)
  image = data.load_group(str(tmp_path)).samples[0].image
  assert image.shape == (40, 20, 3)
  assert image[5, 10, 0] > 200 and image[35, 10, 0] < 50  # Red is now on top.


def test_masks_grey_and_palette_and_instances(tmp_path):
  mask0 = np.zeros((12, 16), np.uint8)
  mask0[2:5, 3:9] = 2
  mask0[0, :] = 255
  mask1 = np.zeros((12, 16), np.uint8)
  mask1[6:, 8:] = 1
  root = _group(tmp_path, masks=[mask0, _palette_image(mask1, [(0, 0, 0), (0, 255, 0)])])
  inst = np.zeros((12, 16), np.uint8)
  inst[1:3, 1:3] = 255
  _save(os.path.join(root, 'instances', 'im0_10.png'), inst)
  inst2 = np.zeros((12, 16), np.uint8)
  inst2[5:9, 5:9] = 1
  _save(os.path.join(root, 'instances', 'im0_2.png'), inst2)
  group = data.load_group(root, num_classes=2, need='instances')
  assert group.name == 'g' and [s.stem for s in group.samples] == ['im0', 'im1']
  np.testing.assert_array_equal(group.samples[0].mask, mask0)
  np.testing.assert_array_equal(group.samples[1].mask, mask1)  # Indices, not colours.
  first, second = group.samples[0].instances
  assert first.dtype == bool
  np.testing.assert_array_equal(first, inst2 > 0)  # Ordered by id: 2 before 10.
  np.testing.assert_array_equal(second, inst > 0)
  assert group.samples[1].instances == []


def test_group_without_annotations_loads(tmp_path):
  group = data.load_group(_group(tmp_path, n=3), num_classes=2, min_images=3)
  assert len(group.samples) == 3
  assert all(s.mask is None and s.instances is None for s in group.samples)


def test_hidden_files_are_ignored(tmp_path):
  root = _group(tmp_path, n=1)
  (tmp_path / 'g' / 'images' / '.DS_Store').write_bytes(b'\0\1junk')
  assert [s.stem for s in data.load_group(root).samples] == ['im0']


def test_find_groups_folder_of_groups_and_names(tmp_path):
  for name in ('b', 'a'):
    _save(str(tmp_path / name / 'images' / 'x.png'), _rgb())
  assert data.find_groups(str(tmp_path)) == [str(tmp_path / 'a'), str(tmp_path / 'b')]
  assert data.find_groups(str(tmp_path), names=('b',)) == [str(tmp_path / 'b')]
  assert data.find_groups(str(tmp_path / 'a')) == [str(tmp_path / 'a')]
  with pytest.raises(InputError, match="no group named 'c'"):
    data.find_groups(str(tmp_path), names=('c',))


def _voc(tmp_path):
  root = tmp_path / 'VOC2012'
  dog, person, cat = 12, 15, 8
  classes, objects = [], []
  c0 = np.zeros((12, 16), np.uint8)
  c0[1:5, 1:5] = dog
  c0[6:10, 1:5] = dog
  c0[1:5, 8:14] = person
  c0[0, :] = 255
  o0 = np.zeros((12, 16), np.uint8)
  o0[1:5, 1:5], o0[6:10, 1:5], o0[1:5, 8:14], o0[0, :] = 1, 2, 3, 255
  c1 = np.zeros((12, 16), np.uint8)
  c1[2:6, 2:6] = dog
  o1 = (c1 > 0).astype(np.uint8)
  c2 = np.zeros((12, 16), np.uint8)
  c2[3:7, 3:7] = cat
  classes, objects = [c0, c1, c2], [o0, o1, (c2 > 0).astype(np.uint8)]
  voc_colours = [(0, 0, 0)] + [(i * 10, 255 - i * 10, i) for i in range(1, 21)]
  for i, (c, o) in enumerate(zip(classes, objects)):
    _save(str(root / 'JPEGImages' / f'2007_00000{i}.jpg'), _rgb())
    _save(str(root / 'SegmentationClass' / f'2007_00000{i}.png'), _palette_image(c, voc_colours))
    _save(str(root / 'SegmentationObject' / f'2007_00000{i}.png'), _palette_image(o, voc_colours))
  lists = root / 'ImageSets' / 'Segmentation'
  lists.mkdir(parents=True)
  (lists / 'dog_person.txt').write_text('2007_000000\n2007_000001\n')
  (lists / 'main_style.txt').write_text('2007_000000  1\n2007_000002 -1\n2007_000001  0\n')
  return str(root), c0


def test_voc_groups_remap_classes_and_split_instances(tmp_path):
  root, c0 = _voc(tmp_path)
  groups = data.find_groups(root)
  assert [data.group_name(g) for g in groups] == ['dog_person', 'main_style']
  group = data.load_group(groups[0], num_classes=2, need='instances', min_images=2)
  assert group.name == 'dog_person' and group.class_names == ('dog', 'person')
  mask = group.samples[0].mask
  np.testing.assert_array_equal(mask[c0 == 12], 1)
  np.testing.assert_array_equal(mask[c0 == 15], 2)
  np.testing.assert_array_equal(mask[c0 == 255], 255)
  np.testing.assert_array_equal(mask[c0 == 0], 0)
  # Dogs are in both images, the person in one: only the two dogs are instances.
  instances = group.samples[0].instances
  assert len(instances) == 2
  np.testing.assert_array_equal(instances[0], (c0 == 12) & (np.arange(12) < 5)[:, None])
  assert [s.stem for s in data.load_group(groups[1]).samples] == ['2007_000000', '2007_000001']


def test_voc_root_without_lists_is_one_group(tmp_path):
  root, _ = _voc(tmp_path)
  for name in os.listdir(os.path.join(root, 'ImageSets', 'Segmentation')):
    os.unlink(os.path.join(root, 'ImageSets', 'Segmentation', name))
  assert data.find_groups(root) == [root]
  group = data.load_group(root)
  assert len(group.samples) == 3 and group.class_names == ('cat', 'dog', 'person')


def _zero_byte(root):
  open(os.path.join(root, 'images', 'im1.png'), 'wb').close()
  return 'im1.png', {}


def _corrupt(root):
  with open(os.path.join(root, 'images', 'im1.png'), 'wb') as f:
    f.write(b'not a png at all' * 10)
  return 'im1.png', {}


def _truncated(root):
  path = os.path.join(root, 'images', 'cut.jpg')
  _save(path, np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
  raw = open(path, 'rb').read()
  with open(path, 'wb') as f:
    f.write(raw[:len(raw) // 2])
  return 'cut.jpg', {}


def _not_an_image(root):
  with open(os.path.join(root, 'images', 'notes.txt'), 'w') as f:
    f.write('hello')
  return 'notes.txt', {}


def _wrong_size_mask(root):
  _save(os.path.join(root, 'masks', 'im0.png'), np.zeros((12, 16), np.uint8))
  _save(os.path.join(root, 'masks', 'im1.png'), np.zeros((11, 16), np.uint8))
  return os.path.join('masks', 'im1.png'), {}


def _unknown_label(root):
  _save(os.path.join(root, 'masks', 'im0.png'), np.full((12, 16), 3, np.uint8))
  _save(os.path.join(root, 'masks', 'im1.png'), np.zeros((12, 16), np.uint8))
  return os.path.join('masks', 'im0.png'), {'num_classes': 2}


def _rgb_mask(root):
  _save(os.path.join(root, 'masks', 'im0.png'), _rgb())
  return os.path.join('masks', 'im0.png'), {}


def _missing_mask(root):
  _save(os.path.join(root, 'masks', 'im0.png'), np.zeros((12, 16), np.uint8))
  return os.path.join('masks', 'im1.png'), {}


def _too_few(root):
  return root, {'min_images': 3}


def _empty_images(root):
  for name in os.listdir(os.path.join(root, 'images')):
    os.unlink(os.path.join(root, 'images', name))
  return os.path.join(root, 'images'), {}


def _no_images_folder(root):
  os.rename(os.path.join(root, 'images'), os.path.join(root, 'pictures'))
  return root, {}


def _orphan_instance(root):
  _save(os.path.join(root, 'instances', 'other_1.png'), np.ones((12, 16), np.uint8))
  return 'other_1.png', {}


def _empty_instance(root):
  _save(os.path.join(root, 'instances', 'im0_1.png'), np.zeros((12, 16), np.uint8))
  return 'im0_1.png', {}


def _missing_instances(root):
  return root, {'need': 'instances'}


def test_zero_classes_is_a_value_error(tmp_path):
  # A caller's mistake, not the user's: the pipelines' check_config names the config field.
  with pytest.raises(ValueError, match='num_classes'):
    data.load_group(_group(tmp_path), num_classes=0)


@pytest.mark.parametrize('breaker', [
    _zero_byte, _corrupt, _truncated, _not_an_image, _wrong_size_mask, _unknown_label, _rgb_mask,
    _missing_mask, _too_few, _empty_images, _no_images_folder, _orphan_instance,
    _empty_instance, _missing_instances])
def test_bad_input_is_one_line_naming_the_file(tmp_path, breaker):
  root = _group(tmp_path)
  name, kwargs = breaker(root)
  with pytest.raises(InputError) as err:
    data.load_group(root, **kwargs)
  message = str(err.value)
  assert name in message and '\n' not in message, message


def test_voc_too_many_classes_names_the_list(tmp_path):
  root, _ = _voc(tmp_path)
  listed = os.path.join(root, 'ImageSets', 'Segmentation', 'dog_person.txt')
  with pytest.raises(InputError, match='dog_person.txt: 2 classes present'):
    data.load_group(listed, num_classes=1)


def test_voc_missing_listed_image(tmp_path):
  root, _ = _voc(tmp_path)
  with open(os.path.join(root, 'ImageSets', 'Segmentation', 'dog_person.txt'), 'a') as f:
    f.write('2008_999999\n')
  with pytest.raises(InputError, match='2008_999999.jpg: missing'):
    data.load_group(data.find_groups(root)[0])


@pytest.mark.parametrize('make', ['empty', 'loose_images', 'missing'])
def test_find_groups_bad_roots(tmp_path, make):
  root = tmp_path / 'root'
  if make != 'missing':
    root.mkdir()
  if make == 'loose_images':
    _save(str(root / 'a.jpg'), _rgb())
  with pytest.raises(InputError) as err:
    data.find_groups(str(root))
  assert str(err.value).startswith(str(root)) and '\n' not in str(err.value)


def test_resize_batch():
  images = [_rgb(10, 30, (255, 0, 51)), _rgb(40, 20, (0, 255, 0))]
  batch = data.resize_batch(images, 8)
  assert batch.shape == (2, 8, 8, 3) and batch.dtype == np.float32
  np.testing.assert_allclose(batch[0], np.broadcast_to([1.0, 0.0, 0.2], (8, 8, 3)), atol=1e-6)
  np.testing.assert_allclose(batch[1, ..., 1], 1.0)


def test_resize_labels_is_nearest_and_keeps_dtype():
  labels = np.zeros((4, 4), np.uint8)
  labels[:2, 2:] = 2
  labels[3, 0] = 255
  out = data.resize_labels(labels, (8, 12))
  assert out.shape == (8, 12) and out.dtype == np.uint8
  np.testing.assert_array_equal(out, np.repeat(np.repeat(labels, 2, 0), 3, 1))
  mask = data.resize_labels(labels == 2, (2, 2))
  assert mask.dtype == bool and mask.tolist() == [[False, True], [False, False]]


def test_resize_probs_is_bilinear():
  probs = np.zeros((2, 2, 3), np.float32)
  probs[..., 0] = 0.25
  probs[:, 1, 1] = 1.0
  out = data.resize_probs(probs, (6, 8))
  assert out.shape == (6, 8, 3)
  np.testing.assert_allclose(out[..., 0], 0.25, atol=1e-6)
  row = out[0, :, 1]
  assert row[0] == 0 and row[-1] == 1 and np.all(np.diff(row) >= 0) and 0 < row[3] < 1
