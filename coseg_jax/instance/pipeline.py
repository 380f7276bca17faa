"""DeepCO3 instance co-segmentation (SPEC §4): one model per image group (= category).

Per group: saliency prior -> train DeepCO3 (backbone fine-tuned, head from zero) ->
instance peaks of each image's small score map -> peak response maps -> proposals
ranked per peak (Eq. 7) -> mask NMS -> group-level percentile filter. Masks and the
maps that rank them live at each image's original resolution, as in the authors'
RunInstMaskGen.m (network maps resized bilinearly, proposals nearest).

`config.baseline == 'saliency'` is SPEC §6(b): the prior's foreground (its split at the
mean, redrawn by the CRF), one instance per connected component scored by the prior's
mass inside, components wider than the group's typical one cut side by side
(`baseline.group_components`), no training.
Both are scored by the same code: mAP^r and CorLoc^r per group and their means, and
the quality of the candidate masks (proposals, or the baseline's components).
"""
import dataclasses
import functools
import logging
import os
import time
from typing import Callable

import jax
import numpy as np

from coseg_jax.backbones import weights
from coseg_jax.core import config as defaults
from coseg_jax.core import crf
from coseg_jax.core import data
from coseg_jax.core import demo
from coseg_jax.core import errors
from coseg_jax.core import fileio
from coseg_jax.core import progress
from coseg_jax.core import saliency
from coseg_jax.core import train
from coseg_jax.core import visualize
from coseg_jax.core.errors import InputError
from coseg_jax.instance import baseline
from coseg_jax.instance import metrics as instance_metrics
from coseg_jax.instance import model as deepco3
from coseg_jax.instance import prm
from coseg_jax.instance import proposals

log = logging.getLogger('coseg_jax')

BASELINES = ('none', 'saliency')
# The deepest feature each backbone has: the paper's relu6 (fc6 as a conv) is not in
# the Keras notop VGG16, so its deepest conv stands in (SPEC §2).
FEATURE_TAPS = {'vgg16': 'conv5_3', 'resnet50': 'layer4', 'efficientnet_lite0': 'head'}


def feature_tap(requested, backbone, table=None, field='model.feature'):
  """The backbone tap the model reads: config.model.feature, 'auto' -> FEATURE_TAPS."""
  if requested == 'auto':
    return (table or FEATURE_TAPS)[backbone.name]
  if requested not in backbone.tap_info():
    raise InputError(f'config.{field}: {backbone.name} has no tap {requested!r} '
                     f'({", ".join(backbone.tap_info())})')
  return requested


@dataclasses.dataclass(frozen=True)
class Network:
  """The DeepCO3 model and its initial params (zero head), built once per run.

  `prm_score` is the score function of the model's peak back-propagation twin; one
  object for the whole run, as is `trainer`, so that the compiled PRM code and training
  step are reused by every group.
  """
  model: deepco3.DeepCO3
  prm_score: Callable
  params: dict
  frozen: dict  # the backbone's non-trainable collections
  trainer: train.Trainer


def build_network(config, backbone, backbone_vars):
  """DeepCO3 on `backbone`'s config.model.feature tap, with a zero-initialised head."""
  tap = feature_tap(config.model.feature, backbone)
  model = deepco3.DeepCO3(deepco3.BackboneFeatures(backbone, tap), l2_eps=config.model.l2_eps)
  params = {'backbone': backbone_vars['params'],
            'head': deepco3.init_head(backbone.tap_info()[tap][1])}
  frozen = {k: v for k, v in backbone_vars.items() if k != 'params'}
  loss = functools.partial(deepco3.deepco3_loss, model=model,
                           weights=deepco3.LossWeights.from_config(config))
  return Network(model, model.with_peak_backprop().score, params, frozen,
                 train.Trainer(loss, train.TrainConfig.from_config(config)))


def descriptor_fn(config, backbone, backbone_vars):
  """`features(images) -> [hxwxC]`: the frozen ImageNet backbone's config.saliency.ddt_tap
  descriptors of each image resized to data.image_size (the 'ddt_mbd' prior's input)."""
  tap = feature_tap(config.saliency.ddt_tap, backbone, saliency.DDT_TAPS, 'saliency.ddt_tap')
  extract = jax.jit(lambda v, x: backbone.apply(v, x, taps=(tap,))[tap])

  def features(images):
    x = data.resize_batch(images, config.data.image_size)
    return [np.asarray(extract(backbone_vars, x[i:i + 1]))[0] for i in range(len(x))]
  return features


@functools.partial(jax.jit, static_argnums=0)
def _score_and_saliency(model, params, frozen, image01_BxSxSx3):
  out = model(params, frozen, image01_BxSxSx3)
  return out['score'], out['sal_full']


def predict_maps(model, params, frozen, images_NxSxSx3, batch_size):
  """(score Nxhxw, full-resolution saliency NxSxS) in fixed-size batches (one compile)."""
  out = train.predict_in_batches(functools.partial(_score_and_saliency, model, params, frozen),
                                 images_NxSxSx3, batch_size)
  return np.stack([score for score, _ in out]), np.stack([sal for _, sal in out])


def bbox_xywh(mask_HxW):
  """[x, y, width, height] of the mask's pixels."""
  ys, xs = np.nonzero(mask_HxW)
  return [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]


def candidate_masks(config, sample, components_KxHxW):
  """The masks Eq. 7 chooses from: the configured proposals and, with
  `proposals.prior_components`, the image's instances of the saliency baseline
  (`components_KxHxW`, `baseline.group_components`), which follow a person's outline where
  the superpixel grouping merges the person with the ground (BUILD.md, real photographs)."""
  props = proposals.proposals_for(config.proposals, sample.stem, sample.image)
  if config.proposals.prior_components:
    props = np.concatenate([props, components_KxHxW])
  return props


def detections(config):
  """`rank.detections` resolved: 'auto' is 'candidates' when Eq. 7 ranks the baseline's
  instances alone (proposals.source='none'), else 'peaks'."""
  if config.rank.detections != 'auto':
    return config.rank.detections
  return 'candidates' if config.proposals.source == 'none' else 'peaks'


def detect_image(config, prm_score, params_and_frozen, image_1xSxSx3, score_hxw, sal_SxS, sample,
                 components_KxHxW):
  """DeepCO3 on one image: (masks by score, scores, candidate masks, number of peaks) at
  its size.

  `prm_score` and `params_and_frozen` are the `apply_fn` and `params` of
  `prm.peak_response_maps`; `components_KxHxW` are the image's saliency baseline instances
  at its size (None without `proposals.prior_components`).
  """
  shape_hw = sample.image.shape[:2]
  peaks = [(y, x) for y, x in deepco3.instance_peaks(score_hxw)
           if score_hxw[y, x] > config.rank.peak_min_score]
  if not peaks:  # nothing salient: the image's strongest peak stands in
    peaks = [tuple(int(v) for v in np.unravel_index(np.argmax(score_hxw), score_hxw.shape))]
  maps = prm.peak_response_maps(prm_score, params_and_frozen, image_1xSxSx3, peaks)
  props = candidate_masks(config, sample, components_KxHxW)
  r = config.rank
  masks, scores = proposals.select_instances(
      data.resize_probs(maps, shape_hw, axis=0), data.resize_probs(sal_SxS[None], shape_hw, axis=0)[0], props,
      inside_weight=r.inside_weight, background_penalty=r.background_penalty, nms_iou=r.nms_iou,
      contour_width=r.contour_width, reference_area=r.reference_area,
      detections=detections(config))
  return masks, scores, props, len(peaks)


def detect_group(config, group, priors, net, group_dir):
  """Per image (masks by score, scores) and the candidate masks they were chosen from.

  `net` is the run's Network (None for the saliency baseline).
  """
  quiet = config.output.quiet
  components = [(None, None)] * len(priors)
  if config.baseline == 'saliency' or config.proposals.prior_components:
    started = time.time()
    sal = config.saliency
    crf_cfg = sal.crf if sal.refine == 'crf' else None
    foregrounds = [saliency.foreground(s.image, p, crf_cfg, sal.crf_floor)
                   for s, p in zip(group.samples, priors)]
    components = baseline.group_components(priors, foregrounds, sal.split)
    log.info('%s: saliency foreground (refine %s, split %s) in %.1fs', group.name, sal.refine,
             sal.split, time.time() - started)
  if config.baseline == 'saliency':
    return [m for m, _ in components], [s for _, s in components], [m for m, _ in components]
  size = config.data.image_size
  images = data.resize_batch([s.image for s in group.samples], size)
  small_priors = np.stack([data.resize_probs(p[..., None], (size, size))[..., 0] for p in priors])
  started = time.time()
  in_dir = lambda name: None if group_dir is None else os.path.join(group_dir, name)
  params, history = net.trainer.fit(
      net.params, net.frozen, {'image': images, 'prior': small_priors},
      ckpt_dir=in_dir('checkpoints'), log_path=in_dir('loss.jsonl'), quiet=quiet,
      desc=f'train {group.name}')
  if history:
    log.info('%s: trained in %.0fs; last step %s', group.name, time.time() - started,
             ', '.join(f'{k} {v:.4g}' for k, v in history[-1].items() if k not in ('step', 'epoch')))
  started = time.time()
  score_Nxhxw, sal_NxSxS = predict_maps(net.model, params, net.frozen, images, config.data.batch_size)
  masks, scores, candidates, num_peaks = [], [], [], []
  for i, sample in enumerate(progress.bar(group.samples, desc=f'instances {group.name}', quiet=quiet)):
    m, s, props, k = detect_image(config, net.prm_score, (params, net.frozen), images[i:i + 1],
                                  score_Nxhxw[i], sal_NxSxS[i], sample, components[i][0])
    masks.append(m)
    scores.append(s)
    candidates.append(props)
    num_peaks.append(k)
  log.info('%s: %.1f peaks and %.0f candidate masks per image, detected in %.0fs', group.name,
           np.mean(num_peaks), np.mean([len(c) for c in candidates]), time.time() - started)
  keep = proposals.drop_low_scores(scores, config.rank.drop_percentile)
  return [m[k] for m, k in zip(masks, keep)], [s[k] for s, k in zip(scores, keep)], candidates


def score_group(name, masks, scores, candidates, gts):
  """Flat scalars of one group (category): mAP^r at each IoU, CorLoc^r, candidate quality."""
  dets = [list(zip(m, s)) for m, s in zip(masks, scores)]
  ap = instance_metrics.map_r({name: dets}, {name: gts})['per_category'][name]
  quality = proposals.proposal_quality(candidates, gts)
  out = {f'mAP_r@{t}': v for t, v in ap.items()}
  out.update({'CorLoc_r': instance_metrics.corloc(dets, gts),
              'proposal_recall@0.5': quality['recall@0.5'], 'proposal_abo': quality['abo'],
              'gt_instances': quality['num_gt'], 'detections': int(sum(len(s) for s in scores))})
  # A group without any GT instance has no AP: null in metrics.json, not NaN.
  return {k: None if isinstance(v, float) and np.isnan(v) else v for k, v in out.items()}


def summarize(groups):
  """Means over groups (each category weighs the same; groups without a value left out)."""
  keys = [k for k in next(iter(groups.values())) if k not in ('gt_instances', 'detections')]
  mean = {}
  for k in keys:
    values = [g[k] for g in groups.values() if g[k] is not None]
    mean[k] = float(np.mean(values)) if values else None
  return {'groups': groups, 'mean': mean}


def format_table(summary):
  """Fixed-width table: one row per group, then the mean."""
  cols = ('mAP_r@0.25', 'mAP_r@0.5', 'mAP_r@0.75', 'CorLoc_r', 'proposal_recall@0.5', 'proposal_abo')
  heads = ('AP@.25', 'AP@.5', 'AP@.75', 'CorLoc', 'prop R@.5', 'prop ABO')
  width = max([len('mean')] + [len(n) for n in summary['groups']])
  fmt = lambda v: f'{"-":>9}' if v is None else f'{v:9.3f}'
  lines = [f'{"group":{width}} {"GT":>4} {"dets":>5}' + ''.join(f' {h:>9}' for h in heads)]
  for name, g in summary['groups'].items():
    lines.append(f'{name:{width}} {g["gt_instances"]:4d} {g["detections"]:5d}'
                 + ''.join(f' {fmt(g[c])}' for c in cols))
  lines.append(f'{"mean":{width}} {"":4} {"":5}' + ''.join(f' {fmt(summary["mean"][c])}' for c in cols))
  return '\n'.join(lines)


def check_config(config):
  """Every field of the method's config, before anything is built or written (bin/run.py
  calls it before touching the work directory); problems are one-line InputErrors."""
  defaults.check_shared(config)
  r = functools.partial(errors.check_range, config)
  r('model.l2_eps', 0, above=True)
  for field in ('copeak_weight', 'affinity_weight', 'saliency_weight'):
    r(f'loss.{field}', 0)
  r('loss.affinity_alpha', 0, above=True)
  r('proposals.min_area', 0, 1)
  r('proposals.max_area', config.proposals.min_area, 1, above=True)
  r('rank.inside_weight', 0, 1)
  r('rank.background_penalty', 0)
  r('rank.nms_iou', 0, 1, above=True)
  r('rank.contour_width', 1, integer=True)
  r('rank.reference_area', 0)
  r('rank.drop_percentile', 0, 100)
  errors.check_one_of('baseline', config.baseline, BASELINES)
  errors.check_one_of('saliency.prior', config.saliency.prior, saliency.PRIORS)
  errors.check_one_of('saliency.refine', config.saliency.refine, saliency.REFINES)
  errors.check_one_of('saliency.split', config.saliency.split, baseline.SPLITS)
  r('saliency.crf_floor', 0, 0.5, below=True)
  crf.check_fields(config, 'saliency.crf')
  errors.check_one_of('proposals.source', config.proposals.source, proposals.SOURCES)
  errors.check_one_of('rank.detections', config.rank.detections, ('auto',) + proposals.DETECTIONS)
  folders = [('saliency', config.saliency.prior == 'folder')]
  if config.baseline == 'none':
    folders.append(('proposals', config.proposals.source == 'folder'))
    if config.proposals.source == 'none' and not config.proposals.prior_components:
      raise InputError('config.proposals.source: none leaves Eq. 7 no candidates unless '
                       'config.proposals.prior_components is True')
    if config.data.batch_size < 2 or config.data.batch_size % 2:
      raise InputError(f'config.data.batch_size: DeepCO3 pairs image i with i + B/2, so the '
                       f'batch size must be even and at least 2 (got {config.data.batch_size})')
  for section, used in folders:
    folder = config[section].folder
    if used and not (folder and os.path.isdir(folder)):
      raise InputError(f'{folder}: {section} folder does not exist (config.{section}.folder)')


def detect_groups(config, groups, workdir=None):
  """DeepCO3 (or the baseline) on in-memory groups (`data.Group`):
  (summary, {group name: (masks per image, scores per image)}).

  bin/run.py and the Python API (coseg_jax.instances) both come here. With a work
  directory each group's checkpoints, loss log and detections go to workdir/<group>;
  without one nothing is written.
  """
  net = features = None
  summary = {'method': 'DeepCO3', 'saliency_prior': config.saliency.prior, 'backbone': None,
             'proposals': config.proposals.source}
  if config.baseline == 'none' or config.saliency.prior == 'ddt_mbd':
    backbone, backbone_vars = weights.load_backbone(
        weights.resolve_name(config.model.backbone, 'encoder', config.weights), config.weights)
  if config.saliency.prior == 'ddt_mbd':
    features = descriptor_fn(config, backbone, backbone_vars)
    summary['saliency_backbone'] = {'name': backbone.name, 'weights': backbone.source,
                                    'feature': feature_tap(config.saliency.ddt_tap, backbone,
                                                           saliency.DDT_TAPS, 'saliency.ddt_tap')}
  if config.baseline == 'saliency':
    summary.update(method='saliency baseline', proposals='connected components of the prior')
  else:
    net = build_network(config, backbone, backbone_vars)
    tap = net.model.features.tap
    summary['backbone'] = {'name': backbone.name, 'weights': backbone.source, 'feature': tap}
    log.info('backbone: %s (feature %s) <- %s', backbone.name, tap, backbone.source)

  results, outputs = {}, {}
  for group in groups:
    group_dir = None if workdir is None else os.path.join(workdir, group.name)
    log.info('group %s: %d images, method %s', group.name, len(group.samples), summary['method'])
    started = time.time()
    priors = saliency.saliency_prior(config.saliency, group, features)
    log.info('%s: saliency prior (%s) in %.1fs', group.name, config.saliency.prior, time.time() - started)
    masks, scores, candidates = detect_group(config, group, priors, net, group_dir)
    gts = [s.instances for s in group.samples]
    if all(g is not None for g in gts):
      results[group.name] = score_group(group.name, masks, scores, candidates, gts)
    if group_dir is not None:
      _write_group(config, group, masks, scores, group_dir)
    outputs[group.name] = (masks, scores)

  if results:
    summary.update(summarize(results))
    log.info('\n%s', format_table(summary))
  else:
    summary['groups'] = {}
    log.info('no ground-truth instances found: predictions written, nothing scored')
  return summary, outputs


def run(config, workdir, start=None):
  """Every group read and validated, then `start(groups)` (cli.main: checks names and the
  fingerprint, writes config.json; returns the work directory to write into), then work."""
  check_config(config)
  min_images = 1 if config.baseline == 'saliency' else config.data.batch_size
  # Every group is read and validated before anything trains.
  groups = [data.load_group(path, need='none', min_images=min_images)
            for path in demo.group_paths(config, workdir)]
  if start is not None:
    workdir = start(groups)
  summary, _ = detect_groups(config, groups, workdir)
  fileio.atomic_write_json(os.path.join(workdir, 'metrics.json'), summary)
  return summary


def _write_group(config, group, masks, scores, group_dir):
  """detections.json always; with config.output.images also instance label PNGs
  (0 background, 1..n by score rank), one binary PNG per instance, overlays and a
  contact sheet (input | ground truth | prediction)."""
  images = config.output.images
  records, rows = [], []
  for sample, m, s in zip(group.samples, masks, scores):
    instances = []
    for rank, (mask, score) in enumerate(zip(m, s), 1):
      inst = {'rank': rank, 'score': float(score), 'bbox_xywh': bbox_xywh(mask),
              'area': int(mask.sum())}
      if images:
        inst['mask'] = os.path.join('masks', f'{sample.stem}_{rank}.png')
        fileio.save_png(os.path.join(group_dir, inst['mask']), mask.astype(np.uint8) * 255)
      instances.append(inst)
    record = {'image': sample.image_path, 'stem': sample.stem, 'height': sample.image.shape[0],
              'width': sample.image.shape[1], 'instances': instances}
    if images:
      record['labels'] = os.path.join('instances', f'{sample.stem}.png')
      visualize.save_label_png(os.path.join(group_dir, record['labels']),
                               visualize.instance_labels(m, sample.image.shape[:2]))
      pred = visualize.instance_overlay(sample.image, m, s)
      fileio.save_png(os.path.join(group_dir, 'overlays', f'{sample.stem}.png'), pred)
      truth = None
      if sample.instances is not None:
        truth = visualize.overlay(sample.image,
                                  visualize.instance_labels(sample.instances, sample.image.shape[:2]))
      rows.append([sample.image, truth, pred])
    records.append(record)
  fileio.atomic_write_json(os.path.join(group_dir, 'detections.json'),
                           {'group': group.name, 'images': records})
  if images:
    fileio.save_png(os.path.join(group_dir, 'contact_sheet.png'), visualize.contact_sheet(
        rows, titles=('input', 'ground truth', 'prediction'),
        row_names=[s.stem for s in group.samples]))
