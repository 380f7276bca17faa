"""The Python API: both methods on images in memory, with the CLI's defaults and code path.

  import coseg_jax
  result = coseg_jax.cosegment(images, num_classes=2, image_size=160, attention='ma')
  result.labels       # per image HxW uint8, 0 = background, ids consistent over the group
  result.maps         # per image HxWx(K+1) float32, Eq. 8-normalised
  result.class_order  # ids by their share of the group's pixels (background 0 first)
  coseg_jax.cosegment(images, num_classes=None).num_classes   # K estimated (BUILD.md)
  found = coseg_jax.instances(images)   # per image [(bool HxW mask, score), ...]

`images` is a sequence of HxW (grey), HxWx1, HxWx3 or HxWx4 (RGBA, composited over white)
arrays (uint8, or float in [0, 1]), PIL images or paths, of any sizes; the whole sequence
is one group. Keyword overrides are config fields by their leaf name (`image_size`,
`attention`, `steps`, `method`) or, where a leaf name is in several sections, by
enough of its path joined with '_' (`crf_iterations`, `saliency_folder`); an unknown
name is a TypeError naming the close matches. `workdir=DIR` keeps what bin/run.py writes
per group (checkpoints, loss log, pictures) plus metrics.json and config.json; without
it nothing is written. `progress=True` shows the progress bars.

This module sits above both method wings (like cli/); `import coseg_jax` loads it only
when one of its names is first used, so importing the package stays light.
"""
import dataclasses
import difflib
import os

import numpy as np
from PIL import Image

from coseg_jax.core import config as defaults
from coseg_jax.core import data
from coseg_jax.core import fileio
from coseg_jax.core import visualize
from coseg_jax.core.errors import InputError
from coseg_jax.multiclass import pipeline as multiclass_pipeline
from coseg_jax.multiclass import postprocess
from coseg_jax.instance import pipeline as instance_pipeline

GROUP_NAME = 'images'


def multiclass_config(num_classes=2):
  """The config bin/run.py reads from configs/two_class.py / three_class.py, for K."""
  config = defaults.multiclass()
  config.num_classes = num_classes
  return config


def instance_config():
  """The config bin/run.py reads from configs/instance.py."""
  return defaults.instance()


def _leaf_paths(config, prefix=''):
  paths = []
  for key in config.keys():
    value = config[key]
    path = f'{prefix}{key}'
    if hasattr(value, 'keys'):
      paths += _leaf_paths(value, path + '.')
    else:
      paths.append(path)
  return paths


def _names(path):
  """The keyword names of a dotted config path: its leaf, then longer '_'-joined suffixes."""
  parts = path.split('.')
  return ['_'.join(parts[-n:]) for n in range(1, len(parts) + 1)]


def apply_overrides(config, overrides):
  """Sets each keyword on `config` by name (module docstring); returns {keyword: path}."""
  # config.method is which function was called, not a knob: `method` is infer.method.
  paths = [p for p in _leaf_paths(config) if p != 'method']
  by_name = {}
  for path in paths:
    for name in _names(path):
      by_name.setdefault(name, []).append(path)
  resolved = {}
  for name, value in overrides.items():
    matches = [name] if '.' in name and name in paths else by_name.get(name, [])
    if not matches:
      shortest = [next(n for n in _names(p) if len(by_name[n]) == 1) for p in paths]
      close = difflib.get_close_matches(name, shortest, n=3, cutoff=0.6)
      hint = f'; did you mean {" or ".join(close)}?' if close else ''
      raise TypeError(f'unexpected keyword argument {name!r}: no such config field{hint}')
    if len(matches) > 1:
      options = [next(n for n in _names(p) if len(by_name[n]) == 1) for p in matches]
      raise TypeError(f'keyword argument {name!r} names several config fields; use one of '
                      f'{", ".join(options)}')
    node = config
    *sections, leaf = matches[0].split('.')
    for section in sections:
      node = node[section]
    if isinstance(value, list):
      value = tuple(value)
    try:
      node[leaf] = value
    except (TypeError, ValueError) as e:
      raise TypeError(f'{name}={value!r}: {e}') from None
    resolved[name] = matches[0]
  return resolved


def _as_rgb(item, index):
  """uint8 HxWx3 of one input item; ValueError naming its index (and path)."""
  where = f'images[{index}]'
  if isinstance(item, (str, os.PathLike)):
    path = os.fspath(item)
    if not os.path.isfile(path):
      raise ValueError(f'{where} ({path}): no such file')
    try:
      return data.read_image(path), path
    except InputError as e:
      raise ValueError(f'{where}: {e}') from None
  if isinstance(item, Image.Image):
    if item.mode in ('RGBA', 'LA', 'PA') or 'transparency' in item.info:
      item = np.asarray(item.convert('RGBA'))
    else:
      item = np.asarray(item.convert('RGB'))
  try:
    array = np.asarray(item)
  except Exception as e:  # whatever the object's __array__ raises
    raise ValueError(f'{where}: not an image ({type(e).__name__}: {e})') from None
  if array.dtype == object or not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
    raise ValueError(f'{where}: not an image array or path (got {type(item).__name__})')
  if array.ndim == 3 and array.shape[-1] == 1:
    array = array[..., 0]
  if array.ndim == 2:
    array = np.repeat(array[..., None], 3, axis=-1)
  if array.ndim != 3 or array.shape[-1] not in (3, 4):
    raise ValueError(f'{where}: expected HxW, HxWx1, HxWx3 or HxWx4, got shape {array.shape}')
  if array.shape[0] < 1 or array.shape[1] < 1:
    raise ValueError(f'{where}: empty image (shape {array.shape})')
  if array.dtype != np.uint8:
    floating = np.issubdtype(array.dtype, np.floating)
    array = array.astype(np.float64)
    if not np.isfinite(array).all():
      raise ValueError(f'{where}: not finite (NaN or inf pixels)')
    if floating:
      if array.min() < 0 or array.max() > 1:
        raise ValueError(f'{where}: float pixels must lie in [0, 1] '
                         f'(got {array.min():.3g}..{array.max():.3g}); or pass uint8')
      array = array * 255.0
    elif array.min() < 0 or array.max() > 255:
      raise ValueError(f'{where}: integer pixels must lie in 0..255 '
                       f'(got {array.min():.0f}..{array.max():.0f})')
    array = np.round(array).astype(np.uint8)
  if array.shape[-1] == 4:
    array = data.over_white(array)
  return np.ascontiguousarray(array), None


def as_group(images, min_images, name=GROUP_NAME):
  """A `data.Group` of the images (module docstring), at least `min_images` of them."""
  if isinstance(images, (str, os.PathLike, np.ndarray, Image.Image)) and not (
      isinstance(images, np.ndarray) and images.ndim == 4):
    raise ValueError('images: expected a sequence of images (arrays, PIL images or paths), '
                     f'got one {type(images).__name__}')
  samples = []
  for i, item in enumerate(images):
    image, path = _as_rgb(item, i)
    samples.append(data.Sample(f'image{i:03d}', path or f'images[{i}]', image))
  if len(samples) < min_images:
    raise ValueError(f'images: {len(samples)} image(s), but at least {min_images} are needed '
                     f'(the batch size; pass batch_size=N to change it)')
  return data.Group(name, '<memory>', samples)


def _config_error(e):
  """A config value the method's check_config refuses, as the ValueError of a bad argument."""
  return ValueError(str(e).replace('config.', '', 1))


def _prepare(config, overrides):
  workdir = overrides.pop('workdir', None)
  progress = overrides.pop('progress', False)
  config.output.quiet = not progress
  apply_overrides(config, overrides)
  return config, workdir


def _write_run_files(config, workdir, summary):
  os.makedirs(workdir, exist_ok=True)
  fileio.atomic_write_text(os.path.join(workdir, 'config.json'),
                           config.to_json_best_effort(indent=2) + '\n')
  fileio.atomic_write_json(os.path.join(workdir, 'metrics.json'), summary)


@dataclasses.dataclass(frozen=True)
class Cosegmentation:
  """The result of `cosegment` for one group."""
  labels: list  # per image uint8 HxW: 0 background, 1..K classes consistent over the group
  maps: list  # per image float32 HxWx(K+1), Eq. 8-normalised (each channel's max is 1)
  class_order: tuple  # 0, then the foreground ids by their share of the group's pixels
  area: dict  # id -> fraction of all the group's pixels it labels
  images: list  # the uint8 HxWx3 inputs the labels belong to
  summary: dict  # what bin/run.py writes as metrics.json (method, backbones, ...)

  @property
  def num_classes(self):
    return len(self.class_order) - 1

  def overlay(self, index, names=None):
    """uint8 image `index` with its labels in colour and a legend (bin/run.py's overlays)."""
    return visualize.overlay(self.images[index], self.labels[index], names=names or ())


def cosegment(images, /, num_classes=2, **overrides) -> Cosegmentation:
  """Multi-class co-segmentation of one group of images (module docstring)."""
  config, workdir = _prepare(multiclass_config(num_classes), overrides)
  try:
    multiclass_pipeline.check_config(config)
  except InputError as e:
    raise _config_error(e) from None
  group = as_group(images, config.data.batch_size)
  try:
    summary, outputs = multiclass_pipeline.cosegment_groups(config, [group], workdir)
  except InputError as e:
    raise ValueError(str(e)) from None
  out = outputs[group.name]
  k1 = out.num_classes + 1
  counts = sum(np.bincount(l.ravel(), minlength=k1)[:k1] for l in out.labels)
  area = {i: float(c) / max(1, counts.sum()) for i, c in enumerate(counts)}
  order = (0,) + tuple(sorted(range(1, k1), key=lambda i: (-counts[i], i)))
  if workdir is not None:
    _write_run_files(config, workdir, summary)
  return Cosegmentation(
      labels=out.labels, maps=[postprocess.normalize_maps(m) for m in out.maps],
      class_order=order, area=area, images=[s.image for s in group.samples], summary=summary)


def instances(images, /, **overrides) -> list:
  """DeepCO3 instance co-segmentation of one group: per image a list of (bool HxW mask,
  float score), best first."""
  config, workdir = _prepare(instance_config(), overrides)
  try:
    instance_pipeline.check_config(config)
  except InputError as e:
    raise _config_error(e) from None
  min_images = 1 if config.baseline == 'saliency' else config.data.batch_size
  group = as_group(images, min_images)
  try:
    summary, outputs = instance_pipeline.detect_groups(config, [group], workdir)
  except InputError as e:
    raise ValueError(str(e)) from None
  masks, scores = outputs[group.name]
  if workdir is not None:
    _write_run_files(config, workdir, summary)
  return [[(np.asarray(m, bool), float(s)) for m, s in zip(ms, ss)]
          for ms, ss in zip(masks, scores)]
