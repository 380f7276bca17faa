"""Progress bars with ETA on stderr; silent with config.output.quiet."""
import sys

from tqdm import tqdm


def bar(iterable=None, *, total=None, desc='', quiet=False):
  return tqdm(iterable, total=total, desc=desc, disable=quiet, file=sys.stderr,
              dynamic_ncols=True, leave=False)
