"""Multi-class co-segmentation metrics (SPEC §3): P and J with one Hungarian matching per group.

Label maps are uint8 HxW: 0 background, 1..K classes; ground-truth pixels labelled 255
are ignored everywhere. Predicted label ids are arbitrary, so each group is scored after
mapping predicted labels to ground-truth classes with the one assignment that maximises the
summed IoU of the group's pooled confusion matrix; every image is then scored with it.

IoU of a class absent from both prediction and ground truth is undefined (None): it is
skipped in per-image and pooled means. An image whose ground truth and prediction are both
all background has J = 1 (nothing to find, nothing found); an image whose ground truth is
255 everywhere has no score (P = J = None, named in the group's 'unscored'), and a group of
only such images says so in its 'note'. Values are Python floats or None
so the result goes straight into metrics.json.
"""
import numpy as np
from scipy import optimize

from coseg_jax.core import data


def confusion(pred_labels, gt_labels, num_labels):
  """Counts `C[g, p]` of pixels with ground truth g and prediction p, 255 pixels skipped."""
  pred = np.asarray(pred_labels).ravel().astype(np.int64)
  gt = np.asarray(gt_labels).ravel().astype(np.int64)
  if pred.shape != gt.shape:
    raise ValueError(f'prediction {np.shape(pred_labels)} and ground truth '
                     f'{np.shape(gt_labels)} differ in shape')
  keep = gt != data.IGNORE_LABEL
  pred, gt = pred[keep], gt[keep]
  for name, labels in (('prediction', pred), ('ground truth', gt)):
    if labels.size and (labels.min() < 0 or labels.max() >= num_labels):
      raise ValueError(f'{name} has labels outside 0..{num_labels - 1}')
  counts = np.bincount(gt * num_labels + pred, minlength=num_labels * num_labels)
  return counts.reshape(num_labels, num_labels)


def _iou_matrix(conf):
  """IoU[g, p] between ground-truth label g and predicted label p (0 where both are empty)."""
  union = conf.sum(1, keepdims=True) + conf.sum(0, keepdims=True) - conf
  return np.where(union > 0, conf / np.maximum(union, 1), 0.0)


def _class_ious(conf):
  """Diagonal IoU per label of an already-mapped confusion matrix; None where undefined."""
  union = conf.sum(0) + conf.sum(1) - np.diag(conf)
  return [float(i / u) if u else None for i, u in zip(np.diag(conf), union)]


def _mean(values):
  defined = [v for v in values if v is not None]
  return float(np.mean(defined)) if defined else None


def match_labels(preds, gts, num_classes, *, fixed_background=True):
  """One Hungarian matching per group: `mapping[pred_label] = gt_label`, length K+1.

  With fixed_background the method's background channel is known, so predicted 0 stays
  ground-truth 0 and only 1..K are permuted; letting the matcher move background would
  hide a method that confuses objects with background. The clustering baseline has no
  notion of background (cluster ids are arbitrary), so it needs fixed_background=False,
  which lets the matching pick its background cluster too.
  """
  n = num_classes + 1
  conf = sum(confusion(p, g, n) for p, g in zip(preds, gts))
  iou = _iou_matrix(conf)
  first = 1 if fixed_background else 0
  gt_idx, pred_idx = optimize.linear_sum_assignment(iou[first:, first:], maximize=True)
  mapping = np.arange(n)
  mapping[pred_idx + first] = gt_idx + first
  return mapping


def score_group(preds, gts, num_classes, *, fixed_background, names=None):
  """Scores one group; see the module docstring for the conventions.

  Returns a dict with 'images' (per image name, P, J, per-label IoU), 'class_iou' (IoU
  per label 0..K over the pooled group), 'P' and 'J' (means over images), 'J_pooled'
  (mean of class_iou over 1..K) and 'mapping' (predicted label -> ground-truth label).
  """
  if len(preds) != len(gts):
    raise ValueError(f'{len(preds)} predictions for {len(gts)} ground-truth maps')
  n = num_classes + 1
  names = names if names is not None else [f'image{i}' for i in range(len(preds))]
  mapping = match_labels(preds, gts, num_classes, fixed_background=fixed_background)
  images, pooled = [], np.zeros((n, n), np.int64)
  for name, pred, gt in zip(names, preds, gts):
    conf = confusion(mapping[np.asarray(pred)], gt, n)
    pooled += conf
    iou = _class_ious(conf)
    valid = conf.sum()
    j = _mean(iou[1:])
    images.append({
        'name': name,
        'P': float(np.trace(conf) / valid) if valid else None,
        # Nothing to score (every pixel ignored): no score, not a perfect one.
        'J': None if not valid else 1.0 if j is None else j,
        'iou': iou,
    })
  class_iou = _class_ious(pooled)
  unscored = [im['name'] for im in images if im['P'] is None]
  notes = {}
  if unscored:
    notes['unscored'] = unscored
    if len(unscored) == len(images):
      notes['note'] = 'nothing to score: every ground-truth pixel is 255 (ignore)'
  return {**notes,
      'images': images,
      'class_iou': class_iou,
      'P': _mean([im['P'] for im in images]),
      'J': _mean([im['J'] for im in images]),
      'J_pooled': _mean(class_iou[1:]),
      'mapping': mapping.tolist(),
      'fixed_background': fixed_background,
  }


def summarize(groups):
  """Means over groups (each group weighs the same); `groups` maps name -> score_group()."""
  return {
      'groups': dict(groups),
      'mean': {k: _mean([g[k] for g in groups.values()]) for k in ('P', 'J', 'J_pooled')},
  }


def _fmt(value):
  return '     -' if value is None else f'{value:6.3f}'


def format_table(metrics):
  """Fixed-width table of a summarize() result: per image rows, group means, overall mean."""
  groups = metrics['groups']
  num_labels = max((len(g['class_iou']) for g in groups.values()), default=1)
  width = max([len('overall mean')] + [len(im['name']) for g in groups.values()
                                       for im in g['images']])
  iou_head = ''.join(f' {"IoU" + str(k):>6}' for k in range(1, num_labels))
  lines = [f'{"":{width}} {"P":>6} {"J":>6}{iou_head}']
  for name, g in groups.items():
    lines.append(f'[{name}] mapping pred->gt {g["mapping"]}'
                 + (f' ({g["note"]})' if g.get('note') else ''))
    for im in g['images']:
      ious = ''.join(f' {_fmt(v)}' for v in im['iou'][1:])
      lines.append(f'{im["name"]:{width}} {_fmt(im["P"])} {_fmt(im["J"])}{ious}')
    pooled = ''.join(f' {_fmt(v)}' for v in g['class_iou'][1:])
    lines.append(f'{"group mean":{width}} {_fmt(g["P"])} {_fmt(g["J"])}')
    lines.append(f'{"group pooled":{width}} {"":6} {_fmt(g["J_pooled"])}{pooled}')
  m = metrics['mean']
  lines.append(f'{"overall mean":{width}} {_fmt(m["P"])} {_fmt(m["J"])}'
               f'  (pooled J {_fmt(m["J_pooled"]).strip()})')
  return '\n'.join(lines)
