"""Built-in demo groups, composed from images that ship inside scikit-image (no download).

Objects are elliptical cut-outs (the cat's head from `chelsea`, the cup and saucer from
`coffee`, the astronaut's head from `astronaut`) pasted without overlap at random
position, scale and mirror, with mild colour jitter, onto a different colourised
texture in every image (grass, gravel, brick, moon, handwriting, deep field). Masks are
the pasted ellipses, so they are exact by construction. A group folder is reused when
its `demo.json` records the same parameters and file hashes; otherwise it is rebuilt.
"""
import dataclasses
import functools
import hashlib
import json
import logging
import os

import numpy as np
from PIL import Image
import skimage.data

from coseg_jax.core import data
from coseg_jax.core import fileio
from coseg_jax.core import visualize
from coseg_jax.core.errors import InputError

_VERSION = 3
_MANIFEST = 'demo.json'


@dataclasses.dataclass(frozen=True)
class _Cutout:
  name: str
  source: str  # skimage.data function.
  center_yx: tuple[int, int]
  radii_yx: tuple[int, int]


# Class k of the multi-class demo is _OBJECTS[k - 1].
_OBJECTS = (
    _Cutout('cat', 'chelsea', (160, 230), (140, 200)),
    _Cutout('cup', 'coffee', (225, 275), (160, 205)),
    _Cutout('person', 'astronaut', (100, 228), (95, 72)),
)
# Texture and the dark / light colour its grey levels are mapped to (None: keep RGB).
_BACKGROUNDS = (
    ('grass', (20, 60, 15), (150, 210, 110)),
    ('gravel', (60, 50, 40), (220, 205, 180)),
    ('brick', (50, 25, 20), (200, 120, 90)),
    ('moon', (30, 35, 50), (190, 200, 220)),
    ('text', (70, 60, 40), (250, 240, 215)),
    ('hubble_deep_field', None, None),
)


def multiclass_names(num_classes) -> tuple[str, ...]:
  """Names of classes 1..K of `make_multiclass_demo`."""
  return tuple(o.name for o in _OBJECTS[:num_classes])


def group_paths(config, workdir) -> list[str]:
  """The groups under `config.data.root`; unset, the built-in demo group of
  `config.method`, generated into `workdir/demo_data`."""
  if config.data.root is not None:
    return data.find_groups(config.data.root, config.data.groups)
  out_dir = os.path.join(workdir, 'demo_data')
  if config.method == 'instance':
    path = make_instance_demo(out_dir, seed=config.seed)
  else:
    path = make_multiclass_demo(out_dir, config.num_classes, seed=config.seed)
  logging.getLogger('coseg_jax').info('data: built-in %s demo group at %s', config.method, path)
  return [path]


def make_multiclass_demo(out_dir, num_classes, *, num_images=6, size=256, seed=0) -> str:
  """Writes (or reuses) a K-class group under out_dir; returns the group folder.

  Every image contains one object of each class; masks/<stem>.png holds ids 1..K.
  """
  if not 1 <= num_classes <= len(_OBJECTS):
    raise InputError(f'config.num_classes: the built-in demo has 1..{len(_OBJECTS)} classes, '
                     f'got {num_classes}; set config.data.root to use your own data')
  params = dict(kind='multiclass', num_classes=num_classes, num_images=num_images, size=size, seed=seed)

  def render():
    files = {}
    for stem, image, labels in render_multiclass(num_classes, num_images=num_images, size=size, seed=seed):
      files[f'images/{stem}.png'] = (fileio.save_png, image)
      files[f'masks/{stem}.png'] = (visualize.save_label_png, labels)
    files['classes.txt'] = (fileio.atomic_write_text, '\n'.join(multiclass_names(num_classes)) + '\n')
    return files

  return _materialise(os.path.join(out_dir, '_'.join(multiclass_names(num_classes))), params, render)


def make_instance_demo(out_dir, *, num_images=6, size=256, seed=0) -> str:
  """Writes (or reuses) a group of 1-3 cat heads per image (plus distractors) with
  instances/<stem>_<id>.png."""
  params = dict(kind='instance', num_images=num_images, size=size, seed=seed)

  def render():
    files = {}
    for stem, image, labels in render_instances(num_images=num_images, size=size, seed=seed):
      files[f'images/{stem}.png'] = (fileio.save_png, image)
      for i in range(1, labels.max() + 1):
        files[f'instances/{stem}_{i}.png'] = (fileio.save_png, (labels == i).astype(np.uint8) * 255)
    return files

  return _materialise(os.path.join(out_dir, 'cat_heads'), params, render)


def render_multiclass(num_classes, *, num_images=6, size=256, seed=0):
  """[(stem, uint8 SxSx3 image, uint8 SxS labels 0..K)], one object of each class."""
  rng = np.random.default_rng(seed)
  return [(f'img{n:02d}', *_compose(rng, n, list(range(num_classes)), size))
          for n in range(num_images)]


def render_instances(*, num_images=6, size=256, seed=0):
  """[(stem, image, instance ids 0..n)] with n in 1..3 cat heads per image.

  Every other image also holds one salient distractor (a cup or a face) that is not an
  instance: it appears in only some images, so co-occurrence must rule it out, which a
  single-image saliency prior cannot do.
  """
  rng = np.random.default_rng(seed)
  counts = rng.permutation(np.resize([1, 2, 3], num_images))
  out = []
  for n, c in enumerate(counts):
    distractors = [1 + (n // 2) % 2] if n % 2 == 0 else []
    image, labels = _compose(rng, n, [0] * int(c) + distractors, size)
    labels[labels > c] = 0
    out.append((f'img{n:02d}', image, labels))
  return out


def _compose(rng, index, objects, size):
  """Pastes _OBJECTS[objects[i]] as label i + 1 onto background number `index`."""
  image = _background(rng, index, size)
  cutouts = [_OBJECTS[o] for o in objects]
  # Objects shrink with their number so that they fit side by side.
  long_sides = rng.uniform(0.6, 0.85, len(cutouts)) * size / np.sqrt(len(cutouts))
  shapes = [_shape(c, s) for c, s in zip(cutouts, long_sides)]
  boxes, shapes = _place(rng, shapes, size)
  labels = np.zeros((size, size), np.uint8)
  for label, (cutout, (h, w), (y, x)) in enumerate(zip(cutouts, shapes, boxes), 1):
    patch = _jitter(rng, _crop(cutout, h, w, flip=bool(rng.integers(2))))
    inside = _ellipse(h, w)
    image[y:y + h, x:x + w][inside] = patch[inside]
    labels[y:y + h, x:x + w][inside] = label
  return image, labels


def _shape(cutout, long_side):
  ry, rx = cutout.radii_yx
  scale = long_side / (2 * max(ry, rx))
  return max(8, round(2 * ry * scale)), max(8, round(2 * rx * scale))


def _place(rng, shapes, size, margin=4):
  """(top-left corners, shapes) of non-overlapping boxes, shrunk until they fit."""
  while True:
    boxes = []
    for h, w in shapes:
      for _ in range(200):
        y, x = int(rng.integers(0, size - h + 1)), int(rng.integers(0, size - w + 1))
        if all(y + h + margin <= by or by + bh + margin <= y or x + w + margin <= bx or bx + bw + margin <= x
               for (by, bx), (bh, bw) in zip(boxes, shapes)):
          boxes.append((y, x))
          break
      else:
        break
    if len(boxes) == len(shapes):
      return boxes, shapes
    smaller = [(max(8, int(h * 0.9)), max(8, int(w * 0.9))) for h, w in shapes]
    if smaller == shapes:
      raise InputError(f'demo: images of size {size} are too small for {len(shapes)} objects')
    shapes = smaller


def _ellipse(h, w):
  y = (np.arange(h) + 0.5 - h / 2) / (h / 2)
  x = (np.arange(w) + 0.5 - w / 2) / (w / 2)
  return y[:, None] ** 2 + x[None, :] ** 2 <= 1


def _crop(cutout, h, w, *, flip):
  (cy, cx), (ry, rx) = cutout.center_yx, cutout.radii_yx
  patch = _source(cutout.source)[cy - ry:cy + ry, cx - rx:cx + rx]
  patch = np.asarray(Image.fromarray(patch).resize((w, h), Image.BILINEAR))
  return patch[:, ::-1] if flip else patch


def _jitter(rng, patch):
  """Mild brightness, per-channel gain and saturation changes."""
  p = patch.astype(np.float32) * rng.uniform(0.85, 1.15) * rng.uniform(0.93, 1.07, 3)
  grey = p.mean(-1, keepdims=True)
  p = grey + (p - grey) * rng.uniform(0.8, 1.2)
  return np.clip(np.round(p), 0, 255).astype(np.uint8)


def _background(rng, index, size):
  name, dark, light = _BACKGROUNDS[index % len(_BACKGROUNDS)]
  texture = _source(name)
  h, w = texture.shape[:2]
  side = int(min(h, w) * rng.uniform(0.5, 1.0))
  y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
  crop = np.rot90(texture[y:y + side, x:x + side], int(rng.integers(4)))
  crop = np.asarray(Image.fromarray(np.ascontiguousarray(crop)).resize((size, size), Image.BILINEAR))
  if dark is None:
    return crop.copy()
  tint = rng.uniform(0.85, 1.15, 3)
  dark, light = np.asarray(dark) * tint, np.clip(np.asarray(light) * tint, 0, 255)
  rgb = dark + (crop[..., None] / 255.0) * (light - dark)
  return np.round(rgb).astype(np.uint8)


@functools.lru_cache(maxsize=None)
def _source(name):
  return getattr(skimage.data, name)()


def _materialise(group_dir, params, render):
  """Reuses group_dir when its manifest matches `params` and the files; else rebuilds it."""
  manifest_path = os.path.join(group_dir, _MANIFEST)
  expected = dict(params, version=_VERSION)
  if _intact(group_dir, manifest_path, expected):
    return group_dir
  files = render()  # {relative path: (writer, array)}
  for sub in ('images', 'masks', 'instances'):
    folder = os.path.join(group_dir, sub)
    if os.path.isdir(folder):
      for name in os.listdir(folder):
        if f'{sub}/{name}' not in files:
          os.unlink(os.path.join(folder, name))
  for rel, (write, array) in files.items():
    write(os.path.join(group_dir, rel), array)
  # Written last: an interrupted build has no manifest and is rebuilt next time.
  fileio.atomic_write_json(manifest_path, dict(
      expected, files={rel: _sha256(os.path.join(group_dir, rel)) for rel in files}))
  return group_dir


def _intact(group_dir, manifest_path, expected):
  try:
    with open(manifest_path) as f:
      manifest = json.load(f)
    if {k: v for k, v in manifest.items() if k != 'files'} != expected:
      return False
    return all(_sha256(os.path.join(group_dir, rel)) == digest for rel, digest in manifest['files'].items())
  except (OSError, ValueError, KeyError, AttributeError):
    return False


def _sha256(path):
  with open(path, 'rb') as f:
    return hashlib.sha256(f.read()).hexdigest()
