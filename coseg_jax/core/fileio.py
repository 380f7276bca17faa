"""Atomic output writers: a crash or a full disk never leaves a half-written file."""
import json
import os
import errno
import tempfile

import numpy as np
from PIL import Image

from coseg_jax.core import errors
from coseg_jax.core.errors import InputError

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def _chain(e):
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    yield e
    e = e.__cause__ or e.__context__


def is_disk_full(e):
  """Whether `e` or an exception in its chain is a full disk (or exceeded quota)."""
  return any(isinstance(x, OSError) and x.errno in DISK_FULL or 'No space left on device' in str(x)
             for x in _chain(e))


def disk_full(path, e=None):
  """The one-line error for a file that could not be written because the disk is full:
  the file the OSError in `e`'s chain names, else `path`."""
  for x in _chain(e):
    if isinstance(x, OSError) and x.filename:
      path = os.fsdecode(x.filename)
      break
  return InputError(f'{path}: cannot write: the disk is full (No space left on device)')


def atomic_write_bytes(path, data: bytes):
  # A SIGTERM whose interrupt Python dropped (errors.sigterm_as_interrupt) must not let a
  # stopped run go on to write results: every output goes through here.
  errors.raise_if_interrupted()
  d = os.path.dirname(os.path.abspath(path))
  os.makedirs(d, exist_ok=True)
  tmp = None
  try:
    fd, tmp = tempfile.mkstemp(dir=d, prefix='.tmp-', suffix=os.path.basename(path))
    with os.fdopen(fd, 'wb') as f:
      f.write(data)
    # mkstemp makes 0600 files; outputs get the permissions a plain open() would give.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)
  except BaseException as e:
    if tmp is not None and os.path.exists(tmp):
      os.unlink(tmp)
    if is_disk_full(e):
      raise disk_full(path) from None
    raise


def atomic_write_text(path, text: str):
  atomic_write_bytes(path, text.encode('utf-8'))


def atomic_write_json(path, obj):
  atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + '\n')


def _json_default(o):
  if isinstance(o, np.generic):
    return o.item()
  if isinstance(o, np.ndarray):
    return o.tolist()
  raise TypeError(f'not JSON serialisable: {type(o)}')


def save_png(path, array_HxW_or_HxWxC: np.ndarray):
  import io
  buf = io.BytesIO()
  Image.fromarray(np.asarray(array_HxW_or_HxWxC)).save(buf, format='PNG')
  atomic_write_bytes(path, buf.getvalue())
