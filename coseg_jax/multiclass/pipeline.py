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
from coseg_jax.multiclass import attention
from coseg_jax.multiclass import baseline
from coseg_jax.multiclass import generator
from coseg_jax.multiclass import losses
from coseg_jax.multiclass import metrics
from coseg_jax.multiclass import num_classes as estimate_k
from coseg_jax.multiclass import postprocess

log = logging.getLogger('coseg_jax')

# 'none': the method; the training-free references, scored the same way: 'cluster'
# (k-means, SPEC §6a), 'center' (a centred ellipse), 'saliency' (one class: the group's
# co-saliency prior above its mean).
BASELINES = ('none', 'cluster', 'center', 'saliency')
# Pooled feature of the frozen extractor f.
EXTRACTOR_TAPS = {'resnet50': 'layer4', 'efficientnet_lite0': 'head'}


def maps_loss(extractor, loss_cfg, frozen, x_BxHxWx3, maps_BxHxWxK1):
  """Co-attention loss of co-attention maps: the B*(K+1) masked images (Eq. 1) go
  through the frozen f as one batch."""
  masks_BxHxWxK1 = maps_BxHxWxK1
  if loss_cfg.normalize_maps:
    masks_BxHxWxK1 = maps_BxHxWxK1 / (maps_BxHxWxK1.max(axis=(1, 2), keepdims=True) + 1e-6)
  return losses.coattention_loss(masked_vectors(extractor, loss_cfg, frozen, x_BxHxWx3,
                                                masks_BxHxWxK1))


def masked_vectors(extractor, loss_cfg, frozen, x_BxHxWx3, masks_BxHxWxK1):
  """f(I_b ⊙ M_b^l), pooled and normalised as in the loss: BxK1xD."""
  b, h, w, k1 = masks_BxHxWxK1.shape
  masks_NxHxW = jnp.moveaxis(masks_BxHxWxK1, -1, 1).reshape(b * k1, h, w)
  masked_NxHxWx3 = jnp.repeat(x_BxHxWx3, k1, axis=0) * masks_NxHxW[..., None]
  tap = EXTRACTOR_TAPS[extractor.name]
  feat_NxhxwxD = extractor.apply(frozen, masked_NxHxWx3, taps=(tap,))[tap]
  pooled_NxD = losses.normalize_features(
      losses.pool_features(feat_NxhxwxD, masks_NxHxW, loss_cfg.pooling),
      loss_cfg.feature_norm, loss_cfg.feature_scale)
  return pooled_NxD.reshape(b, k1, -1)


def _uint8(images_NxSxSx3):
  return [np.round(np.asarray(x) * 255).astype(np.uint8) for x in images_NxSxSx3]


def saliency_foregrounds(config, images_uint8, prior_list):
  """Per image, the co-saliency prior's foreground (`saliency.foreground`: the split at
  its mean, redrawn by the dense CRF `infer.crf`; with infer.method='argmax' the split as
  it is), each prior at its image's size. The 'saliency' baseline reads it at the photo's
  size; the one-class init and rule at the network input, because the prior's own split
  cuts through the object and its ground (J on ped24 / ped74 / all horses 60.6 / 68.6 /
  85.0 vs 56.2 / 66.0 / 80.5 seeded from prior > mean; BUILD.md)."""
  crf_cfg = config.infer.crf if config.infer.method == 'crf' else None
  return [saliency.foreground(image, p, crf_cfg, config.infer.saliency_floor)
          for image, p in zip(images_uint8, prior_list)]


def group_prior(config, background, images_NxSxSx3):
  """The group's co-saliency prior at the network input as the one-class init, the
  'saliency' rule and the K estimate read it: its `saliency_foregrounds` as 0/1 maps."""
  prior = background.co_saliency(images_NxSxSx3)
  return [fg.astype(np.float32) for fg in saliency_foregrounds(config, _uint8(images_NxSxSx3), prior)]


@dataclasses.dataclass(frozen=True)
class Background:
  """The background rules (`infer.background`) with the extractor they read: its jitted
  masked-image vectors and its descriptors for the co-saliency prior, built once per run."""
  vectors: Callable  # (frozen, x_1xSxSx3, masks_1xSxSxL) -> 1xLxD, as the loss sees them
  extractor: weights.Backbone
  frozen: dict  # the extractor's variables

  @classmethod
  def build(cls, config, extractor, extractor_vars):
    return cls(jax.jit(functools.partial(masked_vectors, extractor, config.loss)), extractor,
               extractor_vars)

  def label(self, images_NxSxSx3, labels_list, num_labels, rule, vectors=None, prior=None):
    """The label `rule` (resolved: not 'auto') names.

    'consistency': the label whose `label_vectors` agree least across the group
    (`postprocess.least_consistent_label`); `vectors` passes them where the caller has
    them already. 'saliency': the label of lowest mean `prior` (the group's
    `co_saliency`, computed once per group by the caller); 'saliency+consistency': the
    lowest sum of the two (`postprocess.least_common_label`).
    """
    if rule == 'border':
      return postprocess.border_label(labels_list, num_labels)
    if rule == 'channel':
      return 0
    size = images_NxSxSx3.shape[1:3]
    at_input = lambda: [data.resize_labels(np.asarray(l, np.uint8), size) for l in labels_list]
    if rule == 'saliency':
      return postprocess.least_salient_label(at_input(), prior, num_labels)
    if vectors is None:
      vectors = self.label_vectors(images_NxSxSx3, labels_list, num_labels)
    if rule == 'saliency+consistency':
      return postprocess.least_common_label(at_input(), prior, *vectors)
    return postprocess.least_consistent_label(*vectors)

  def co_saliency(self, images_NxSxSx3):
    """The group's co-saliency prior (`core.saliency`'s 'ddt_mbd': what recurs across the
    group, by DDT of the extractor's descriptors, times what stands out of each image, by
    MBD) at the network input: one SxS map in [0, 1] per image."""
    feats = baseline.dense_features(self.extractor, self.frozen, images_NxSxSx3,
                                    saliency.DDT_TAPS[self.extractor.name])
    return saliency.ddt_mbd_saliency(_uint8(images_NxSxSx3), feats)

  def label_vectors(self, images_NxSxSx3, labels_list, num_labels):
    """(NxLxD vectors, NxL present): each label of each image masks its image (Eq. 1 with
    the one-hot map) and goes through f with the loss' pooling; labels (any size) are
    resized (nearest) to the network input."""
    size = images_NxSxSx3.shape[1]
    vectors, present = [], []
    for image, labels in zip(images_NxSxSx3, labels_list):
      lab = data.resize_labels(np.asarray(labels, np.uint8), (size, size))
      one_hot_1xSxSxL = np.eye(num_labels, dtype=np.float32)[lab][None]
      vectors.append(np.asarray(self.vectors(self.frozen, image[None], one_hot_1xSxSxL))[0])
      present.append(one_hot_1xSxSxL[0].sum(axis=(0, 1)) > 0)
    return np.stack(vectors), np.stack(present)


def generator_maps(gen, params, inputs):
  """Co-attention maps of a batch of generator inputs (`Model.inputs`): from the images, or,
  with the encoder frozen, from its features computed once (`inputs['feat']`)."""
  if 'feat' in inputs:
    return gen.apply({'params': params}, inputs['feat'], inputs['image'].shape[1:3],
                     method=gen.head)
  return gen.apply({'params': params}, inputs['image'])


def loss_fn(gen, extractor, loss_cfg, params, frozen, batch):
  """Co-attention loss of one mini-batch; gradients reach the generator only."""
  maps_BxHxWxK1 = generator_maps(gen, params, batch)
  loss = maps_loss(extractor, loss_cfg, frozen, batch['image'], maps_BxHxWxK1)
  if loss_cfg.coverage_weight:
    loss += loss_cfg.coverage_weight * losses.coverage_loss(
        batch['dense'], maps_BxHxWxK1, loss_cfg.feature_scale)
  # Mean soft area per channel: shows collapse (one channel taking everything) in the log.
  area_K1 = maps_BxHxWxK1.mean(axis=(0, 1, 2))
  return loss, {f'area{i}': area_K1[i] for i in range(maps_BxHxWxK1.shape[-1])}


def encoder_tap(config, encoder, extractor):
  """`model.encoder_tap` checked; 'auto' is the group's `cluster_taps` where the encoder is
  the extractor's network (so the 'cluster' init starts as the clustering baseline), else
  the encoder's own (`generator.ENCODER_TAPS`)."""
  tap = config.model.encoder_tap
  if tap == 'auto':
    if encoder.name == extractor.name:
      return cluster_taps(config, extractor)
    return generator.ENCODER_TAPS[encoder.name]
  if any(t not in encoder.tap_info() for t in baseline.split_taps(tap)):
    raise InputError(f'config.model.encoder_tap: {encoder.name} has no tap {tap!r} '
                     f'({", ".join(encoder.tap_info())})')
  return tap


# Attention works at the stride of the thesis' conv5_3 where the encoder tap is finer.
ATTENTION_STRIDE = 16


def build_generator(config, encoder, extractor, num_classes):
  tap = encoder_tap(config, encoder, extractor)
  finest = min(encoder.tap_info()[t][0] for t in baseline.split_taps(tap))
  spec = generator.GeneratorSpec(
      num_classes=num_classes,
      preprocessing=encoder.preprocessing,
      tap=tap,
      attention=attention.AttentionSpec(
          mode=config.model.attention, reduction=config.model.attention_reduction,
          mutual_scale_power=config.model.mutual_scale_power,
          pool=max(1, ATTENTION_STRIDE // finest)))
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
  freeze_encoder: bool  # train.freeze_encoder: only the head (attention, classifier) trains
  features: Callable  # (encoder params, x_BxSxSx3) -> encoder features at the classifier
  maps: Callable  # (params, inputs) -> co-attention maps BxSxSx(K+1) (`generator_maps`)
  trainer: train.Trainer

  @classmethod
  def build(cls, config, num_classes, encoder, encoder_vars, extractor):
    gen = build_generator(config, encoder, extractor, num_classes)
    return cls(
        gen=gen,
        params=init_params(gen, encoder_vars, config.data.image_size, config.data.batch_size,
                           config.seed),
        freeze_encoder=config.train.freeze_encoder,
        features=jax.jit(lambda p, x: gen.apply({'params': {'encoder': p}}, x,
                                                method=gen.features)),
        maps=jax.jit(functools.partial(generator_maps, gen)),
        trainer=train.Trainer(functools.partial(loss_fn, gen, extractor, config.loss),
                              train.TrainConfig.from_config(config)))

  def encoder_features(self, images_NxSxSx3):
    """The encoder features of a group at the initial (ImageNet) weights, image by image."""
    return np.stack([np.asarray(self.features(self.params['encoder'], x[None]))[0]
                     for x in images_NxSxSx3])

  def inputs(self, images_NxSxSx3, feats_NxhxwxC=None):
    """What `maps` and the loss read per image: the images, and with a frozen encoder its
    features (`feats_NxhxwxC` where the caller has them already)."""
    if not self.freeze_encoder:
      return {'image': images_NxSxSx3}
    if feats_NxhxwxC is None:
      feats_NxhxwxC = self.encoder_features(images_NxSxSx3)
    return {'image': images_NxSxSx3, 'feat': feats_NxhxwxC}

  def trainable(self, params):
    """The params the optimizer sees: all of them, or with a frozen encoder the head's."""
    if not self.freeze_encoder:
      return params
    return {k: v for k, v in params.items() if k != 'encoder'}


def centroid_classifier(feats_NxhxwxC, params, centers_K1xC, temperature):
  """The 1x1 classifier as a soft nearest-centroid rule: logits_k = temperature *
  <f, c_k> / mean|f| for unit centroids c_k, channel k = centroid k."""
  mean_norm = np.mean([np.linalg.norm(f, axis=-1).mean() for f in feats_NxhxwxC])
  kernel_CxK1 = (temperature / mean_norm) * np.asarray(centers_K1xC).T
  return dict(params, classifier={'kernel': jnp.asarray(kernel_CxK1[None, None], jnp.float32),
                                  'bias': jnp.zeros((len(centers_K1xC),), jnp.float32)})


def cluster_init(feats_NxhxwxC, params, num_classes, seed, temperature, background=None):
  """The classifier initialised from k-means of the group's encoder features (BUILD.md):
  `centroid_classifier` of the K+1 centroids, the cluster that `background(label maps)`
  names as channel 0 (default: the cluster owning most image border).
  `feats_NxhxwxC` are the generator's encoder features of the group
  (`Model.encoder_features`).
  """
  feats = list(feats_NxhxwxC)
  centers_K1xC, labels = baseline.kmeans_group(feats, num_classes + 1, seed)
  order = np.arange(num_classes + 1)
  if background is None:
    bg = postprocess.border_label(labels, num_classes + 1)
  else:
    bg = background(labels)
  order[[0, bg]] = order[[bg, 0]]
  return centroid_classifier(feats, params, centers_K1xC[order], temperature)


def saliency_init(feats_NxhxwxC, params, prior_list, temperature):
  """One class (K = 1): the classifier initialised from the group's co-saliency prior.

  Two k-means clusters of a group are its two largest appearance modes (road and
  facades in street photos), which no object smaller than half the scene is; and the
  common stuff (the road of every street photo) is as consistent across the group as the
  common object. What recurs *and* stands out is the object: class 1 starts as the
  centroid of the encoder features where the prior is above its image's mean, channel 0
  as the centroid of the rest (`centroid_classifier`; BUILD.md). The pipeline passes the
  prior's CRF foreground (`saliency_foregrounds`), whose split is its own.
  """
  feats = list(feats_NxhxwxC)
  split = [baseline.saliency_split(p, f.shape[:2]) for p, f in zip(prior_list, feats)]
  return centroid_classifier(feats, params, baseline.centroids(feats, split, 2), temperature)


def train_generator(config, model, params, inputs, extractor, extractor_vars, group_dir, desc):
  """Trains one group's generator on its `Model.inputs` (resuming from
  group_dir/checkpoints; group_dir None: in memory only); returns all of its params."""
  in_dir = lambda name: None if group_dir is None else os.path.join(group_dir, name)
  data = dict(inputs)
  if config.loss.coverage_weight:
    # The coverage term's features of the unmasked images: frozen, so computed once.
    data['dense'] = np.stack(baseline.dense_features(
        extractor, extractor_vars, inputs['image'], cluster_taps(config, extractor)))
  trained, _ = model.trainer.fit(
      model.trainable(params), extractor_vars, data, ckpt_dir=in_dir('checkpoints'),
      log_path=in_dir('loss.jsonl'), quiet=config.output.quiet, desc=desc)
  return dict(params, **trained)


def group_maps(config, model, params, inputs, group):
  """Co-attention maps of every image of `group` (its `Model.inputs`), resized to its
  original size; in batches of the training size, as mutual attention needs partners."""
  maps = train.predict_in_batches(functools.partial(model.maps, params), inputs,
                                  config.data.batch_size)
  return [data.resize_probs(m, s.image.shape[:2]) for m, s in zip(maps, group.samples)]


def label_group(config, group, maps, background=None):
  """Eq. 8 + argmax or CRF per image, then label 0 = the group's background: the label
  `background(label maps)` names (default: the border rule)."""
  pairs = progress.bar(zip(group.samples, maps), total=len(maps), desc=f'infer {group.name}',
                       quiet=config.output.quiet)
  if config.baseline in ('center', 'saliency'):  # the ellipse, or already the CRF's labels
    labels = [np.argmax(m, axis=-1).astype(np.uint8) for _, m in pairs]
  else:
    labels = [postprocess.labels_from_maps(s.image, m, config.infer) for s, m in pairs]
  k1 = config.num_classes + 1
  bg = postprocess.border_label(labels, k1) if background is None else background(labels)
  return postprocess.swap_to_background(labels, bg, k1)


def score(config, group, labels):
  """P/J of the group, or None without ground-truth masks. With an estimated K the masks
  may name more classes than K: those are scored too (a K too small loses them)."""
  if any(s.mask is None for s in group.samples):
    return None
  masks = [s.mask for s in group.samples]
  k = max([config.num_classes] + [int(m[m != 255].max(initial=0)) for m in masks])
  return metrics.score_group(labels, masks, k, fixed_background=True,
                             names=[s.stem for s in group.samples])


def segment_group(config, group, images, model, extractor, extractor_vars, background,
                  group_dir, prior=None):
  """Soft maps (HxWx(K+1), original size) for every image of `group` (`images`: its network
  input, `data.resize_batch`); `model` is the run's `Model` of the group's K (None for the
  baselines), `background` its `Background`, `prior` the group's co-saliency prior where
  `needs_prior`."""
  if config.baseline == 'center':
    k1 = config.num_classes + 1
    return [np.eye(k1, dtype=np.float32)[baseline.center_prior(s.image.shape[:2])]
            for s in group.samples]
  if config.baseline == 'cluster':
    return baseline.cluster_baseline(
        extractor, extractor_vars, images, [s.image.shape[:2] for s in group.samples],
        config.num_classes, config.seed, tap=cluster_taps(config, extractor))
  if config.baseline == 'saliency':
    # DeepCO3's foreground of the prior: the CRF redraws the split from the prior itself
    # (fudanped as one class J 65.1 vs 60.8 for the split at the stride-16 grid, one-hot,
    # then the CRF; BUILD.md). One-hot maps of the CRF's labels: `label_group` takes their
    # argmax, no second CRF.
    priors_HxW = [data.resize_probs(p[..., None], s.image.shape[:2])[..., 0]
                  for p, s in zip(prior, group.samples)]
    foregrounds = saliency_foregrounds(config, [s.image for s in group.samples], priors_HxW)
    return [np.eye(2, dtype=np.float32)[fg.astype(np.int64)] for fg in foregrounds]
  params = model.params
  init = classifier_init(config)
  feats = None
  if init != 'random' or model.freeze_encoder:
    feats = model.encoder_features(images)
  if init == 'cluster':
    rule = data_rule(config)
    params = cluster_init(feats, params, config.num_classes, config.seed,
                          temperature=config.model.cluster_init_temperature,
                          background=lambda labels: background.label(
                              images, labels, config.num_classes + 1, rule=rule, prior=prior))
  elif init == 'saliency':
    params = saliency_init(feats, params, prior, config.model.cluster_init_temperature)
  inputs = model.inputs(images, feats)
  params = train_generator(config, model, params, inputs, extractor, extractor_vars, group_dir,
                           desc=f'train {group.name}')
  return group_maps(config, model, params, inputs, group)


# Dense taps the k-means partitions per extractor under 'auto': candidates, the first the
# default. Where a group is partitioned (the clustering baseline, the 'cluster' init) each
# candidate's partition is scored by the co-attention loss and the lowest kept
# (`choose_cluster_taps`): the stride-8 tap draws stuff boundaries (building/sky,
# tree/sky/grass) and loses small objects (cars) depending on the group (BUILD.md, real
# photographs). resnet50's stride-8 layer2 was never measured (no weights here).
CLUSTER_TAPS = {'efficientnet_lite0': ('stride16+stride32', 'stride8+stride16+stride32'),
                'resnet50': ('layer3+layer4',)}


def cluster_taps(config, extractor):
  """`model.cluster_taps` checked; 'auto' is the extractor's first candidate (a group's
  own choice, `choose_cluster_taps`, is set into its config)."""
  taps = config.model.cluster_taps
  if taps == 'auto':
    taps = CLUSTER_TAPS[extractor.name][0]
  unknown = [t for t in baseline.split_taps(taps) if t not in extractor.tap_info()]
  if unknown:
    raise InputError(f'config.model.cluster_taps: {extractor.name} has no tap {unknown[0]!r} '
                     f'({", ".join(extractor.tap_info())})')
  return taps


def choose_cluster_taps(config, extractor, extractor_vars, background, images_NxSxSx3, prior):
  """(taps, {taps: loss}) of one group (its config): under 'auto', where the group is
  partitioned by k-means, the candidate whose (K + 1)-cluster partition has the lowest
  co-attention loss with the `data_rule` background (`num_classes.partition_loss`, the
  criterion of the K estimate: the loss the method minimises, before any training);
  otherwise `cluster_taps` and no losses."""
  candidates = CLUSTER_TAPS[extractor.name]
  partitioned = config.baseline == 'cluster' or (
      config.baseline == 'none' and classifier_init(config) == 'cluster')
  if config.model.cluster_taps != 'auto' or len(candidates) < 2 or not partitioned:
    return cluster_taps(config, extractor), {}
  loss_per_taps = {
      taps: estimate_k.partition_loss(
          background, images_NxSxSx3,
          baseline.dense_features(extractor, extractor_vars, images_NxSxSx3, taps),
          config.num_classes, config.seed, data_rule(config), prior)
      for taps in candidates}
  return min(loss_per_taps, key=loss_per_taps.get), loss_per_taps


def check_config(config):
  """Every field of the method's config, before anything is built or written (bin/run.py
  calls it before touching the work directory); problems are one-line InputErrors."""
  defaults.check_shared(config)
  r = functools.partial(errors.check_range, config)
  if config.num_classes is not None:  # unset: each group's classes.txt gives K
    r('num_classes', 1, integer=True)
  r('max_classes', 1, integer=True)
  r('model.attention_reduction', 1, integer=True)
  r('model.cluster_init_temperature', 0, above=True)
  r('model.mutual_scale_power')
  r('loss.feature_scale', 0, above=True)
  r('loss.coverage_weight', 0)
  crf.check_fields(config, 'infer.crf')
  r('infer.saliency_floor', 0, 0.5, below=True)
  errors.check_one_of('baseline', config.baseline, BASELINES)
  errors.check_one_of('infer.background', config.infer.background, postprocess.BACKGROUND_RULES)
  errors.check_one_of('model.lite0_input', config.model.lite0_input, ('tflite', 'imagenet'))
  errors.check_one_of('model.attention', config.model.attention, attention.MODES)
  errors.check_one_of('model.classifier_init', config.model.classifier_init,
                      ('auto', 'random', 'cluster', 'saliency'))
  errors.check_one_of('loss.pooling', config.loss.pooling, ('masked', 'global'))
  errors.check_one_of('loss.feature_norm', config.loss.feature_norm, ('l2', 'none'))
  errors.check_one_of('infer.method', config.infer.method, postprocess.METHODS)
  if config.data.batch_size < 2:
    # The co-attention loss compares pairs of images (and mutual attention needs them).
    raise InputError(f'config.data.batch_size: the co-attention loss needs at least 2 images '
                     f'per mini-batch, got {config.data.batch_size}')


def group_num_classes(config, group):
  """K of one group: config.num_classes, or (unset) the number of classes its classes.txt
  names; None when neither says (`estimate_num_classes`)."""
  if config.num_classes is not None:
    return config.num_classes
  return len(group.class_names) if group.class_names else None


# Network input of the K estimate: which classes a group has needs no fine boundaries, and
# at 384 px the k-means partitions found the true K less often (BUILD.md, "Estimating K").
ESTIMATE_SIZE = 256


def estimate_num_classes(config, group, extractor, extractor_vars, background):
  """(K, {K: criterion}) of a group nobody gave K for (`multiclass.num_classes`), on the
  clustering baseline's features and with `estimate_rule`."""
  images = data.resize_batch([s.image for s in group.samples],
                             min(config.data.image_size, ESTIMATE_SIZE))
  feats = baseline.dense_features(extractor, extractor_vars, images,
                                  cluster_taps(config, extractor))
  rule = estimate_rule(config)
  prior = group_prior(config, background, images) if rule in postprocess.PRIOR_RULES else None
  return estimate_k.estimate(background, images, feats, config.max_classes, config.seed,
                             rule, prior)


def estimate_rule(config):
  """The background rule of the K estimate: the group's `data_rule`, where 'auto' is
  'consistency': the criterion is the loss of each partition, whose own background is the
  label without a consistency term (true K on 11 of 14 groups, 9 with
  'saliency+consistency'; BUILD.md, "Estimating K")."""
  return 'consistency' if config.infer.background == 'auto' else data_rule(config)


def data_rule(config):
  """The rule that names a background from the images alone: `infer.background`, where
  'auto' and 'channel' are 'saliency' for one class, else 'saliency+consistency'. It orders
  the k-means classifier init (its channel 0 is the cluster the rule names) and labels the
  clustering baseline."""
  if config.infer.background in ('auto', 'channel'):
    return 'saliency' if config.num_classes == 1 else 'saliency+consistency'
  return config.infer.background


def background_rule(config):
  """The rule that names the background of a group's final labels: the `data_rule`, but
  for the method 'auto' is 'channel' wherever an init has named channel 0 ('cluster' or
  'saliency'): training keeps the background its init took from the images (the thesis'
  channel K+1), where the rule run again on the trained labels named a class background
  under 2 of 3 seeds on car/road/building (BUILD.md, "The background of the trained
  labels")."""
  if config.baseline == 'cluster' or config.infer.background not in ('auto', 'channel'):
    return data_rule(config)
  if config.infer.background == 'channel' or classifier_init(config) != 'random':
    return 'channel'
  return data_rule(config)


def check_one_class(config, group):
  """The co-saliency init and baseline split a group in two: one class only."""
  if config.num_classes == 1:
    return
  if config.baseline == 'saliency':
    raise InputError(f'{group.path}: config.baseline=saliency needs one class, the group '
                     f'has {config.num_classes}')
  if config.baseline == 'none' and config.model.classifier_init == 'saliency':
    raise InputError(f'{group.path}: config.model.classifier_init=saliency needs one class, '
                     f'the group has {config.num_classes}')


def classifier_init(config):
  """`model.classifier_init` resolved: 'auto' is 'saliency' for one class, else 'cluster'."""
  if config.model.classifier_init != 'auto':
    return config.model.classifier_init
  return 'saliency' if config.num_classes == 1 else 'cluster'


def needs_prior(config):
  """Whether a group of this (per-group) config reads its co-saliency prior (the centre
  prior reads nothing)."""
  if config.baseline in ('center', 'saliency'):
    return config.baseline == 'saliency'
  init = classifier_init(config) if config.baseline == 'none' else None
  reads_data_rule = background_rule(config) != 'channel' or init == 'cluster'
  return (reads_data_rule and data_rule(config) in postprocess.PRIOR_RULES) or init == 'saliency'


def lite0_input(config, backbone):
  """The backbone with model.lite0_input's normalisation where it is EfficientNet-Lite0
  (the multi-class pipeline's choice; other wings keep the weights' own)."""
  if backbone.name != 'efficientnet_lite0':
    return backbone
  return dataclasses.replace(backbone, preprocessing=config.model.lite0_input)


def load_groups(config, workdir):
  """Every group read and validated (before anything trains: a bad file in the last group
  must not cost the training of the first ones), and the config with K set where the
  built-in demo needs it."""
  check_config(config)
  if config.num_classes is None and config.data.root is None:
    config = config.copy_and_resolve_references()
    config.num_classes = 2  # the built-in demo group with two classes (the old default)
  # With K unset, each group's masks are checked against its classes.txt.
  groups = [data.load_group(path, num_classes=config.num_classes,
                            min_images=config.data.batch_size)
            for path in demo.group_paths(config, workdir)]
  return config, groups


@dataclasses.dataclass
class GroupOutput:
  """What the method gives for one group: soft maps (HxWx(K+1), original size, before
  Eq. 8), label maps (0 = background), P/J when the group has masks, and its K."""
  maps: list
  labels: list
  scores: dict | None
  num_classes: int


def cosegment_groups(config, groups, workdir=None):
  """The method on in-memory groups (`data.Group`): (summary, {group name: GroupOutput}).

  bin/run.py and the Python API (coseg_jax.cosegment) both come here. With a work
  directory, each group's checkpoints, loss log and (config.output.images) pictures go to
  workdir/<group>; without one nothing is written.
  """
  extractor, extractor_vars = weights.load_backbone(
      weights.resolve_name(config.model.extractor, 'extractor', config.weights), config.weights)
  encoder, encoder_vars = weights.load_backbone(
      weights.resolve_name(config.model.encoder, 'encoder', config.weights), config.weights)
  extractor, encoder = lite0_input(config, extractor), lite0_input(config, encoder)
  backbones_used = {'encoder': {'name': encoder.name, 'weights': encoder.source},
                    'extractor': {'name': extractor.name, 'weights': extractor.source}}
  log.info('encoder: %s <- %s', encoder.name, encoder.source)
  log.info('extractor: %s <- %s', extractor.name, extractor.source)
  method = {'cluster': 'clustering baseline', 'center': 'centre prior',
            'saliency': 'co-saliency prior'}.get(
      config.baseline, f'co-attention ({config.model.attention})')

  models = {}  # one Model per (K, encoder tap) in the dataset, built before its first group

  def model_for(gconfig):
    if config.baseline != 'none':
      return None
    key = gconfig.num_classes, encoder_tap(gconfig, encoder, extractor)
    if key not in models:
      models[key] = Model.build(gconfig, gconfig.num_classes, encoder, encoder_vars, extractor)
    return models[key]

  background = Background.build(config, extractor, extractor_vars)
  group_k, estimated = {}, {}
  for group in groups:
    group_k[group.name] = group_num_classes(config, group)
    if group_k[group.name] is None:
      group_k[group.name], loss_per_k = estimate_num_classes(
          config, group, extractor, extractor_vars, background)
      estimated[group.name] = {'num_classes': group_k[group.name],
                               'criterion': 'co-attention loss of the k-means partition',
                               'loss_per_k': {str(k): v for k, v in loss_per_k.items()}}
      log.info('group %s: K = %d estimated (co-attention loss of the k-means partition per '
               'K: %s)', group.name, group_k[group.name],
               ', '.join(f'{k}: {v:.4f}' for k, v in loss_per_k.items()))
  ks = sorted(set(group_k.values()))
  k = ks[0] if len(ks) == 1 else group_k

  results, outputs, taps_chosen = {}, {}, {}
  for group in groups:
    group_dir = None if workdir is None else os.path.join(workdir, group.name)
    gconfig = config.copy_and_resolve_references()
    gconfig.num_classes = group_k[group.name]
    check_one_class(gconfig, group)
    images = data.resize_batch([s.image for s in group.samples], config.data.image_size)
    prior = None
    if gconfig.baseline == 'saliency':  # the baseline redraws the raw prior at the photo's size
      prior = background.co_saliency(images)
    elif needs_prior(gconfig):
      prior = group_prior(gconfig, background, images)
    gconfig.model.cluster_taps, loss_per_taps = choose_cluster_taps(
        gconfig, extractor, extractor_vars, background, images, prior)
    taps_note = ''
    if gconfig.baseline in ('none', 'cluster'):
      taps_note = f', cluster taps {gconfig.model.cluster_taps}'
    if loss_per_taps:
      taps_chosen[group.name] = {'cluster_taps': gconfig.model.cluster_taps,
                                 'loss_per_taps': loss_per_taps}
      taps_note += ' (co-attention loss of each partition: %s)' % ', '.join(
          f'{t} {l:.4f}' for t, l in loss_per_taps.items())
    log.info('group %s: %d images, %d classes, method %s, inference %s, background %s%s',
             group.name, len(group.samples), gconfig.num_classes, method, config.infer.method,
             background_rule(gconfig), taps_note)
    maps = segment_group(gconfig, group, images, model_for(gconfig), extractor,
                         extractor_vars, background, group_dir, prior)
    labels = label_group(gconfig, group, maps,
                         background=_background_rule(gconfig, images, background, prior))
    scores = score(gconfig, group, labels)
    if scores is not None:
      results[group.name] = scores
    if config.output.images and group_dir is not None:
      _write_group_images(group, labels, scores, group_dir)
    outputs[group.name] = GroupOutput(maps, labels, scores, gconfig.num_classes)

  summary = {'method': method, 'backbones': backbones_used, 'num_classes': k,
             'inference': config.infer.method, 'groups': {}}
  if estimated:
    summary['num_classes_estimated'] = estimated
  if taps_chosen:
    summary['cluster_taps_chosen'] = taps_chosen
  if results:
    summary.update(metrics.summarize(results))
    log.info('\n%s', metrics.format_table(summary))
  else:
    log.info('no ground-truth masks found: predictions written, nothing scored')
  return summary, outputs


def run(config, workdir, start=None):
  """Every group read and validated, then `start(groups)` (cli.main: checks names and the
  fingerprint, writes config.json; returns the work directory to write into), then work."""
  config, groups = load_groups(config, workdir)
  if start is not None:
    workdir = start(groups)
  summary, _ = cosegment_groups(config, groups, workdir)
  fileio.atomic_write_json(os.path.join(workdir, 'metrics.json'), summary)
  return summary


def _background_rule(config, images, background, prior):
  """labels -> background label, by `background_rule`; the centre and co-saliency priors
  are labelled already."""
  if config.baseline in ('center', 'saliency'):
    return lambda labels: 0
  rule = background_rule(config)
  return lambda labels: background.label(images, labels, config.num_classes + 1, rule=rule,
                                         prior=prior)


def _write_group_images(group, labels, scores, group_dir):
  """Label PNGs with the predicted ids, overlays, and one contact sheet per group.

  Where ground truth exists, labels are remapped by the group's Hungarian matching so
  colours agree with the ground truth."""
  if scores is not None:
    mapping = np.asarray(scores['mapping'], np.uint8)
    labels = [mapping[l] for l in labels]
  names = group.class_names
  # The ground-truth column only where the group has masks.
  has_truth = any(s.mask is not None for s in group.samples)
  rows = []
  for s, lab in zip(group.samples, labels):
    visualize.save_label_png(os.path.join(group_dir, 'labels', f'{s.stem}.png'), lab)
    over = visualize.overlay(s.image, lab, names=names)
    fileio.save_png(os.path.join(group_dir, 'overlays', f'{s.stem}.png'), over)
    if has_truth:
      truth = None if s.mask is None else visualize.overlay(s.image, s.mask, names=names)
      rows.append([s.image, truth, over])
    else:
      rows.append([s.image, over])
  titles = ('input', 'ground truth', 'prediction') if has_truth else ('input', 'prediction')
  fileio.save_png(os.path.join(group_dir, 'contact_sheet.png'), visualize.contact_sheet(
      rows, titles=titles, row_names=[s.stem for s in group.samples]))
