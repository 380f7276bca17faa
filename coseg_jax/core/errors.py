"""User-facing input errors (one line, exit status 2), and SIGTERM as an interrupt."""
import contextlib
import math
import signal
import sys


class InputError(Exception):
  """Bad user input. `str(err)` is the one line shown to the user.

  Raise it with the offending path first, e.g. InputError(f'{path}: not an image').
  """


class DivergedError(Exception):
  """The loss became NaN/Inf; the run stops before writing outputs from a broken model."""


def escape_surrogates(text):
  """`text` with the lone surrogates of a non-UTF-8 file name (Python's surrogateescape)
  written as `\\xNN`, so it can be printed and written as UTF-8."""
  return text.encode('utf-8', 'surrogateescape').decode('utf-8', 'backslashreplace')


def one_line(text):
  """`text` as one printable line: control characters (a newline in a file name could
  forge a second error line) and undecodable bytes escaped as `repr` would."""
  text = escape_surrogates(text)
  return ''.join(repr(ch)[1:-1] if not ch.isprintable() and ch != ' ' else ch for ch in text)


def check_one_of(field, value, allowed):
  """InputError naming the config field when `value` is not one of `allowed`."""
  if value not in allowed:
    raise InputError(f'config.{field}: {value!r} is not one of {" | ".join(allowed)}')


def check_range(config, field, lo=None, hi=None, *, above=False, below=False, integer=False):
  """InputError naming `config.<field>` (a dotted path) unless its value is a finite number
  in [lo, hi] (`above`/`below`: the bound itself excluded) and, with `integer`, an int."""
  value = config
  for part in field.split('.'):
    value = value[part]
  ok = isinstance(value, int) if integer else isinstance(value, (int, float))
  ok = ok and not isinstance(value, bool) and math.isfinite(value)
  if ok and lo is not None:
    ok = value > lo if above else value >= lo
  if ok and hi is not None:
    ok = value < hi if below else value <= hi
  if not ok:
    bounds = []
    if lo is not None:
      bounds.append(f'{"above" if above else "at least"} {lo}')
    if hi is not None:
      bounds.append(f'{"below" if below else "at most"} {hi}')
    kind = 'an integer' if integer else 'a finite number'
    raise InputError(f'config.{field}: must be {kind}{", " + " and ".join(bounds) if bounds else ""}'
                     f', got {value!r}')


# SIGTERMs received inside `sigterm_as_interrupt`. Python drops an exception raised in a
# garbage-collector callback (JAX registers one) after printing it, so the interrupt the
# handler raised may never reach the run; this record outlives it.
_received = []


def _interrupt(signum, frame):
  del frame
  _received.append(signum)
  raise KeyboardInterrupt


def raise_if_interrupted():
  """KeyboardInterrupt if a SIGTERM arrived whose interrupt may have been dropped."""
  if _received:
    raise KeyboardInterrupt


@contextlib.contextmanager
def sigterm_as_interrupt():
  """SIGTERM raises KeyboardInterrupt inside the block, so a cluster's stop request takes the
  same path as Ctrl-C (checkpoint, message, exit 130) instead of killing without a word.
  A SIGTERM whose interrupt was dropped stops the run at the next `raise_if_interrupted()`
  (the trainer calls it) or at the end of the block."""
  old, old_hook = signal.signal(signal.SIGTERM, _interrupt), sys.unraisablehook

  def unraisable(info):
    # Python reports the dropped interrupt with a traceback; the record stops the run.
    if not (_received and issubclass(info.exc_type, KeyboardInterrupt)):
      old_hook(info)

  _received.clear()
  sys.unraisablehook = unraisable
  try:
    yield
    raise_if_interrupted()
  finally:
    signal.signal(signal.SIGTERM, old)
    sys.unraisablehook = old_hook
    _received.clear()
