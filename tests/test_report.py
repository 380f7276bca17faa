"""The HTML report: self-contained, numbers from metrics.json, images as data URIs."""
import base64
import html.parser
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from coseg_jax.cli import main
from coseg_jax.core import config as defaults
from coseg_jax.core import report

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'


class _Page(html.parser.HTMLParser):
  """Collects images, table rows (cells as (text, attrs)), tags and attribute values."""

  def __init__(self, text):
    super().__init__()
    self.images, self.rows, self.tags, self.attr_values = [], [], set(), []
    self._cell = None
    self.feed(text)

  def handle_starttag(self, tag, attrs):
    attrs = dict(attrs)
    self.tags.add(tag)
    self.attr_values += [v for v in attrs.values() if v]
    if tag == 'img':
      self.images.append(attrs)
    elif tag == 'tr':
      self.rows.append([])
    elif tag in ('td', 'th'):
      self._cell = ['', attrs]

  def handle_data(self, data):
    if self._cell is not None:
      self._cell[0] += data

  def handle_endtag(self, tag):
    if tag in ('td', 'th') and self._cell is not None:
      self.rows[-1].append((self._cell[0].strip(), self._cell[1]))
      self._cell = None

  def row(self, first_cell):
    """Texts of the first table row whose first cell is `first_cell`."""
    return next([t for t, _ in r] for r in self.rows if r and r[0][0] == first_cell)


def _decode(src):
  assert src.startswith('data:image/png;base64,'), src[:60]
  raw = base64.b64decode(src.split(',', 1)[1], validate=True)
  assert raw.startswith(PNG_SIGNATURE)
  return np.asarray(Image.open(io.BytesIO(raw)).convert('RGB'))


def _run(workdir, config):
  config.data.image_size = 64
  config.output.quiet = True
  assert main.run_cli(config, str(workdir)) == 0
  return str(workdir)


@pytest.fixture(scope='module')
def cluster_run(tmp_path_factory):
  """A finished multi-class run of the clustering baseline on the demo group."""
  c = defaults.multiclass()
  c.baseline = 'cluster'
  c.infer.method = 'argmax'
  return _run(tmp_path_factory.mktemp('cluster') / 'work', c)


@pytest.fixture(scope='module')
def saliency_run(tmp_path_factory):
  """A finished instance run of the saliency baseline on the demo group."""
  c = defaults.instance()
  c.baseline = 'saliency'
  return _run(tmp_path_factory.mktemp('saliency') / 'work', c)


def _page(workdir):
  with open(os.path.join(workdir, report.REPORT_NAME), encoding='utf-8') as f:
    return _Page(f.read())


def _metrics(workdir):
  with open(os.path.join(workdir, 'metrics.json')) as f:
    return json.load(f)


def _float_leaves(value):
  if isinstance(value, float):
    yield value
  elif isinstance(value, dict):
    for v in value.values():
      yield from _float_leaves(v)
  elif isinstance(value, list):
    for v in value:
      yield from _float_leaves(v)


def _assert_self_contained(page):
  assert not page.tags & {'script', 'link', 'iframe', 'object', 'embed'}
  assert not [v for v in page.attr_values if '://' in v]
  assert page.images
  for img in page.images:
    _decode(img['src'])


@pytest.mark.slow
@pytest.mark.parametrize('run', ['cluster_run', 'saliency_run'])
def test_report_is_self_contained_and_has_every_metric(run, request):
  workdir = request.getfixturevalue(run)
  page = _page(workdir)
  _assert_self_contained(page)
  metrics = _metrics(workdir)
  cells = {(a.get('title'), t) for r in page.rows for t, a in r}
  for v in _float_leaves({'groups': metrics['groups'], 'mean': metrics['mean']}):
    if not math.isnan(v):
      assert (repr(v), f'{v:.3f}') in cells, v


def test_multiclass_tables_and_images(cluster_run):
  page = _page(cluster_run)
  m = _metrics(cluster_run)
  g = m['groups']['cat_cup']
  for im in g['images']:
    values = (im['P'], im['J'], *im['iou'])
    assert page.row(im['name']) == [im['name']] + [f'{v:.3f}' for v in values]
  assert page.row('group pooled')[2:] == [f'{v:.3f}' for v in (g['J_pooled'], *g['class_iou'])]
  assert page.row('mean') == ['mean'] + [f'{m["mean"][k]:.3f}' for k in ('P', 'J', 'J_pooled')]
  assert page.row('group') == ['group', 'P', 'J', 'J_pooled']
  # Class names come from the demo's classes.txt.
  assert page.row('image')[3:] == ['IoU background', 'IoU cat', 'IoU cup']
  assert page.row('backbones.extractor.weights')[1] == m['backbones']['extractor']['weights']
  # One row of input | ground truth | prediction per image; the demo images are smaller
  # than a thumbnail, so the embedded pixels are the files' own.
  by_alt = {}
  for img in page.images:
    by_alt.setdefault(img['alt'], []).append(img['src'])
  assert [len(by_alt[k]) for k in ('input', 'ground truth', 'prediction')] == [6, 6, 6]
  overlay = np.asarray(Image.open(os.path.join(cluster_run, 'cat_cup', 'overlays', 'img03.png')))
  np.testing.assert_array_equal(_decode(by_alt['prediction'][3]), overlay)
  image = np.asarray(Image.open(
      os.path.join(cluster_run, 'demo_data', 'cat_cup', 'images', 'img03.png')))
  np.testing.assert_array_equal(_decode(by_alt['input'][3]), image)


def test_report_shows_the_resolved_config(cluster_run):
  with open(os.path.join(cluster_run, report.REPORT_NAME), encoding='utf-8') as f:
    text = f.read()
  with open(os.path.join(cluster_run, 'config.json')) as f:
    config = json.load(f)
  assert html.escape(json.dumps(config, indent=2, sort_keys=True), quote=True) in text
  assert config['baseline'] == 'cluster' and config['data']['image_size'] == 64


@pytest.mark.parametrize('train_cfg, row', [({'epochs': 10, 'steps': 0}, ['epochs', '10']),
                                            ({'epochs': 0, 'steps': 40}, ['steps', '40'])])
def test_facts_give_the_training_length_that_ran(cluster_run, tmp_path, train_cfg, row):
  workdir = str(tmp_path / 'copy')
  shutil.copytree(cluster_run, workdir)
  with open(os.path.join(workdir, 'config.json')) as f:
    config = json.load(f)
  config.update(baseline='none', train=dict(config['train'], **train_cfg))
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    json.dump(config, f)
  page = _Page(report.build(workdir))
  other = {'epochs': 'steps', 'steps': 'epochs'}[row[0]]
  assert page.row(row[0]) == row and not any(r and r[0][0] == other for r in page.rows)


def test_instance_report_has_ground_truth_and_predictions(saliency_run):
  page = _page(saliency_run)
  alts = [img['alt'] for img in page.images]
  assert alts.count('input') == alts.count('ground truth') == alts.count('prediction') == 6
  m = _metrics(saliency_run)
  column = page.row('group').index('CorLoc_r')
  assert page.row('cat_heads')[column] == f'{m["groups"]["cat_heads"]["CorLoc_r"]:.3f}'
  assert page.row('method')[1] == m['method']


def test_report_without_inputs_still_shows_predictions(cluster_run, tmp_path):
  workdir = str(tmp_path / 'copy')
  shutil.copytree(cluster_run, workdir, ignore=shutil.ignore_patterns('demo_data'))
  page = _Page(report.build(workdir))
  alts = [img['alt'] for img in page.images]
  assert alts.count('prediction') == 6 and 'input' not in alts
  assert 'Inputs not shown' in report.build(workdir)


def test_report_caps_images_per_group(cluster_run, monkeypatch):
  monkeypatch.setattr(report, 'MAX_IMAGES_PER_GROUP', 2)
  text = report.build(cluster_run)
  assert [img['alt'] for img in _Page(text).images].count('prediction') == 2
  assert 'Showing 2 of 6 images' in text


def test_loss_curves_from_loss_jsonl(cluster_run, tmp_path):
  workdir = str(tmp_path / 'copy')
  shutil.copytree(cluster_run, workdir)
  areas = (0.5, 0.3, 0.2)
  with open(os.path.join(workdir, 'cat_cup', 'loss.jsonl'), 'w') as f:
    for step in range(1, 21):
      f.write(json.dumps({'step': step, 'epoch': 1 + (step - 1) // 2, 'loss': 2.0 / step,
                          **{f'area{i}': a for i, a in enumerate(areas)}}) + '\n')
    f.write('{"step": 21, "epoch": 11, "lo')  # a killed run's last line
  page = _Page(report.build(workdir))
  charts = {img['alt']: _decode(img['src']) for img in page.images if img['alt'].endswith('curve')}
  assert sorted(charts) == ['area curve', 'loss curve']
  # One line per channel, in series order: from the top (largest area) down.
  plot = charts['area curve'][30:]
  rows = [np.nonzero(np.all(plot == colour, axis=-1))[0].mean()
          for colour in report.SERIES_COLOURS[:3]]
  assert rows == sorted(rows)


def test_line_chart_puts_larger_values_higher():
  xs = np.arange(1, 11)
  chart = report.line_chart([('up', (255, 0, 0), xs, xs * 1.5)], title='up')
  ys, cols = np.nonzero(np.all(chart == (255, 0, 0), axis=-1))
  left, right = ys[cols < np.percentile(cols, 20)], ys[cols > np.percentile(cols, 80)]
  assert left.mean() > right.mean() + 0.5 * chart.shape[0] / 2
  flat = report.line_chart([('flat', (0, 0, 255), [1], [0.7])], title='one point')
  assert np.all(flat == (0, 0, 255), axis=-1).any()


@pytest.mark.skipif(shutil.which('chromium') is None,
                    reason='Debian package chromium not installed')
def test_chromium_decodes_every_image(cluster_run, tmp_path):
  shot = tmp_path / 'shot.png'
  cmd = [sys.executable, os.path.join(REPO, 'bin', 'check_report.py'), f'--workdir={cluster_run}',
         f'--screenshot={shot}', '--height=1400']
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=REPO)
  assert proc.returncode == 0, proc.stderr
  num_images = len(_page(cluster_run).images)
  assert f'{num_images}/{num_images} images decoded' in proc.stdout
  assert Image.open(shot).size == (1200, 1400)
  # One image that does not decode fails the check.
  broken = tmp_path / 'broken'
  shutil.copytree(cluster_run, broken)
  text = (broken / report.REPORT_NAME).read_text(encoding='utf-8')
  text = re.sub(r'src="data:image/png;base64,[^"]*"', 'src="data:image/png;base64,iVBORw0KGgo="',
                text, count=1)
  (broken / report.REPORT_NAME).write_text(text, encoding='utf-8')
  cmd[2] = f'--workdir={broken}'
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=REPO)
  assert proc.returncode == 1
  assert f'1 of {num_images} images did not decode' in proc.stderr
