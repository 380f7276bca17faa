"""Issue 16: the background rule, the centre prior, multi-scale features, K from classes.txt."""
import types

import jax.numpy as jnp
import numpy as np
import pytest

from coseg_jax.core import config as defaults
from coseg_jax.core import data
from coseg_jax.core.errors import InputError
from coseg_jax.multiclass import baseline
from coseg_jax.multiclass import pipeline as multiclass
from coseg_jax.multiclass import postprocess


def _pixel_extractor():
  """A stand-in for f whose dense feature is the (preprocessed) pixel itself: masked pooling
  then gives the mean colour of a region."""
  return types.SimpleNamespace(name='efficientnet_lite0',
                               apply=lambda v, x, taps: {t: x + 0.05 for t in taps})


def _stuff_group(n=6, size=32, seed=0):
  """Grass (green, textured) owns the lower half and the whole border; a cow-red object sits
  in the middle; the upper strip inside the border is background of a different random
  colour per image. GT: 0 background, 1 grass, 2 object."""
  rng = np.random.default_rng(seed)
  images, labels = [], []
  for _ in range(n):
    lab = np.ones((size, size), np.uint8)
    lab[3:size // 2, 3:-3] = 0
    lab[size // 3:2 * size // 3, size // 3:2 * size // 3] = 2
    colours = {0: rng.uniform(0.0, 1.0, 3), 1: np.array([0.2, 0.7, 0.2]),
               2: np.array([0.7, 0.25, 0.2])}
    img = np.stack([colours[int(l)] for l in lab.ravel()]).reshape(size, size, 3)
    img = np.clip(img + rng.normal(0, 0.05, img.shape), 0, 1).astype(np.float32)
    images.append(img)
    labels.append(lab)
  return np.stack(images), labels


def test_default_rule_keeps_a_stuff_class_that_owns_the_border():
  images, labels = _stuff_group()
  config = defaults.multiclass()
  config.num_classes = 2
  config.data.image_size = images.shape[1]
  rule = multiclass.data_rule(config)
  assert rule == 'saliency+consistency'   # the default ('auto') for more than one class
  # The border rule calls grass (label 1) background ...
  assert postprocess.border_label(labels, 3) == 1
  # ... the default rule and consistency alone find the label that is not common to the
  # group (the object is the salient label; grass and background are not).
  background = multiclass.Background.build(config, _pixel_extractor(), {})
  prior = [(l == 2).astype(np.float32) for l in labels]
  assert background.label(images, labels, 3, rule, prior=prior) == 0
  assert background.label(images, labels, 3, 'consistency') == 0
  # Any permutation of the labels: the rule follows the content, not the id.
  perm = np.array([2, 0, 1], np.uint8)
  assert background.label(images, [perm[l] for l in labels], 3, rule, prior=prior) == 2
  assert background.label(images, labels, 3, rule='border') == 1


def test_auto_rules_are_saliency_for_one_class_only():
  config = defaults.multiclass()
  for k, rule, init in ((1, 'saliency', 'saliency'), (2, 'saliency+consistency', 'cluster'),
                        (None, 'saliency+consistency', 'cluster')):
    config.num_classes = k
    assert multiclass.data_rule(config) == rule            # orders the init
    assert multiclass.background_rule(config) == 'channel'  # the method keeps it
    assert multiclass.classifier_init(config) == init
    assert multiclass.estimate_rule(config) == 'consistency'   # the K estimate's loss
    assert multiclass.needs_prior(config)
    config.baseline = 'cluster'                             # no channel to keep
    assert multiclass.background_rule(config) == rule
    config.baseline = 'none'
  # A random init names no channel: the rule runs on the trained labels.
  config.model.classifier_init = 'random'
  assert multiclass.background_rule(config) == 'saliency+consistency'
  config.infer.background = 'channel'                       # the thesis, as trained
  assert multiclass.background_rule(config) == 'channel'
  assert not multiclass.needs_prior(config)                 # nothing reads the prior
  config.num_classes = 1
  assert multiclass.data_rule(config) == 'saliency'
  config.infer.background = 'saliency'
  assert multiclass.background_rule(config) == multiclass.data_rule(config) == 'saliency'
  assert multiclass.estimate_rule(config) == 'saliency'        # a set rule is kept
  assert multiclass.classifier_init(config) == 'random'
  config.infer.background, config.model.classifier_init = 'consistency', 'cluster'
  assert not multiclass.needs_prior(config)


def test_least_salient_label_is_the_label_of_lowest_mean_prior():
  a = np.array([[0, 0, 1, 1], [2, 2, 1, 1]], np.uint8)
  prior = np.array([[0.9, 0.8, 0.1, 0.2], [0.5, 0.5, 0.3, 0.0]])
  assert postprocess.least_salient_label([a], [prior], 3) == 1
  # Pooled over the group: label 0 is dark in a second image where label 1 is bright.
  b = np.array([[0, 0, 0, 0], [1, 1, 2, 2]], np.uint8)
  prior_b = np.array([[0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.6, 0.6]])
  assert postprocess.least_salient_label([a, b], [prior, prior_b], 3) == 0
  # A label no pixel has is never chosen, whatever the prior.
  assert postprocess.least_salient_label([a], [prior], 4) == 1


def test_saliency_split_and_centroids():
  prior = np.zeros((8, 8), np.float32)
  prior[2:6, 2:6] = 1.0
  np.testing.assert_array_equal(baseline.saliency_split(prior, (8, 8)), prior > 0)
  assert baseline.saliency_split(prior, (4, 4))[1:3, 1:3].all()
  assert baseline.saliency_split(prior, (4, 4)).sum() == 4
  # Centroids are the mean directions of the unit features of each label.
  feats = np.zeros((2, 2, 3), np.float32)
  feats[0] = [2.0, 0.0, 0.0]
  feats[1] = [0.0, 0.0, 5.0]
  feats[1, 1] = [0.0, 3.0, 3.0]
  labels = np.array([[1, 1], [0, 0]], np.uint8)
  c = baseline.centroids([feats], [labels], 2)
  np.testing.assert_allclose(c[1], [1, 0, 0], atol=1e-6)
  expected = np.array([0, 1 / np.sqrt(2), 1 + 1 / np.sqrt(2)])
  np.testing.assert_allclose(c[0], expected / np.linalg.norm(expected), atol=1e-6)


def test_least_consistent_label_ignores_labels_seen_once():
  rng = np.random.default_rng(0)
  v = np.stack([np.eye(3)[[0, 1, 2]] + 0.01 * rng.normal(size=(3, 3)) for _ in range(4)])
  v[:, 2] = rng.normal(size=(4, 3))          # label 2 varies: background
  present = np.ones((4, 3), bool)
  assert postprocess.least_consistent_label(v, present) == 2
  present[1:, 2] = False                     # seen in one image only: not comparable
  v[:, 1] = rng.normal(size=(4, 3))
  assert postprocess.least_consistent_label(v, present) == 1


def test_least_common_label_is_neither_salient_nor_consistent():
  """An object that varies across the group (salient, inconsistent), a stuff class (the
  same everywhere, not salient) and a background that is neither: each single rule names
  a class, their sum names the background."""
  rng = np.random.default_rng(0)
  n, d = 6, 8
  v = np.zeros((n, 3, d))
  v[:, 0] = rng.normal(size=(n, d))                        # object: a different one each time
  v[:, 1, 0] = 1.0                                         # stuff: identical
  v[:, 2, 1] = 1.0                                         # background: half shared ...
  extra = rng.normal(size=(n, d - 2))
  v[:, 2, 2:] = extra / np.linalg.norm(extra, axis=1, keepdims=True)   # ... half its own
  present = np.ones((n, 3), bool)
  labels = [np.array([[0, 0, 1, 1], [2, 2, 1, 1]], np.uint8)] * n
  prior = [np.array([[0.9, 0.9, 0.0, 0.0], [0.1, 0.1, 0.0, 0.0]])] * n
  assert postprocess.least_consistent_label(v, present) == 0
  assert postprocess.least_salient_label(labels, prior, 3) == 1
  assert postprocess.least_common_label(labels, prior, v, present) == 2
  # The ids do not matter: the same content under other labels.
  perm = np.array([2, 0, 1])
  relabelled = [perm[l].astype(np.uint8) for l in labels]
  v_perm = np.empty_like(v)
  v_perm[:, perm] = v
  assert postprocess.least_common_label(relabelled, prior, v_perm, present) == 1
  # A label seen in one image only cannot be compared: never chosen.
  present[1:, 2] = False
  assert postprocess.least_common_label(labels, prior, v, present) != 2


def test_saliency_and_consistency_rule_through_the_pipeline():
  images, labels = _stuff_group()
  config = defaults.multiclass()
  config.num_classes = 2
  config.data.image_size = images.shape[1]
  config.infer.background = 'saliency+consistency'
  assert multiclass.needs_prior(config)
  background = multiclass.Background.build(config, _pixel_extractor(), {})
  # The object is salient, the varied background a little, the grass not at all: saliency
  # alone calls the grass background, the sum keeps it as a class.
  prior = [np.choose(l, [0.1, 0.0, 1.0]).astype(np.float32) for l in labels]
  assert background.label(images, labels, 3, 'saliency', prior=prior) == 1
  assert background.label(images, labels, 3, config.infer.background, prior=prior) == 0


def test_swap_to_background():
  labels = [np.array([[0, 1, 2]], np.uint8)]
  np.testing.assert_array_equal(postprocess.swap_to_background(labels, 2, 3)[0], [[2, 1, 0]])


def test_center_prior_covers_forty_percent_in_the_middle():
  m = baseline.center_prior((120, 200))
  assert abs(m.mean() - 0.4) < 0.01
  assert m[60, 100] == 1 and m[0].sum() == 0 and m[:, 0].sum() == 0


def test_multiscale_features_are_unit_per_tap_on_the_finest_grid():
  a = jnp.ones((1, 4, 4, 3)) * 5.0
  b = jnp.arange(2 * 2 * 2, dtype=jnp.float32).reshape(1, 2, 2, 2) + 1.0
  out = baseline.multiscale([a, b])
  assert out.shape == (1, 4, 4, 5)
  np.testing.assert_allclose(np.linalg.norm(np.asarray(out[..., :3]), axis=-1), 1.0, rtol=1e-6)


def test_classes_txt_in_both_formats():
  assert data.parse_class_names(['tree', 'sky', '', 'grass']) == ('tree', 'sky', 'grass')
  assert data.parse_class_names(['0 background', '2 sky', '1 tree', '255 void']) == ('tree', 'sky')
  assert data.parse_class_names(['1 potted plant']) == ('potted plant',)
  with pytest.raises(InputError, match='1..K'):
    data.parse_class_names(['1 tree', '3 sky'])
  with pytest.raises(InputError, match='twice'):
    data.parse_class_names(['1 tree', '1 sky'])


def _group_dir(tmp_path, name, classes_lines, k):
  from PIL import Image
  g = tmp_path / name
  (g / 'images').mkdir(parents=True)
  (g / 'masks').mkdir()
  for i in range(2):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(g / 'images' / f'im{i}.png')
    Image.fromarray((np.arange(64).reshape(8, 8) % (k + 1)).astype(np.uint8)).save(
        g / 'masks' / f'im{i}.png')
  if classes_lines is not None:
    (g / 'classes.txt').write_text('\n'.join(classes_lines) + '\n')
  return str(g)


def test_num_classes_from_classes_txt(tmp_path):
  config = defaults.multiclass()
  assert config.num_classes is None        # unset by default: read from each group
  two = data.load_group(_group_dir(tmp_path, 'a', ['building', 'sky'], 2))
  three = data.load_group(_group_dir(tmp_path, 'b', ['0 background', '1 car', '2 road',
                                                     '3 building', '255 void'], 3))
  assert multiclass.group_num_classes(config, two) == 2
  assert multiclass.group_num_classes(config, three) == 3
  assert three.class_names == ('car', 'road', 'building')
  none = data.load_group(_group_dir(tmp_path, 'c', None, 1))
  assert multiclass.group_num_classes(config, none) is None  # estimated (test_num_classes)
  config.num_classes = 4                   # an explicit K wins
  assert multiclass.group_num_classes(config, none) == 4
  # With K unset, the masks are checked against the K classes.txt names.
  with pytest.raises(InputError, match=r'im0\.png: unknown label\(s\) 3; expected 0\.\.2'):
    data.load_group(_group_dir(tmp_path, 'd', ['building', 'sky'], 3))
  assert len(data.load_group(str(tmp_path / 'd'), num_classes=3).samples) == 2
