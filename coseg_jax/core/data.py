"""Group, dataset and PASCAL VOC loading with input validation; resizing.

Layouts understood by `find_groups` and `load_group`:

* Group folder: `images/` (jpg, png, bmp, tif, webp; any size; grey, RGB, RGBA,
  CMYK, palette or 16-bit; EXIF orientation applied), optional `masks/<stem>.png`
  (single channel: 0 background, 1..K classes, 255 ignore; palette PNGs are read as
  indices) and optional `instances/<stem>_<id>.png` (one binary mask per instance;
  any non-zero pixel is foreground). With `masks/`, every image needs its mask.
  An optional `classes.txt` names classes 1..K, one per line, or as `<id> <name>` lines
  (ids 0 and 255 ignored); with config.num_classes unset it also gives K.
* Folder of groups: every non-hidden subfolder is a group folder.
* PASCAL VOC root (`JPEGImages/`, optional `SegmentationClass/` and
  `SegmentationObject/`): each list file `ImageSets/Segmentation/<name>.txt` is one
  group called <name> (first token of a line is the image id; lines whose second
  token is -1 are skipped, so ImageSets/Main class lists can be copied there).
  Without list files the whole root is one group. The VOC class ids present in a
  group are renumbered 1..K in increasing VOC id order (dog(12) + person(15) ->
  dog 1, person 2); their names are kept in `Group.class_names`. Instances come from
  `SegmentationObject`; when class masks exist, only instances of the group's most
  common class (present in most images; ties -> lower id) are kept, since instance
  co-segmentation assumes one category per group.

In `images/`, hidden files (.DS_Store, ...) and Thumbs.db / desktop.ini are ignored;
any other entry that is not an image file is an error. Transparent pixels are
composited over white; 16-bit images are scaled to 8 bits.
"""
import dataclasses
import os
import re

import h5py
import numpy as np
from PIL import Image
from PIL import ImageOps
import scipy.io

from coseg_jax.core.errors import InputError

IGNORE_LABEL = 255
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff', '.webp')
_SYSTEM_FILES = ('Thumbs.db', 'desktop.ini')
VOC_CLASSES = (
    'background', 'aeroplane', 'bicycle', 'bird', 'boat', 'bottle', 'bus', 'car', 'cat',
    'chair', 'cow', 'diningtable', 'dog', 'horse', 'motorbike', 'person', 'pottedplant',
    'sheep', 'sofa', 'train', 'tvmonitor')
_NEEDS = ('none', 'masks', 'instances')


@dataclasses.dataclass
class Sample:
  stem: str
  image_path: str
  image: np.ndarray  # uint8 HxWx3 RGB, original size.
  mask: np.ndarray | None = None  # uint8 HxW: 0 background, 1..K, 255 ignore.
  instances: list[np.ndarray] | None = None  # bool HxW, one per instance.


@dataclasses.dataclass
class Group:
  name: str
  path: str
  samples: list[Sample]
  # Names of classes 1..K where the layout knows them (VOC); empty otherwise.
  class_names: tuple[str, ...] = ()


def find_groups(root, names=()) -> list[str]:
  """Group paths under `root`: folders, or VOC list files (see module docstring)."""
  if not os.path.isdir(root):
    raise InputError(f'{root}: no such folder')
  if os.path.isdir(os.path.join(root, 'images')):
    groups = [root]
  elif os.path.isdir(os.path.join(root, 'JPEGImages')):
    lists = _voc_list_files(root)
    groups = lists if lists else [root]
  else:
    entries = _visible(root)
    groups = [os.path.join(root, n) for n in entries if os.path.isdir(os.path.join(root, n))]
    if not groups:
      if any(_is_image_name(n) for n in entries):
        raise InputError(f'{root}: no images/ folder (put the images in {os.path.join(root, "images")})')
      raise InputError(f'{root}: no groups (expected images/, group subfolders or a PASCAL VOC root)')
  if names:
    by_name = {group_name(g): g for g in groups}
    missing = [n for n in names if n not in by_name]
    if missing:
      raise InputError(f'{root}: no group named {missing[0]!r} (found: {", ".join(sorted(by_name))})')
    groups = [by_name[n] for n in names]
  return groups


def group_name(path) -> str:
  """A group folder's name, or a VOC list file's stem."""
  base = os.path.basename(os.path.normpath(path))
  return os.path.splitext(base)[0] if os.path.isfile(path) else base


def load_group(path, *, num_classes=None, need='none', min_images=1) -> Group:
  """Reads and validates one group; every problem raises a one-line InputError.

  Args:
    path: a group folder, a VOC root or a VOC list file (from `find_groups`).
    num_classes: K; mask labels above K (other than 255) are errors. None: the K of the
      group's classes.txt, unchecked without one.
    need: 'masks' or 'instances' makes missing annotations an error.
    min_images: fewer images is an error (the batch size).
  """
  if need not in _NEEDS:
    raise ValueError(f'need must be one of {_NEEDS}, got {need!r}')
  if num_classes is not None and num_classes < 1:
    raise ValueError(f'num_classes must be at least 1, got {num_classes}')
  if os.path.isfile(path) and path.endswith('.txt'):
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(path))))
    if not os.path.isdir(os.path.join(root, 'JPEGImages')):
      raise InputError(f'{path}: list file outside a PASCAL VOC root (no JPEGImages/ at {root})')
    return _load_voc(root, path, num_classes, need, min_images)
  if not os.path.isdir(path):
    raise InputError(f'{path}: no such folder')
  if os.path.isdir(os.path.join(path, 'JPEGImages')):
    return _load_voc(path, None, num_classes, need, min_images)
  return _load_folder(path, num_classes, need, min_images)


def read_image(path) -> np.ndarray:
  """uint8 HxWx3 RGB with EXIF orientation applied."""
  im = _open(path, exif=True)
  if im.mode == 'F':
    return _float_image(path, np.asarray(im, np.float64))
  if im.mode.startswith('I'):
    # 16-bit grey: PIL's convert('RGB') would clip at 255 instead of scaling.
    grey = np.clip(np.round(np.asarray(im, np.float64) / 257), 0, 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1)
  if im.mode in ('RGBA', 'LA', 'PA') or 'transparency' in im.info:
    return over_white(np.asarray(im.convert('RGBA')))
  return np.array(im.convert('RGB'))


def over_white(rgba_HxWx4) -> np.ndarray:
  """uint8 HxWx3 of a uint8 RGBA image composited over white (files and in-memory arrays
  alike, so a picture gives the same pixels whichever way it arrives)."""
  alpha = rgba_HxWx4[..., 3:].astype(np.float64) / 255.0
  return np.round(rgba_HxWx4[..., :3] * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)


def _float_image(path, grey_HxW):
  """A 32-bit float (grey) image: values in 0..1 are scaled to 0..255, values in 0..255
  kept; anything else has no agreed meaning and is rejected."""
  finite = np.isfinite(grey_HxW).all()
  lo, hi = (grey_HxW.min(), grey_HxW.max()) if finite else (np.nan, np.nan)
  if finite and lo >= 0 and hi <= 1:
    grey_HxW = grey_HxW * 255
  elif not (finite and lo >= 0 and hi <= 255):
    raise InputError(f'{path}: floating-point image with values {lo:.4g}..{hi:.4g}; expected '
                     '0..1 (or 0..255): save it as 8- or 16-bit')
  grey = np.clip(np.round(grey_HxW), 0, 255).astype(np.uint8)
  return np.repeat(grey[..., None], 3, axis=-1)


def read_label_png(path) -> np.ndarray:
  """Integer HxW values of a single-channel PNG (palette PNGs give indices)."""
  im = _open(path, exif=False)
  if im.format == 'JPEG':
    raise InputError(f'{path}: mask looks lossy: it is JPEG-compressed, which alters label '
                     'values; save label masks as PNG')
  if im.mode not in ('L', 'P', '1') and not im.mode.startswith('I'):
    raise InputError(f'{path}: must be a single-channel (grey or palette) PNG, got mode {im.mode}')
  return np.asarray(im).astype(np.int32)


def resize_batch(images, size) -> np.ndarray:
  """float32 NxSxSx3 in [0, 1]; bilinear, aspect not kept (as in both papers)."""
  return np.stack([
      np.asarray(Image.fromarray(im).resize((size, size), Image.BILINEAR), np.float32)
      for im in images]) / 255.0


def resize_labels(labels_NxHxW, shape_hw) -> np.ndarray:
  """Nearest-neighbour resize of a label map, boolean mask or a stack of them (the last
  two axes) to (H, W), sampling at pixel centres as PIL's NEAREST does; dtype kept."""
  labels_NxHxW = np.asarray(labels_NxHxW)
  h, w = labels_NxHxW.shape[-2:]
  if (h, w) == tuple(shape_hw):
    return labels_NxHxW
  rows = np.minimum(((np.arange(shape_hw[0]) + 0.5) * h / shape_hw[0]).astype(int), h - 1)
  cols = np.minimum(((np.arange(shape_hw[1]) + 0.5) * w / shape_hw[1]).astype(int), w - 1)
  return labels_NxHxW[..., rows, :][..., cols]


def resize_probs(probs_hxwxC, shape_hw, axis=-1) -> np.ndarray:
  """Bilinear resize of per-channel maps (e.g. softmax outputs; channels on `axis`) to
  (H, W), each channel on its own."""
  size = (shape_hw[1], shape_hw[0])
  return np.stack([
      np.asarray(Image.fromarray(np.ascontiguousarray(c, np.float32), 'F').resize(size, Image.BILINEAR))
      for c in np.moveaxis(np.asarray(probs_hxwxC), axis, 0)], axis=axis)


def resize_long_side(image_uint8, long_side):
  """Resized (up or down, bilinear) so its longer side is `long_side`, aspect kept."""
  h, w = image_uint8.shape[:2]
  scale = long_side / max(h, w)
  size = (max(1, round(w * scale)), max(1, round(h * scale)))
  return np.asarray(Image.fromarray(image_uint8).resize(size, Image.BILINEAR))


def _h5_value(f, dataset):
  value = dataset[()]
  if dataset.dtype == h5py.ref_dtype:  # a cell array: one reference per cell
    cells = np.empty(value.shape, object)
    for idx, ref in np.ndenumerate(value):
      cells[idx] = np.asarray(f[ref][()]).T
    return cells.T
  return np.asarray(value).T


def read_mat(path):
  """Variables of a MATLAB file, v5 or v7.3 (HDF5), as numpy arrays in MATLAB's axis order.

  Cell arrays come back as object arrays. Unreadable files raise InputError.
  """
  try:
    if h5py.is_hdf5(path):
      with h5py.File(path, 'r') as f:
        return {k: _h5_value(f, v) for k, v in f.items() if isinstance(v, h5py.Dataset)}
    return {k: v for k, v in scipy.io.loadmat(path).items() if not k.startswith('__')}
  except Exception as e:  # scipy and h5py raise many types for broken files.
    raise InputError(f'{path}: cannot read .mat file ({type(e).__name__}: {e})') from None


def _open(path, *, exif):
  if os.path.getsize(path) == 0:
    raise InputError(f'{path}: empty file (0 bytes)')
  try:
    with open(path, 'rb') as f:
      im = Image.open(f)
      im.load()
    return ImageOps.exif_transpose(im) if exif else im
  except Image.UnidentifiedImageError:
    raise InputError(f'{path}: cannot read image (unknown format or corrupt file)') from None
  except Exception as e:  # PIL raises many exception types for broken files.
    reason = ' '.join(f'{type(e).__name__}: {e}'.split())
    raise InputError(f'{path}: cannot read image ({reason})') from None


def _visible(folder):
  return sorted(n for n in os.listdir(folder) if not n.startswith('.') and n not in _SYSTEM_FILES)


def _is_image_name(name):
  return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _image_files(images_dir):
  """{stem: path} of images_dir; anything that is not an image file is an error."""
  files = {}
  for name in _visible(images_dir):
    path = os.path.join(images_dir, name)
    if not (os.path.isfile(path) and _is_image_name(name)):
      raise InputError(f'{path}: not an image file (expected {", ".join(IMAGE_EXTENSIONS)})')
    stem = os.path.splitext(name)[0]
    if stem in files:
      raise InputError(f'{path}: same name as {files[stem]} (masks are matched by name)')
    files[stem] = path
  if not files:
    raise InputError(f'{images_dir}: no images')
  return files


def _instance_files(instances_dir, stems):
  """{stem: [paths ordered by id]} of `<stem>_<id>.png` files."""
  found = {s: [] for s in stems}
  for name in _visible(instances_dir):
    path = os.path.join(instances_dir, name)
    base, ext = os.path.splitext(name)
    stem, _, inst_id = base.rpartition('_')
    if ext.lower() != '.png' or not inst_id.isdigit():
      raise InputError(f'{path}: instance masks must be named <image stem>_<id>.png')
    if stem not in found:
      raise InputError(f'{path}: no image {stem!r} in images/')
    found[stem].append((int(inst_id), path))
  return {s: [p for _, p in sorted(v)] for s, v in found.items()}


def _check_count(where, n, min_images):
  if n < min_images:
    raise InputError(f'{where}: {n} image(s), but at least {min_images} are needed (the batch size)')


def _check_size(label_path, labels, image_path, image):
  if labels.shape != image.shape[:2]:
    raise InputError(f'{label_path}: size {labels.shape[1]}x{labels.shape[0]} does not match '
                     f'{image_path} ({image.shape[1]}x{image.shape[0]})')


def _check_labels(path, labels, max_label):
  """Raises unless every label is in 0..max_label or 255 (max_label None: 0..255)."""
  bad = labels > IGNORE_LABEL if max_label is None else (labels > max_label) & (labels != IGNORE_LABEL)
  bad |= labels < 0
  if bad.any():
    values = ', '.join(str(v) for v in np.unique(labels[bad])[:5])
    allowed = '0..255' if max_label is None else f'0..{max_label} or {IGNORE_LABEL} (ignore)'
    hint = ''
    if len(np.unique(labels[bad])) > 3:  # JPEG ringing leaves many stray values near edges
      hint = ' (the mask looks lossy: was it ever saved as JPEG?)'
    raise InputError(f'{path}: unknown label(s) {values}; expected {allowed}{hint}')


def _read_binary(path, image_path, image):
  mask = read_label_png(path)
  _check_size(path, mask, image_path, image)
  if not mask.any():
    raise InputError(f'{path}: instance mask is empty')
  return mask > 0


def _require(need, what, have, where):
  if need == what and not have:
    raise InputError(f'{where}: no {what} found (needed by this method)')


def _load_folder(path, num_classes, need, min_images):
  images_dir = os.path.join(path, 'images')
  if not os.path.isdir(images_dir):
    raise InputError(f'{path}: no images/ folder')
  images = _image_files(images_dir)
  masks_dir = os.path.join(path, 'masks')
  instances_dir = os.path.join(path, 'instances')
  has_masks, has_instances = os.path.isdir(masks_dir), os.path.isdir(instances_dir)
  _require(need, 'masks', has_masks, path)
  _require(need, 'instances', has_instances, path)
  _check_count(path, len(images), min_images)
  instance_files = _instance_files(instances_dir, images) if has_instances else None
  class_names = _class_names(path)
  if num_classes is None and class_names:
    num_classes = len(class_names)
  samples = []
  for stem, image_path in images.items():
    image = read_image(image_path)
    sample = Sample(stem, image_path, image)
    if has_masks:
      mask_path = os.path.join(masks_dir, stem + '.png')
      if not os.path.isfile(mask_path):
        raise InputError(f'{mask_path}: missing mask of {image_path}')
      mask = read_label_png(mask_path)
      _check_size(mask_path, mask, image_path, image)
      _check_labels(mask_path, mask, num_classes)
      sample.mask = mask.astype(np.uint8)
    if has_instances:
      sample.instances = [_read_binary(p, image_path, image) for p in instance_files[stem]]
    samples.append(sample)
  return Group(group_name(path), path, samples, class_names)


def _class_names(path):
  names_path = os.path.join(path, 'classes.txt')
  if not os.path.isfile(names_path):
    return ()
  try:
    with open(names_path, encoding='utf-8') as f:
      lines = [line.strip() for line in f if line.strip()]
  except (OSError, UnicodeDecodeError) as e:
    raise InputError(f'{names_path}: unreadable ({e})') from None
  return parse_class_names(lines, names_path)


def parse_class_names(lines, where='classes.txt'):
  """Names of classes 1..K from classes.txt lines: one name a line (class 1 first), or
  '<id> <name>' lines in any order, where id 0 (background) and 255 (void) are ignored and
  the other ids must be 1..K."""
  lines = [line.strip() for line in lines if line.strip()]
  numbered = [re.fullmatch(r'(\d+)\s+(.+)', line) for line in lines]
  if not lines or not all(numbered):
    return tuple(lines)
  by_id = {}
  for m in numbered:
    i = int(m.group(1))
    if i in (0, IGNORE_LABEL):
      continue
    if i in by_id:
      raise InputError(f'{where}: class id {i} named twice')
    by_id[i] = m.group(2).strip()
  if sorted(by_id) != list(range(1, len(by_id) + 1)):
    raise InputError(f'{where}: class ids must be 1..K, got {sorted(by_id)}')
  return tuple(by_id[i] for i in range(1, len(by_id) + 1))


def _voc_list_files(root):
  lists_dir = os.path.join(root, 'ImageSets', 'Segmentation')
  if not os.path.isdir(lists_dir):
    return []
  return [os.path.join(lists_dir, n) for n in _visible(lists_dir) if n.endswith('.txt')]


def _voc_ids(list_path):
  ids = []
  with open(list_path, encoding='utf-8', errors='replace') as f:
    for line in f:
      tokens = line.split()
      if tokens and not (len(tokens) > 1 and tokens[1] == '-1'):
        ids.append(tokens[0])
  if not ids:
    raise InputError(f'{list_path}: no image ids listed')
  return list(dict.fromkeys(ids))


def _voc_image(root, image_id, list_path):
  for ext in IMAGE_EXTENSIONS:
    path = os.path.join(root, 'JPEGImages', image_id + ext)
    if os.path.isfile(path):
      return path
  raise InputError(f'{os.path.join(root, "JPEGImages", image_id)}.jpg: missing (listed in {list_path})')


def _voc_annotation(root, folder, image_id, image_path, image):
  path = os.path.join(root, folder, image_id + '.png')
  if not os.path.isfile(path):
    raise InputError(f'{path}: missing {folder} mask of {image_path}')
  labels = read_label_png(path)
  _check_size(path, labels, image_path, image)
  return path, labels


def _load_voc(root, list_path, num_classes, need, min_images):
  """One VOC group: the ids of `list_path`, or all of JPEGImages/ when it is None."""
  if list_path is None:
    images = _image_files(os.path.join(root, 'JPEGImages'))
  else:
    images = {i: _voc_image(root, i, list_path) for i in _voc_ids(list_path)}
  where = list_path or root
  has_masks = os.path.isdir(os.path.join(root, 'SegmentationClass'))
  has_instances = os.path.isdir(os.path.join(root, 'SegmentationObject'))
  _require(need, 'masks', has_masks, where)
  _require(need, 'instances', has_instances, where)
  _check_count(where, len(images), min_images)
  samples, raw_classes, raw_objects = [], [], []
  for stem, image_path in images.items():
    image = read_image(image_path)
    samples.append(Sample(stem, image_path, image))
    if has_masks:
      path, labels = _voc_annotation(root, 'SegmentationClass', stem, image_path, image)
      _check_labels(path, labels, len(VOC_CLASSES) - 1)
      raw_classes.append(labels)
    if has_instances:
      raw_objects.append(_voc_annotation(root, 'SegmentationObject', stem, image_path, image))
  class_names = ()
  if has_masks:
    present = sorted(set().union(*(np.unique(c) for c in raw_classes)) - {0, IGNORE_LABEL})
    if num_classes is not None and len(present) > num_classes:
      names = ', '.join(VOC_CLASSES[c] for c in present)
      raise InputError(f'{where}: {len(present)} classes present ({names}) but num_classes is {num_classes}')
    lut = np.full(IGNORE_LABEL + 1, IGNORE_LABEL, np.uint8)
    lut[0] = 0
    lut[present] = np.arange(1, len(present) + 1)
    for sample, labels in zip(samples, raw_classes):
      sample.mask = lut[labels]
    class_names = tuple(VOC_CLASSES[c] for c in present)
  if has_instances:
    _split_voc_instances(samples, raw_objects, raw_classes)
  return Group(group_name(where), where, samples, class_names)


def _split_voc_instances(samples, raw_objects, raw_classes):
  """Binary instances from SegmentationObject ids, filtered to the common class."""
  common = None
  if raw_classes:
    in_images = np.zeros(IGNORE_LABEL + 1, np.int64)
    for labels in raw_classes:
      in_images[np.unique(labels)] += 1
    in_images[[0, IGNORE_LABEL]] = 0
    common = int(np.argmax(in_images))
  for i, (sample, (path, objects)) in enumerate(zip(samples, raw_objects)):
    _check_labels(path, objects, None)
    sample.instances = []
    for object_id in np.unique(objects):
      if object_id in (0, IGNORE_LABEL):
        continue
      inst = objects == object_id
      if common is not None:
        classes = raw_classes[i][inst]
        classes = classes[classes != IGNORE_LABEL]
        if not classes.size or np.bincount(classes).argmax() != common:
          continue
      sample.instances.append(inst)
