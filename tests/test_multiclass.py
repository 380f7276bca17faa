"""End to end on the built-in demo with the real EfficientNet-Lite0 weights."""
import itertools
import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

from coseg_jax.backbones import weights
from coseg_jax.core import config as defaults
from coseg_jax.core import data
from coseg_jax.core import demo
from coseg_jax.core import fileio
from coseg_jax.core import report
from coseg_jax.core import visualize
from coseg_jax.core.errors import InputError
from coseg_jax.multiclass import baseline
from coseg_jax.multiclass import losses
from coseg_jax.multiclass import pipeline as multiclass


@pytest.mark.slow
def test_training_raises_j_on_demo_group(tmp_path):
  config = defaults.multiclass()
  config.num_classes = 2
  # Learning from scratch, as in the thesis (the default warm start from k-means is tested
  # in test_multiclass_loss.py): the smallest setting that learns reliably.
  config.model.classifier_init = 'random'
  # A random classifier needs the encoder to learn with it (the default keeps the encoder
  # at its ImageNet weights, suited to the k-means init).
  config.train.freeze_encoder = False
  config.train.learning_rate, config.train.head_lr_mult = 1e-4, 10.0
  config.model.encoder_tap = 'stride16'
  config.data.image_size = 160
  config.train.epochs, config.train.steps = 15, 0
  config.infer.method = 'argmax'
  config.output.quiet = True
  group = data.load_group(demo.make_multiclass_demo(str(tmp_path / 'demo'), 2),
                          num_classes=2, min_images=config.data.batch_size)
  lite0, lite0_vars = weights.load_backbone('efficientnet_lite0', config.weights)
  images = data.resize_batch([s.image for s in group.samples], config.data.image_size)
  model = multiclass.Model.build(config, config.num_classes, lite0, lite0_vars, lite0)
  params = model.params
  inputs = model.inputs(images)

  def j_of(p):
    maps = multiclass.group_maps(config, model, p, inputs, group)
    assert maps[0].shape == (*group.samples[0].image.shape[:2], 3)
    np.testing.assert_allclose(maps[0].sum(-1), 1.0, rtol=1e-4)
    return multiclass.score(config, group, multiclass.label_group(config, group, maps))['J']

  before = j_of(params)
  trained = multiclass.train_generator(config, model, params, inputs, lite0, lite0_vars,
                                       str(tmp_path / 'run'), desc='test')
  after = j_of(trained)
  assert float(trained['attention']['gamma']) != 0.0   # the attention module was trained
  assert after > before + 0.1, (before, after)


@pytest.mark.slow
def test_default_training_raises_j_over_its_own_step_0_labels(tmp_path, monkeypatch):
  """The default pipeline (k-means init on the default taps, frozen encoder, head at 1e-3
  for train.steps, CRF, consistency rule) on the two-class demo (photo cut-outs on real
  textures, a different one per image) labels better than the same run with training
  skipped, which is the k-means partition it starts from."""
  config = defaults.multiclass()
  config.num_classes = 2
  config.data.image_size = 128
  config.data.root = demo.make_multiclass_demo(str(tmp_path / 'demo'), 2)
  config.output.quiet, config.output.images = True, False
  trained = multiclass.run(config, str(tmp_path / 'trained'))['mean']['J']
  monkeypatch.setattr(multiclass, 'train_generator', lambda config, model, params, *a, **k: params)
  step0 = multiclass.run(config, str(tmp_path / 'step0'))['mean']['J']
  assert trained > step0 + 0.08, (step0, trained)


@pytest.mark.slow
def test_the_method_keeps_the_background_its_init_named(tmp_path, monkeypatch):
  """The default method names its background once, from the images: the init puts the
  cluster the data rule names in channel 0, and the trained labels keep channel 0 as
  background instead of running the rule again (which named a class background under 2
  of 3 seeds on a real group). The clustering baseline runs the rule on its clusters."""
  rules = []
  label = multiclass.Background.label

  def spy(self, images, labels, num_labels, rule, **kwargs):
    rules.append(rule)
    return label(self, images, labels, num_labels, rule, **kwargs)

  monkeypatch.setattr(multiclass.Background, 'label', spy)
  config = defaults.multiclass()
  config.num_classes = 2
  config.data.image_size = 64
  config.train.steps = 2
  config.model.cluster_taps = 'stride16+stride32'  # no choice of taps, whose losses name one too
  config.data.root = demo.make_multiclass_demo(str(tmp_path / 'demo'), 2)
  config.output.quiet, config.output.images = True, False
  multiclass.run(config, str(tmp_path / 'method'))
  assert rules == ['saliency+consistency', 'channel'], rules   # init, then the trained labels
  rules.clear()
  config.baseline = 'cluster'
  multiclass.run(config, str(tmp_path / 'baseline'))
  assert rules == ['saliency+consistency'], rules


@pytest.mark.slow
def test_the_default_init_starts_as_the_clustering_baseline(tmp_path):
  """Step 0 of the default method (cluster init on the default encoder tap) labels the
  group as the clustering baseline does, with confident maps (what the CRF keeps)."""
  config = defaults.multiclass()
  config.num_classes = 2
  config.data.image_size = 96
  group = data.load_group(demo.make_multiclass_demo(str(tmp_path / 'demo'), 2),
                          num_classes=2, min_images=config.data.batch_size)
  lite0, lite0_vars = weights.load_backbone('efficientnet_lite0', config.weights)
  lite0 = multiclass.lite0_input(config, lite0)
  images = data.resize_batch([s.image for s in group.samples], config.data.image_size)
  model = multiclass.Model.build(config, 2, lite0, lite0_vars, lite0)
  params = multiclass.cluster_init(model.encoder_features(images), model.params, 2, config.seed,
                                   temperature=config.model.cluster_init_temperature)
  maps = np.asarray(model.maps(params, model.inputs(images)))
  baseline_maps = baseline.cluster_baseline(
      lite0, lite0_vars, images, [images.shape[1:3]] * len(images), 2, config.seed,
      tap=multiclass.cluster_taps(config, lite0))
  # Same partition up to the cluster order (the init moves the background to channel 0),
  # read at the stride-16 feature cells (both are upsampled from there differently).
  cells = (slice(None), slice(8, None, 16), slice(8, None, 16))
  pred = maps.argmax(-1)[cells].ravel()
  ref = np.stack(baseline_maps).argmax(-1)[cells].ravel()
  agree = max(np.mean(np.array(perm)[pred] == ref)
              for perm in itertools.permutations(range(3)))
  assert agree > 0.98, agree
  assert maps.max(-1).mean() > 0.9   # confident unaries, not a soft blend


@pytest.mark.slow
def test_each_group_is_clustered_on_the_taps_of_least_partition_loss(tmp_path):
  """Under cluster_taps='auto' every candidate's k-means partition is scored by the
  co-attention loss (the K estimate's criterion) and the group is clustered on the lowest:
  the losses reported are those partitions' losses, the labels those of a run given the
  chosen taps by name."""
  config = defaults.multiclass()
  config.num_classes = 2
  config.data.image_size = 96
  config.baseline = 'cluster'
  config.data.root = demo.make_multiclass_demo(str(tmp_path / 'demo'), 2)
  config.output.quiet = True
  summary = multiclass.run(config, str(tmp_path / 'auto'))
  (name, chosen), = summary['cluster_taps_chosen'].items()
  loss_per_taps = chosen['loss_per_taps']
  assert list(loss_per_taps) == list(multiclass.CLUSTER_TAPS['efficientnet_lite0'])
  assert chosen['cluster_taps'] == min(loss_per_taps, key=loss_per_taps.get)
  assert f'Clustered on {chosen["cluster_taps"]}' in report.build(str(tmp_path / 'auto'))

  group = data.load_group(config.data.root, num_classes=2)
  lite0, lite0_vars = weights.load_backbone('efficientnet_lite0', config.weights)
  lite0 = multiclass.lite0_input(config, lite0)
  images = data.resize_batch([s.image for s in group.samples], config.data.image_size)
  background = multiclass.Background.build(config, lite0, lite0_vars)
  prior = multiclass.group_prior(config, background, images)
  for taps, loss in loss_per_taps.items():
    feats = baseline.dense_features(lite0, lite0_vars, images, taps)
    assert feats[0].shape[0] == images.shape[1] // (8 if 'stride8' in taps else 16)
    labels = baseline.cluster_group(feats, 3, config.seed)
    bg = background.label(images, labels, 3, rule='saliency+consistency', prior=prior)
    vectors, _ = background.label_vectors(images, labels, 3)
    order = np.arange(3)
    order[[0, bg]] = order[[bg, 0]]
    expected = float(losses.coattention_loss(vectors[:, order]))
    assert abs(loss - expected) < 1e-5 * max(1.0, abs(expected)), (taps, loss, expected)

  config.model.cluster_taps = chosen['cluster_taps']
  named = multiclass.run(config, str(tmp_path / 'named'))
  assert 'cluster_taps_chosen' not in named
  label_dir = lambda run: os.path.join(tmp_path, run, name, 'labels')
  pngs = sorted(os.listdir(label_dir('named')))
  assert len(pngs) == len(group.samples)
  for png in pngs:
    np.testing.assert_array_equal(np.asarray(Image.open(os.path.join(label_dir('auto'), png))),
                                  np.asarray(Image.open(os.path.join(label_dir('named'), png))))


def test_the_generator_reads_the_taps_its_group_is_clustered_on():
  """encoder_tap='auto' follows the group's cluster taps where the encoder is the
  extractor's network (so the 'cluster' init starts as the baseline); a group that is not
  partitioned (one class, co-saliency init) keeps the first candidate and scores none."""
  config = defaults.multiclass()
  lite0, _ = weights.load_backbone('efficientnet_lite0', config.weights)
  config.model.cluster_taps = 'stride8+stride16+stride32'
  assert multiclass.encoder_tap(config, lite0, lite0) == 'stride8+stride16+stride32'
  config.model.encoder_tap = 'stride16'
  assert multiclass.encoder_tap(config, lite0, lite0) == 'stride16'
  config = defaults.multiclass()
  config.num_classes = 1
  assert multiclass.choose_cluster_taps(config, lite0, None, None, None, None) == (
      multiclass.CLUSTER_TAPS['efficientnet_lite0'][0], {})


@pytest.mark.slow
def test_a_frozen_encoder_trains_the_head_on_features_computed_once(tmp_path):
  """`train.freeze_encoder`: the maps from the features computed once are the full
  generator's, and training moves the head but leaves the encoder's weights as loaded."""
  config = defaults.multiclass()
  config.train.freeze_encoder = True
  config.num_classes = 2
  config.data.image_size = 64
  config.train.steps = 2
  config.output.quiet = True
  group = data.load_group(demo.make_multiclass_demo(str(tmp_path / 'demo'), 2),
                          num_classes=2, min_images=config.data.batch_size)
  lite0, lite0_vars = weights.load_backbone('efficientnet_lite0', config.weights)
  images = data.resize_batch([s.image for s in group.samples], config.data.image_size)
  model = multiclass.Model.build(config, 2, lite0, lite0_vars, lite0)
  params = multiclass.cluster_init(model.encoder_features(images), model.params, 2, config.seed,
                                   temperature=config.model.cluster_init_temperature)
  inputs = model.inputs(images)
  assert set(inputs) == {'image', 'feat'}
  batch = {k: v[:config.data.batch_size] for k, v in inputs.items()}
  np.testing.assert_allclose(np.asarray(model.maps(params, batch)),
                             np.asarray(model.gen.apply({'params': params}, batch['image'])),
                             atol=1e-5)
  trained = multiclass.train_generator(config, model, params, inputs, lite0, lite0_vars, None,
                                       desc='test')
  assert jax.tree.all(jax.tree.map(np.array_equal, trained['encoder'], params['encoder']))
  assert not np.allclose(trained['classifier']['kernel'], params['classifier']['kernel'])


def _one_class_group(root, size=96, n=6, seed=0):
  """One class whose two largest appearance modes are not it: every image is brick above
  and gravel below, with a cat's head (about a fifth of the image) across the seam."""
  group = os.path.join(root, 'cat')
  os.makedirs(os.path.join(group, 'images'))
  os.makedirs(os.path.join(group, 'masks'))
  rng = np.random.default_rng(seed)
  cat = demo._OBJECTS[0]
  for i in range(n):
    image = demo._background(rng, 2, size)
    image[size // 2:] = demo._background(rng, 1, size)[size // 2:]
    h, w = demo._shape(cat, 0.45 * size * rng.uniform(0.9, 1.1))
    y, x = (size - h) // 2 + int(rng.integers(-9, 10)), (size - w) // 2 + int(rng.integers(-9, 10))
    patch = demo._jitter(rng, demo._crop(cat, h, w, flip=bool(rng.integers(2))))
    inside = demo._ellipse(h, w)
    image[y:y + h, x:x + w][inside] = patch[inside]
    mask = np.zeros((size, size), np.uint8)
    mask[y:y + h, x:x + w][inside] = 1
    fileio.save_png(os.path.join(group, 'images', f'img{i}.png'), image)
    visualize.save_label_png(os.path.join(group, 'masks', f'img{i}.png'), mask)
  with open(os.path.join(group, 'classes.txt'), 'w') as f:
    f.write('cat\n')
  return root


@pytest.mark.slow
def test_one_class_finds_the_object_the_two_means_init_misses(tmp_path):
  """K = 1: two k-means clusters are brick and gravel, so the previous default (cluster
  init, consistency rule) loses the cat; the co-saliency init and rule keep it."""
  config = defaults.multiclass()
  config.num_classes = 1
  config.data.image_size = 96
  config.data.root = _one_class_group(str(tmp_path / 'data'))
  config.train.steps = 10
  config.output.quiet, config.output.images = True, False
  default = multiclass.run(config, str(tmp_path / 'default'))['mean']['J']
  log = open(tmp_path / 'default' / 'cat' / 'loss.jsonl').read().splitlines()
  areas = [json.loads(line)['area1'] for line in log if 'area1' in line]
  config.model.classifier_init, config.infer.background = 'cluster', 'consistency'
  previous = multiclass.run(config, str(tmp_path / 'previous'))['mean']['J']
  assert default > 0.5 and previous < 0.2, (default, previous)
  assert min(areas) > 0.05   # the foreground channel keeps its share of the pixels
  config.num_classes = 2     # the co-saliency split has two labels only
  config.data.root = demo.make_multiclass_demo(str(tmp_path / 'demo'), 2)
  config.baseline = 'saliency'
  with pytest.raises(InputError, match='baseline=saliency needs one class'):
    multiclass.run(config, str(tmp_path / 'two'))


def test_one_class_saliency_baseline_redraws_the_prior_with_the_crf(tmp_path):
  """`--config.baseline=saliency`: the co-saliency prior's split at its mean, redrawn by
  the dense CRF (`saliency.foreground`); with argmax inference the split as it is."""
  config = defaults.multiclass()
  config.num_classes = 1
  config.data.image_size = 96
  config.data.root = _one_class_group(str(tmp_path / 'data'))
  config.baseline = 'saliency'
  config.output.quiet, config.output.images = True, False
  refined = multiclass.run(config, str(tmp_path / 'crf'))['mean']['J']
  config.infer.method = 'argmax'
  split = multiclass.run(config, str(tmp_path / 'split'))['mean']['J']
  assert refined > split + 0.05, (refined, split)
