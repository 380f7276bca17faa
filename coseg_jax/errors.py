"""User-facing input errors: reported as one line with exit status 2."""


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
