"""Opens a run's report.html in headless Chromium: every image must decode; takes a screenshot.

  python bin/check_report.py --workdir=runs/two_class [--screenshot=report.png] [--rebuild]

Builds the report first if it is missing (or with --rebuild). Chromium loads a copy with a
probe script (the report itself has no scripts) that counts the images the browser
decoded, then takes a screenshot of the report for a person to look at. Offline: no
network, a fresh profile. Exits 1 unless every image decoded. Needs the Debian package
`chromium`.
"""
import os
import re
import shutil
import subprocess
import sys
import tempfile

from absl import app
from absl import flags

from coseg_jax.core import report

_WORKDIR = flags.DEFINE_string('workdir', None, 'Work directory of a finished run.')
_SCREENSHOT = flags.DEFINE_string('screenshot', None, 'PNG to write; default <workdir>/report.png.')
_REBUILD = flags.DEFINE_bool('rebuild', False, 'Rebuild report.html from the work directory first.')
_WIDTH = flags.DEFINE_integer('width', 1200, 'Window width in pixels.')
_HEIGHT = flags.DEFINE_integer('height', 2000, 'Window height in pixels.')
flags.mark_flags_as_required(['workdir'])

BROWSERS = ('chromium', 'chromium-browser', 'google-chrome')
# Writes "decoded N/M" into the title once the page (with all its images) has loaded.
_PROBE = ('<script>addEventListener("load", () => {const all = [...document.images];'
          'document.title = "decoded " + all.filter(i => i.complete && i.naturalWidth > 0).length'
          ' + "/" + all.length;});</script>')


def chromium(*args):
  """Runs headless Chromium with a throw-away profile and no network; returns stdout."""
  browser = next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)
  if browser is None:
    raise FileNotFoundError(f'no browser found ({", ".join(BROWSERS)})')
  with tempfile.TemporaryDirectory() as profile:
    return subprocess.run(
        [browser, '--headless', '--no-sandbox', '--disable-gpu',
         '--disable-background-networking', '--no-first-run', '--disable-component-update',
         '--disable-sync', f'--user-data-dir={profile}', *args],
        check=True, capture_output=True, text=True, timeout=120).stdout


def decoded_images(html_path):
  """(images the browser decoded, images on the page) of a local HTML file."""
  with open(html_path, encoding='utf-8') as f:
    text = f.read()
  with tempfile.TemporaryDirectory() as tmp:
    probe_path = os.path.join(tmp, 'probe.html')
    with open(probe_path, 'w', encoding='utf-8') as f:
      f.write(text.replace('</body>', _PROBE + '</body>'))
    dom = chromium('--dump-dom', 'file://' + probe_path)
  match = re.search(r'<title>decoded (\d+)/(\d+)</title>', dom)
  if match is None:
    raise RuntimeError(f'{html_path}: the probe did not run (page did not load)')
  return int(match.group(1)), int(match.group(2))


def main(argv):
  del argv
  html_path = os.path.join(_WORKDIR.value, report.REPORT_NAME)
  if _REBUILD.value or not os.path.isfile(html_path):
    report.write(_WORKDIR.value)
  png_path = os.path.abspath(_SCREENSHOT.value or os.path.join(_WORKDIR.value, 'report.png'))
  chromium(f'--screenshot={png_path}', f'--window-size={_WIDTH.value},{_HEIGHT.value}',
           'file://' + os.path.abspath(html_path))
  decoded, total = decoded_images(html_path)
  print(f'{html_path}: {decoded}/{total} images decoded; screenshot {png_path}')
  if total == 0:
    sys.exit(f'error: {html_path}: no images (was the run made with --config.output.images=False?)')
  if decoded < total:
    sys.exit(f'error: {html_path}: {total - decoded} of {total} images did not decode')


if __name__ == '__main__':
  app.run(main)
