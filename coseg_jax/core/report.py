"""A self-contained HTML report of a run: <workdir>/report.html.

Built only from what a run leaves in its work directory (config.json, metrics.json,
<group>/overlays/*.png, <group>/loss.jsonl, run.log) and the input images its config
points at, so the same code serves both methods and the baselines, and an old work
directory can be reported again. Everything is inline (images as base64 PNG data URIs,
CSS in <style>, no scripts, no links), so the file opens offline and on its own.
"""
import base64
import html
import io
import json
import math
import os
import re

import numpy as np
from PIL import Image
from PIL import ImageDraw
from PIL import ImageFont

from coseg_jax.core import data
from coseg_jax.core import errors
from coseg_jax.core import fileio
from coseg_jax.core import visualize
from coseg_jax.core.errors import InputError

REPORT_NAME = 'report.html'
# Longest side of the embedded images; the files in the work directory keep full size.
THUMBNAIL_SIDE = 320
# Images shown per group (all of them are in the metrics tables).
MAX_IMAGES_PER_GROUP = 60
LOG_TAIL_LINES = 200
_DEMO_DIR = 'demo_data'
# Line colours of the loss charts (the "tab10" cycle).
SERIES_COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
                  (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))
# Leading columns of the results table; other metrics follow in metrics.json order.
_FIRST_METRICS = ('P', 'J')

_CSS = ("""
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:0 auto;
max-width:1200px;padding:16px 24px;color:#222;background:#fafafa}
h1{font-size:1.6em;margin:.2em 0}
h2{border-bottom:2px solid #ccc;padding-bottom:4px;margin-top:1.6em}
h3{margin:1.2em 0 .4em}
table{border-collapse:collapse;margin:.4em 0 1em;font-size:.9em;background:#fff}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:left}th{background:#eee}
td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.sum td{font-weight:600;background:#f3f3f3}
.facts td:first-child{color:#555;white-space:nowrap}.facts td{word-break:break-all}
.row{background:#fff;border:1px solid #ddd;border-radius:6px;padding:8px;margin:10px 0}
.row .cap{font-weight:600;margin-bottom:6px}
.cols{display:grid;gap:8px;
grid-template-columns:repeat(3,minmax(0,""" + str(THUMBNAIL_SIDE) + """px))}
figure{margin:0}figure img{width:100%;height:auto;border:1px solid #ccc;image-rendering:auto}
figcaption{font-size:.8em;color:#555}.charts{display:flex;flex-wrap:wrap;gap:8px}
.note{color:#8a5300;background:#fff6e0;border:1px solid #f0d9a0;padding:6px 10px;border-radius:4px}
pre{background:#fff;border:1px solid #ddd;padding:8px;overflow-x:auto;font-size:.8em}
""")


def write(workdir) -> str:
  """Writes <workdir>/report.html (atomically); returns its path."""
  path = os.path.join(workdir, REPORT_NAME)
  fileio.atomic_write_text(path, errors.escape_surrogates(build(workdir)))
  return path


def build(workdir) -> str:
  """The report of `workdir` as one HTML string."""
  config = _read_json(os.path.join(workdir, 'config.json')) or {}
  metrics = _read_json(os.path.join(workdir, 'metrics.json'))
  title = f'coseg_jax run: {os.path.basename(os.path.abspath(workdir))}'
  parts = [f'<h1>{_esc(title)}</h1>', _facts(workdir, config, metrics)]
  if metrics is None:
    parts.append('<p class="note">No metrics.json: the run did not finish.</p>')
  elif 'groups' in metrics and metrics['groups']:
    parts.append('<h2>Results</h2>' + _results(metrics))
  inputs = _InputFinder(workdir, config)
  for name in _group_names(workdir, metrics):
    group_metrics = ((metrics or {}).get('groups') or {}).get(name)
    estimate = ((metrics or {}).get('num_classes_estimated') or {}).get(name)
    taps = ((metrics or {}).get('cluster_taps_chosen') or {}).get(name)
    parts.append(_group_section(workdir, name, group_metrics, inputs, config.get('method'),
                                estimate, taps))
  parts.append('<h2>Resolved config</h2><details><summary>config.json</summary>'
               f'<pre>{_esc(json.dumps(config, indent=2, sort_keys=True))}</pre></details>')
  log_tail = _tail(os.path.join(workdir, 'run.log'), LOG_TAIL_LINES)
  if log_tail:
    parts.append(f'<h2>Log</h2><details><summary>last {LOG_TAIL_LINES} lines of run.log</summary>'
                 f'<pre>{_esc(log_tail)}</pre></details>')
  return ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
          f'<title>{_esc(title)}</title><style>{_CSS}</style></head><body>\n'
          + '\n'.join(parts) + '\n</body></html>\n')


def line_chart(series, *, title, x_label='step', width=520, height=240) -> np.ndarray:
  """A uint8 HxWx3 line chart drawn with PIL.

  Args:
    series: list of (label, colour, xs, ys); several series share the axes.
    title: drawn above the plot.
    x_label: drawn under the x axis.
  """
  font = ImageFont.load_default(size=12)
  grey = (80, 80, 80)
  x0, x1, y0, y1 = 58, width - 12, 24, height - 34  # plot area
  im = Image.new('RGB', (width, height), (255, 255, 255))
  draw = ImageDraw.Draw(im)
  xs_all = np.concatenate([np.asarray(s[2], np.float64) for s in series])
  ys_all = np.concatenate([np.asarray(s[3], np.float64) for s in series])
  ys_all = ys_all[np.isfinite(ys_all)]
  x_lo, x_hi = _range(xs_all.min(), xs_all.max(), pad=0.0)
  y_lo, y_hi = _range(ys_all.min(), ys_all.max(), pad=0.05)

  def px(x, y):
    return (x0 + (x - x_lo) / (x_hi - x_lo) * (x1 - x0),
            y1 - (y - y_lo) / (y_hi - y_lo) * (y1 - y0))

  def text(xy, label, *, align=0.0, colour=grey):
    """`align` 0: left edge at x, 0.5: centred, 1: right edge at x."""
    draw.text((xy[0] - align * draw.textlength(label, font=font), xy[1]), label, fill=colour,
              font=font)

  for v in _ticks(y_lo, y_hi):
    y = px(x_lo, v)[1]
    draw.line([(x0, y), (x1, y)], fill=(230, 230, 230))
    text((x0 - 4, y - 6), f'{v:.3g}', align=1.0)
  for v in _ticks(x_lo, x_hi):
    x = px(v, y_lo)[0]
    draw.line([(x, y1), (x, y1 + 4)], fill=grey)
    text((x, y1 + 6), f'{v:g}', align=0.5)
  draw.rectangle([x0, y0, x1, y1], outline=(120, 120, 120))
  text((x1, height - 14), x_label, align=1.0)
  text((x0, 5), title, colour=(0, 0, 0))
  legend_x = x0 + draw.textlength(title, font=font) + 16
  for label, colour, xs, ys in series:
    points = [px(x, y) for x, y in zip(xs, ys) if math.isfinite(y)]
    if len(points) == 1:
      (x, y), = points
      draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
    draw.line(points, fill=colour, width=2)
    if len(series) > 1:
      draw.rectangle([legend_x, 8, legend_x + 10, 18], fill=colour)
      text((legend_x + 14, 5), label, colour=(0, 0, 0))
      legend_x += 24 + draw.textlength(label, font=font)
  return np.asarray(im)


def loss_charts(records) -> list[tuple[str, np.ndarray]]:
  """(title, chart) per logged quantity of a loss.jsonl: `loss` first, then the aux terms.

  Numbered terms (area0, area1, ...) share one chart, in SERIES_COLOURS order. These are
  network channels, not the overlays' labels (which are relabelled per group), so they
  deliberately do not use the label palette.
  """
  steps = [r['step'] for r in records]
  panels = {}
  for key in records[0]:
    if key in ('step', 'epoch'):
      continue
    match = re.fullmatch(r'(.*?)(\d+)', key)
    panels.setdefault(match.group(1) if match else key, []).append(key)
  charts = []
  for name, keys in sorted(panels.items(), key=lambda kv: kv[0] != 'loss'):
    series = [(key, SERIES_COLOURS[i % len(SERIES_COLOURS)], steps,
               [float(r.get(key, math.nan)) for r in records]) for i, key in enumerate(keys)]
    charts.append((name, line_chart(series, title=name)))
  return charts


def png_data_uri(image, max_side=THUMBNAIL_SIDE) -> str:
  """A base64 PNG data URI of a uint8 image (or PIL image), shrunk to `max_side` (None:
  kept as it is)."""
  im = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, np.uint8))
  if max_side is not None and max(im.size) > max_side:
    scale = max_side / max(im.size)
    im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))),
                   Image.LANCZOS)
  buf = io.BytesIO()
  im.save(buf, format='PNG')
  return 'data:image/png;base64,' + base64.b64encode(buf.getvalue()).decode('ascii')


class _InputFinder:
  """Input groups (images and ground truth) named like the run's output groups.

  They come from config.data.root, or the built-in demo data in the work directory; a
  problem (data moved since the run) becomes a note in the report, not a failure.
  """

  def __init__(self, workdir, config):
    root = (config.get('data') or {}).get('root') or os.path.join(workdir, _DEMO_DIR)
    self._paths, self.problem = {}, None
    try:
      self._paths = {data.group_name(p): p for p in data.find_groups(root)}
    except InputError as e:
      self.problem = str(e)

  def group(self, name):
    """(data.Group or None, note or None)."""
    if name not in self._paths:
      return None, self.problem or f'input images of group {name} not found'
    try:
      return data.load_group(self._paths[name]), None
    except InputError as e:
      return None, str(e)


def _group_names(workdir, metrics):
  """Groups in metrics.json order, then other output folders of the work directory."""
  names = list(((metrics or {}).get('groups') or {}))
  for entry in sorted(os.listdir(workdir)):
    folder = os.path.join(workdir, entry)
    if (entry not in names and entry != _DEMO_DIR and not entry.startswith('.')
        and any(os.path.exists(os.path.join(folder, f)) for f in ('overlays', 'loss.jsonl'))):
      names.append(entry)
  return names


def _facts(workdir, config, metrics):
  """Method, backbones and weights, data: the non-numeric entries of metrics.json."""
  rows = [(k, v) for k, v in _flatten({k: v for k, v in (metrics or {}).items()
                                       if k not in ('groups', 'mean')})
          if not isinstance(v, float)]
  data_cfg = config.get('data') or {}
  rows += [('data', data_cfg.get('root') or f'built-in demo ({os.path.join(workdir, _DEMO_DIR)})'),
           ('image size', data_cfg.get('image_size')), ('seed', config.get('seed')),
           ('baseline', config.get('baseline'))]
  if config.get('baseline') == 'none':
    train_cfg = config.get('train') or {}
    rows.append(('steps', train_cfg['steps']) if train_cfg.get('steps')
                else ('epochs', train_cfg.get('epochs')))
  return _table(['', ''], [[_esc(k), _esc(v)] for k, v in rows if v is not None], css='facts')


def _results(metrics):
  """One row per group with its numeric scalars, then the mean row of metrics.json."""
  groups = metrics['groups']
  keys = list(dict.fromkeys(k for g in groups.values() for k, v in g.items()
                            if isinstance(v, (int, float)) and not isinstance(v, bool)))
  keys.sort(key=_metric_order)
  rows = [[_esc(n)] + [_cell(g.get(k)) for k in keys] for n, g in groups.items()]
  mean = metrics.get('mean') or {}
  rows.append(['mean'] + [_cell(mean.get(k)) if k in mean else '' for k in keys])
  return _table(['group'] + keys, rows, sum_rows=1)


def _metric_order(key):
  return _FIRST_METRICS.index(key) if key in _FIRST_METRICS else len(_FIRST_METRICS)


def _is_multiclass(group_metrics):
  return isinstance(group_metrics, dict) and {'images', 'class_iou'} <= set(group_metrics)


def k_chart(estimate) -> np.ndarray:
  """The criterion per K of an estimated K (metrics.json's num_classes_estimated entry)."""
  ks = sorted(int(k) for k in estimate['loss_per_k'])
  values = [float(estimate['loss_per_k'][str(k)]) for k in ks]
  return line_chart([('loss', SERIES_COLOURS[0], ks, values)], x_label='K',
                    title=f'{estimate["criterion"]}: K = {estimate["num_classes"]}')


def _group_section(workdir, name, group_metrics, inputs, method, estimate=None, taps=None):
  folder = os.path.join(workdir, name)
  group, note = inputs.group(name)
  class_names = group.class_names if group else ()
  parts = [f'<h2>Group {_esc(name)}</h2>']
  if estimate:
    parts.append(f'<h3>Estimated K = {int(estimate["num_classes"])}</h3>'
                 f'<img alt="K criterion" src="{png_data_uri(k_chart(estimate), max_side=None)}">')
  if taps:  # metrics.json's cluster_taps_chosen entry
    losses = ', '.join(f'{_esc(t)} {float(l):.4f}' for t, l in taps['loss_per_taps'].items())
    parts.append(f'<p>Clustered on {_esc(taps["cluster_taps"])} (co-attention loss of each '
                 f'candidate\'s partition: {losses}).</p>')
  # Other methods' group metrics are flat scalars, all in the results table already.
  if _is_multiclass(group_metrics):
    parts.append('<h3>Metrics</h3>' + _multiclass_table(group_metrics, class_names))
  records = _read_jsonl(os.path.join(folder, 'loss.jsonl'))
  if records:
    parts.append('<h3>Training loss</h3><div class="charts">' + ''.join(
        f'<img alt="{_esc(title)} curve" src="{png_data_uri(chart, max_side=None)}">'
        for title, chart in loss_charts(records)) + '</div>')
  overlay_dir = os.path.join(folder, 'overlays')
  stems = sorted(os.path.splitext(n)[0] for n in os.listdir(overlay_dir)
                 if n.endswith('.png')) if os.path.isdir(overlay_dir) else []
  if stems:
    parts.append('<h3>Images</h3>')
    if note:
      parts.append(f'<p class="note">Inputs not shown: {_esc(note)}</p>')
    if len(stems) > MAX_IMAGES_PER_GROUP:
      parts.append(f'<p class="note">Showing {MAX_IMAGES_PER_GROUP} of {len(stems)} images; '
                   f'all overlays are in {_esc(overlay_dir)}.</p>')
    samples = {s.stem: s for s in group.samples} if group else {}
    image_records = {r.get('name'): r for r in (group_metrics or {}).get('images', [])
                     if isinstance(r, dict)}
    for stem in stems[:MAX_IMAGES_PER_GROUP]:
      parts.append(_image_row(stem, os.path.join(overlay_dir, f'{stem}.png'), samples.get(stem),
                              image_records.get(stem), class_names, method))
  return '\n'.join(parts)


def _image_row(stem, overlay_path, sample, record, class_names, method):
  """Input | ground truth | prediction of one image, captioned with its scores."""
  figures = []
  if sample is not None:
    figures.append(_figure(sample.image, 'input'))
    truth = _truth_overlay(sample, class_names, method)
    if truth is not None:
      figures.append(_figure(truth, 'ground truth'))
  with Image.open(overlay_path) as im:
    figures.append(_figure(im.convert('RGB'), 'prediction'))
  scores = ' · '.join(f'{_esc(k)} {v:.3f}' for k, v in sorted((record or {}).items(),
                                                              key=lambda kv: _metric_order(kv[0]))
                      if isinstance(v, float))
  caption = _esc(stem) + (f' <span style="font-weight:400">· {scores}</span>' if scores else '')
  return (f'<div class="row"><div class="cap">{caption}</div>'
          f'<div class="cols">{"".join(figures)}</div></div>')


def _truth_overlay(sample, class_names, method):
  if method == 'instance' and sample.instances:
    return visualize.overlay(sample.image,
                             visualize.instance_labels(sample.instances, sample.image.shape[:2]))
  if sample.mask is not None:
    return visualize.overlay(sample.image, sample.mask, names=class_names)
  return None


def _figure(image, caption):
  return (f'<figure><img alt="{_esc(caption)}" src="{png_data_uri(image)}">'
          f'<figcaption>{_esc(caption)}</figcaption></figure>')


def _multiclass_table(g, class_names):
  """P, J and IoU per label for every image, then the group mean and pooled rows."""
  num_labels = len(g['class_iou'])
  names = ['background'] + [class_names[k - 1] if k <= len(class_names) else str(k)
                            for k in range(1, num_labels)]
  header = ['image', 'P', 'J'] + [f'IoU {n}' for n in names]
  rows = [[_esc(im['name']), _num(im['P']), _num(im['J'])] + [_num(v) for v in im['iou']]
          for im in g['images']]
  rows.append(['group mean', _num(g['P']), _num(g['J'])] + [''] * num_labels)
  rows.append(['group pooled', '', _num(g['J_pooled'])] + [_num(v) for v in g['class_iou']])
  mapping = (f'<p>Predicted label → ground-truth class (Hungarian, per group): '
             f'{_esc(g["mapping"])}</p>' if 'mapping' in g else '')
  return _table(header, rows, sum_rows=2) + mapping


def _cell(v):
  """A results cell: counts as they are, everything else as a metric."""
  if isinstance(v, int):
    return f'<td class="num">{v}</td>'
  return _num(v)


def _num(v):
  """A metric cell: 3 decimals, the full value on hover, a bar for values in [0, 1]."""
  if v is None or (isinstance(v, float) and math.isnan(v)):
    return '<td class="num">–</td>'
  bar = ''
  if 0.0 <= v <= 1.0:
    pct = f'{100 * v:.1f}%'
    bar = f' style="background:linear-gradient(90deg,#d6e6fa {pct},transparent {pct})"'
  return f'<td class="num" title="{v!r}"{bar}>{v:.3f}</td>'


def _table(header, rows, *, sum_rows=0, css=''):
  """`rows` cells are HTML: plain text or a ready `<td ...>` (from _num)."""
  def td(cell):
    return cell if str(cell).startswith('<td') else f'<td>{cell}</td>'

  head = ''.join(f'<th>{_esc(h)}</th>' for h in header)
  head = f'<tr>{head}</tr>' if any(header) else ''
  body = ''.join(f'<tr{" class=sum" if i >= len(rows) - sum_rows else ""}>'
                 + ''.join(td(c) for c in row) + '</tr>' for i, row in enumerate(rows))
  return f'<table class="{css}">{head}{body}</table>'


def _flatten(d, prefix=''):
  for k, v in d.items():
    if isinstance(v, dict):
      yield from _flatten(v, f'{prefix}{k}.')
    else:
      yield f'{prefix}{k}', v


def _range(lo, hi, pad):
  if hi - lo < 1e-12:
    lo, hi = lo - 0.5, hi + 0.5
  margin = (hi - lo) * pad
  return lo - margin, hi + margin


def _ticks(lo, hi, target=5):
  """Round tick values (1, 2 or 5 times a power of ten apart) inside [lo, hi]."""
  raw = (hi - lo) / target
  magnitude = 10 ** math.floor(math.log10(raw))
  step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
  first = math.ceil(lo / step) * step
  return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def _read_json(path):
  if not os.path.isfile(path):
    return None
  with open(path, encoding='utf-8') as f:
    return json.load(f)


def _read_jsonl(path):
  """Records of a JSONL log; a last line cut short (a killed run) is left out."""
  if not os.path.isfile(path):
    return []
  with open(path, encoding='utf-8') as f:
    lines = [line for line in f if line.strip()]
  records = []
  for i, line in enumerate(lines):
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError:
      if i < len(lines) - 1:
        raise
  return records


def _tail(path, n):
  if not os.path.isfile(path):
    return ''
  with open(path, encoding='utf-8', errors='replace') as f:
    return ''.join(f.readlines()[-n:])


def _esc(v):
  """HTML-escaped text; a file name that is not valid UTF-8 shows its bytes as \\xNN."""
  return html.escape(errors.escape_surrogates(str(v)))
