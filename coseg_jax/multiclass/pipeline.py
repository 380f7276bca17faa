"""Multi-class object co-segmentation (thesis method, SPEC §3): one model per image group."""
import dataclasses
import functools
import logging
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from coseg_jax.backbones import weights
from coseg_jax.core import config as defaults
from coseg_jax.core import data
from coseg_jax.core import demo
from coseg_jax.core import errors
from coseg_jax.core import fileio
from coseg_jax.core import progress
from coseg_jax.core import train
from coseg_jax.core import visualize
from coseg_jax.core.errors import InputError
from coseg_jax.multiclass import attention
from coseg_jax.multiclass import baseline
from coseg_jax.multiclass import generator
from coseg_jax.multiclass import losses
from coseg_jax.multiclass import metrics
from coseg_jax.multiclass import postprocess

log = logging.getLogger('coseg_jax')

# Pooled feature of the frozen extractor f.
EXTRACTOR_TAPS = {'resnet50': 'layer4', 'efficientnet_lite0': 'head'}


def maps_loss(extractor, loss_cfg, frozen, x_BxHxWx3, maps_BxHxWxK1):
  """Co-attention loss of co-attention maps: the B*(K+1) masked images (Eq. 1) go
  through the frozen f as one batch."""
  b, h, w, k1 = maps_BxHxWxK1.shape
  masks_BxHxWxK1 = maps_BxHxWxK1
  if loss_cfg.normalize_maps:
    masks_BxHxWxK1 = maps_BxHxWxK1 / (maps_BxHxWxK1.max(axis=(1, 2), keepdims=True) + 1e-6)
  masks_NxHxW = jnp.moveaxis(masks_BxHxWxK1, -1, 1).reshape(b * k1, h, w)
  masked_NxHxWx3 = jnp.repeat(x_BxHxWx3, k1, axis=0) * masks_NxHxW[..., None]
  tap = EXTRACTOR_TAPS[extractor.name]
  feat_NxhxwxD = extractor.apply(frozen, masked_NxHxWx3, taps=(tap,))[tap]
  pooled_NxD = losses.normalize_features(
      losses.pool_features(feat_NxhxwxD, masks_NxHxW, loss_cfg.pooling),
      loss_cfg.feature_norm, loss_cfg.feature_scale)
  return losses.coattention_loss(pooled_NxD.reshape(b, k1, -1))


def loss_fn(gen, extractor, loss_cfg, params, frozen, batch):
  """Co-attention loss of one mini-batch; gradients reach the generator only."""
  maps_BxHxWxK1 = gen.apply({'params': params}, batch['image'])
  loss = maps_loss(extractor, loss_cfg, frozen, batch['image'], maps_BxHxWxK1)
  # Mean soft area per channel: shows collapse (one channel taking everything) in the log.
  area_K1 = maps_BxHxWxK1.mean(axis=(0, 1, 2))
  return loss, {f'area{i}': area_K1[i] for i in range(maps_BxHxWxK1.shape[-1])}


def build_generator(config, encoder, num_classes):
  tap = config.model.encoder_tap
  if tap == 'auto':
    tap = generator.ENCODER_TAPS[encoder.name]
  elif tap not in encoder.tap_info():
    raise InputError(f'config.model.encoder_tap: {encoder.name} has no tap {tap!r} '
                     f'({", ".join(encoder.tap_info())})')
  spec = generator.GeneratorSpec(
      num_classes=num_classes,
      preprocessing=encoder.preprocessing,
      tap=tap,
      attention=attention.AttentionSpec(
          mode=config.model.attention, reduction=config.model.attention_reduction,
          mutual_scale_power=config.model.mutual_scale_power))
  return generator.Generator(spec, encoder=encoder.module)


def init_params(gen, encoder_vars, image_size, batch_size, seed):
  x = jnp.zeros((batch_size, image_size, image_size, 3), jnp.float32)
  # Eager init of the encoder takes tens of seconds on CPU; jitted it is one compile.
  params = dict(jax.jit(gen.init)(jax.random.PRNGKey(seed), x)['params'])
  params['encoder'] = weights.merge_params(params['encoder'], encoder_vars['params'],
                                           what='generator encoder')
  return params


@dataclasses.dataclass(frozen=True)
class Model:
  """The generator of one K with its jitted functions, initial params and trainer, built
  once per run and shared by every group of that K, so nothing compiles per group."""
  gen: generator.Generator
  params: dict
  features: Callable  # (params, x_BxSxSx3) -> encoder features at the classifier
  maps: Callable  # (params, x_BxSxSx3) -> co-attention maps BxSxSx(K+1)
  trainer: train.Trainer

  @classmethod
  def build(cls, config, num_classes, encoder, encoder_vars, extractor):
    gen = build_generator(config, encoder, num_classes)
    return cls(
        gen=gen,
        params=init_params(gen, encoder_vars, config.data.image_size, config.data.batch_size,
                           config.seed),
        features=jax.jit(lambda p, x: gen.apply({'params': p}, x, method=gen.features)),
        maps=jax.jit(lambda p, x: gen.apply({'params': p}, x)),
        trainer=train.Trainer(functools.partial(loss_fn, gen, extractor, config.loss),
                              train.TrainConfig.from_config(config)))


def cluster_init(features, params, images_NxSxSx3, num_classes, seed, temperature=10.0):
  """The classifier initialised from k-means of the group's encoder features (BUILD.md).

  logits_k = temperature * <f, c_k> / mean|f| for unit centroids c_k is a soft
  nearest-centroid rule; the cluster owning most image border becomes channel 0.
  `features(params, x_BxSxSx3)` is the generator's encoder output (`Model.features`).
  """
  feats = [np.asarray(features(params, x[None]))[0] for x in images_NxSxSx3]
  centers_K1xC, labels = baseline.kmeans_group(feats, num_classes + 1, seed)
  order = np.arange(num_classes + 1)
  bg = postprocess.border_label(labels, num_classes + 1)
  order[[0, bg]] = order[[bg, 0]]
  mean_norm = np.mean([np.linalg.norm(f, axis=-1).mean() for f in feats])
  kernel_CxK1 = (temperature / mean_norm) * centers_K1xC[order].T
  return dict(params, classifier={'kernel': jnp.asarray(kernel_CxK1[None, None], jnp.float32),
                                  'bias': jnp.zeros((num_classes + 1,), jnp.float32)})


def train_generator(config, model, params, images, extractor_vars, group_dir, desc):
  """Trains one group's generator (resuming from group_dir/checkpoints; group_dir None:
  in memory only)."""
  in_dir = lambda name: None if group_dir is None else os.path.join(group_dir, name)
  params, _ = model.trainer.fit(
      params, extractor_vars, {'image': images}, ckpt_dir=in_dir('checkpoints'),
      log_path=in_dir('loss.jsonl'), quiet=config.output.quiet, desc=desc)
  return params


def group_maps(config, model, params, images, group):
  """Co-attention maps of every image of `group`, resized to its original size; in
  batches of the training size, as mutual attention needs partners."""
  maps = train.predict_in_batches(functools.partial(model.maps, params), images,
                                  config.data.batch_size)
  return [data.resize_probs(m, s.image.shape[:2]) for m, s in zip(maps, group.samples)]


def label_group(config, group, maps):
  """Eq. 8 + argmax or CRF per image, then label 0 = the group's background."""
  pairs = progress.bar(zip(group.samples, maps), total=len(maps), desc=f'infer {group.name}',
                       quiet=config.output.quiet)
  return postprocess.background_by_border(
      [postprocess.labels_from_maps(s.image, m, config.infer) for s, m in pairs], config.num_classes + 1)


def score(config, group, labels):
  """P/J of the group, or None without ground-truth masks."""
  if any(s.mask is None for s in group.samples):
    return None
  return metrics.score_group(labels, [s.mask for s in group.samples], config.num_classes,
                             fixed_background=True, names=[s.stem for s in group.samples])


def segment_group(config, group, model, extractor, extractor_vars, group_dir):
  """Soft maps (HxWx(K+1), original size) for every image of `group`; `model` is the
  run's `Model` (None for the baseline)."""
  images = data.resize_batch([s.image for s in group.samples], config.data.image_size)
  if config.baseline == 'cluster':
    return baseline.cluster_baseline(
        extractor, extractor_vars, images, [s.image.shape[:2] for s in group.samples],
        config.num_classes, config.seed, tap=EXTRACTOR_TAPS[extractor.name])
  params = model.params
  if config.model.classifier_init == 'cluster':
    params = cluster_init(model.features, params, images, config.num_classes, config.seed)
  params = train_generator(config, model, params, images, extractor_vars, group_dir,
                           desc=f'train {group.name}')
  return group_maps(config, model, params, images, group)


def check_config(config):
  """Every field of the method's config, before anything is built or written (bin/run.py
  calls it before touching the work directory); problems are one-line InputErrors."""
  defaults.check_shared(config)
  r = functools.partial(errors.check_range, config)
  r('num_classes', 1, integer=True)
  r('model.attention_reduction', 1, integer=True)
  r('model.mutual_scale_power')
  r('loss.feature_scale', 0, above=True)
  r('infer.crf.iterations', 0, integer=True)
  for field in ('gaussian_sxy', 'bilateral_sxy', 'bilateral_srgb', 'unary_power'):
    r(f'infer.crf.{field}', 0, above=True)  # a zero std makes the CRF divide by zero
  for field in ('gaussian_compat', 'bilateral_compat'):
    r(f'infer.crf.{field}', 0)
  errors.check_one_of('baseline', config.baseline, ('none', 'cluster'))
  errors.check_one_of('model.attention', config.model.attention, attention.MODES)
  errors.check_one_of('model.classifier_init', config.model.classifier_init, ('random', 'cluster'))
  errors.check_one_of('loss.pooling', config.loss.pooling, ('masked', 'global'))
  errors.check_one_of('loss.feature_norm', config.loss.feature_norm, ('l2', 'none'))
  errors.check_one_of('infer.method', config.infer.method, postprocess.METHODS)
  if config.data.batch_size < 2:
    # The co-attention loss compares pairs of images (and mutual attention needs them).
    raise InputError(f'config.data.batch_size: the co-attention loss needs at least 2 images '
                     f'per mini-batch, got {config.data.batch_size}')


@dataclasses.dataclass
class GroupOutput:
  """What the method gives for one group: soft maps (HxWx(K+1), original size, before
  Eq. 8), label maps (0 = background), and P/J when the group has masks."""
  maps: list
  labels: list
  scores: dict | None


def cosegment_groups(config, groups, workdir=None):
  """The method on in-memory groups (`data.Group`): (summary, {group name: GroupOutput}).

  bin/run.py and the Python API (coseg_jax.cosegment) both come here. With a work
  directory, each group's checkpoints, loss log and (config.output.images) pictures go to
  workdir/<group>; without one nothing is written.
  """
  k = config.num_classes
  extractor, extractor_vars = weights.load_backbone(
      weights.resolve_name(config.model.extractor, 'extractor', config.weights), config.weights)
  encoder, encoder_vars = weights.load_backbone(
      weights.resolve_name(config.model.encoder, 'encoder', config.weights), config.weights)
  backbones_used = {'encoder': {'name': encoder.name, 'weights': encoder.source},
                    'extractor': {'name': extractor.name, 'weights': extractor.source}}
  log.info('encoder: %s <- %s', encoder.name, encoder.source)
  log.info('extractor: %s <- %s', extractor.name, extractor.source)
  method = 'clustering baseline' if config.baseline == 'cluster' else f'co-attention ({config.model.attention})'

  model = None
  if config.baseline == 'none':
    model = Model.build(config, k, encoder, encoder_vars, extractor)
  results, outputs = {}, {}
  for group in groups:
    group_dir = None if workdir is None else os.path.join(workdir, group.name)
    log.info('group %s: %d images, method %s, inference %s', group.name, len(group.samples),
             method, config.infer.method)
    maps = segment_group(config, group, model, extractor, extractor_vars, group_dir)
    labels = label_group(config, group, maps)
    scores = score(config, group, labels)
    if scores is not None:
      results[group.name] = scores
    if config.output.images and group_dir is not None:
      _write_group_images(group, labels, scores, group_dir)
    outputs[group.name] = GroupOutput(maps, labels, scores)

  summary = {'method': method, 'backbones': backbones_used, 'num_classes': k,
             'inference': config.infer.method, 'groups': {}}
  if results:
    summary.update(metrics.summarize(results))
    log.info('\n%s', metrics.format_table(summary))
  else:
    log.info('no ground-truth masks found: predictions written, nothing scored')
  return summary, outputs


def run(config, workdir):
  check_config(config)
  # Every group is read and validated before anything trains: a bad file in the last
  # group must not cost the training of the first ones.
  groups = [data.load_group(path, num_classes=config.num_classes, min_images=config.data.batch_size)
            for path in demo.group_paths(config, workdir)]
  summary, _ = cosegment_groups(config, groups, workdir)
  fileio.atomic_write_json(os.path.join(workdir, 'metrics.json'), summary)
  return summary


def _write_group_images(group, labels, scores, group_dir):
  """Label PNGs with the predicted ids, overlays, and one contact sheet per group.

  Where ground truth exists, labels are remapped by the group's Hungarian matching so
  colours agree with the ground truth."""
  if scores is not None:
    mapping = np.asarray(scores['mapping'], np.uint8)
    labels = [mapping[l] for l in labels]
  names = group.class_names
  rows = []
  for s, lab in zip(group.samples, labels):
    visualize.save_label_png(os.path.join(group_dir, 'labels', f'{s.stem}.png'), lab)
    over = visualize.overlay(s.image, lab, names=names)
    fileio.save_png(os.path.join(group_dir, 'overlays', f'{s.stem}.png'), over)
    truth = None if s.mask is None else visualize.overlay(s.image, s.mask, names=names)
    rows.append([s.image, truth, over])
  fileio.save_png(os.path.join(group_dir, 'contact_sheet.png'), visualize.contact_sheet(
      rows, titles=('input', 'ground truth', 'prediction'), row_names=[s.stem for s in group.samples]))
