"""User-facing input errors (one line, exit status 2), and SIGTERM as an interrupt."""
import contextlib
import signal


class InputError(Exception):
  """Bad user input. `str(err)` is the one line shown to the user.

  Raise it with the offending path first, e.g. InputError(f'{path}: not an image').
  """


class DivergedError(Exception):
  """The loss became NaN/Inf; the run stops before writing outputs from a broken model."""


def check_one_of(field, value, allowed):
  """InputError naming the config field when `value` is not one of `allowed`."""
  if value not in allowed:
    raise InputError(f'config.{field}: {value!r} is not one of {" | ".join(allowed)}')


def _interrupt(signum, frame):
  del signum, frame
  raise KeyboardInterrupt


@contextlib.contextmanager
def sigterm_as_interrupt():
  """SIGTERM raises KeyboardInterrupt inside the block, so a cluster's stop request takes the
  same path as Ctrl-C (checkpoint, message, exit 130) instead of killing without a word."""
  old = signal.signal(signal.SIGTERM, _interrupt)
  try:
    yield
  finally:
    signal.signal(signal.SIGTERM, old)
