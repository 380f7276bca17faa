"""Atomic output writers: a crash or a full disk never leaves a half-written file."""
import json
import os
import tempfile

import numpy as np
from PIL import Image

from coseg_jax.core import errors


def atomic_write_bytes(path, data: bytes):
  # A SIGTERM whose interrupt Python dropped (errors.sigterm_as_interrupt) must not let a
  # stopped run go on to write results: every output goes through here.
  errors.raise_if_interrupted()
  d = os.path.dirname(os.path.abspath(path))
  os.makedirs(d, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=d, prefix='.tmp-', suffix=os.path.basename(path))
  try:
    with os.fdopen(fd, 'wb') as f:
      f.write(data)
    # mkstemp makes 0600 files; outputs get the permissions a plain open() would give.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
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
