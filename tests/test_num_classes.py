"""Issue 15: K estimated when nobody gives it (multiclass/num_classes.py)."""
import json
import os
import types

import numpy as np
import pytest

from coseg_jax import api
from coseg_jax.core import config as defaults
from coseg_jax.core import report
from coseg_jax.multiclass import num_classes
from coseg_jax.multiclass import pipeline as multiclass

# Pure hues: the k-means features are unit vectors, so a class is its direction.
CLASS_COLOURS = np.array([[0.9, 0.1, 0.1], [0.1, 0.8, 0.1], [0.1, 0.1, 0.9], [0.8, 0.8, 0.1]])


def _pixel_extractor():
  """f whose dense feature is the pixel itself: masked pooling gives a region's mean colour."""
  return types.SimpleNamespace(name='efficientnet_lite0',
                               apply=lambda v, x, taps: {t: x + 0.05 for t in taps})


def _group(k, n=6, size=32, seed=0):
  """n images with the same k coloured squares (the common classes) on a background of
  each image's own random colour: the group has k classes, whatever the background does."""
  rng = np.random.default_rng(seed)
  images = []
  for _ in range(n):
    img = np.broadcast_to(rng.uniform(0.2, 1.0, 3), (size, size, 3)).copy()
    for c in range(k):
      y, x = rng.integers(0, size - 8, 2)
      img[y:y + 8, x:x + 8] = CLASS_COLOURS[c]
    images.append(np.clip(img + rng.normal(0, 0.02, img.shape), 0, 1).astype(np.float32))
  return np.stack(images)


@pytest.mark.parametrize('k', [1, 2, 3])
def test_estimate_finds_the_number_of_common_classes(k):
  config = defaults.multiclass()
  config.data.image_size = 32
  background = multiclass.Background.build(config, _pixel_extractor(), {})
  images = _group(k)
  est, loss = num_classes.estimate(background, images, list(images), 4, 0, 'consistency')
  assert sorted(loss) == [1, 2, 3, 4, 5]
  assert est == k, loss


def test_choose_takes_the_k_before_the_largest_relative_rise():
  assert num_classes.choose({1: 0.01, 2: 0.012, 3: 0.2, 4: 0.25}) == 2
  # Relative, not absolute: a rise from a small loss outweighs a larger step later.
  assert num_classes.choose({1: 0.01, 2: 0.08, 3: 0.3, 4: 0.6}) == 1
  assert num_classes.choose({1: 0.1, 2: 0.2, 3: 0.4}) == 1  # ties: the smaller K
  assert num_classes.choose({1: 0.3, 2: 0.1}) == 1  # max_classes = 1


def test_score_counts_ground_truth_classes_beyond_an_estimated_k():
  truth = np.array([[1, 2], [3, 0]], np.uint8)
  group = types.SimpleNamespace(samples=[types.SimpleNamespace(mask=truth, stem='a')])
  config = defaults.multiclass()
  config.num_classes = 2  # estimated too low: class 3 is lost, not ignored
  scores = multiclass.score(config, group, [np.array([[1, 2], [0, 0]], np.uint8)])
  assert len(scores['class_iou']) == 4 and scores['class_iou'][3] == 0.0
  assert scores['J'] == pytest.approx(2 / 3)


@pytest.mark.slow
def test_unset_k_is_estimated_logged_in_metrics_and_plotted(tmp_path):
  images = [(img * 255).astype(np.uint8) for img in _group(2, n=3, size=48)]
  workdir = str(tmp_path / 'run')
  result = api.cosegment(images, None, workdir=workdir, max_classes=2, baseline='cluster',
                         image_size=32, method='argmax')
  with open(os.path.join(workdir, 'metrics.json')) as f:
    metrics = json.load(f)
  estimate = metrics['num_classes_estimated'][api.GROUP_NAME]
  assert sorted(estimate['loss_per_k']) == ['1', '2', '3']
  assert result.num_classes == estimate['num_classes'] == metrics['num_classes']
  assert all(m.shape[-1] == result.num_classes + 1 for m in result.maps)
  assert max(int(l.max()) for l in result.labels) <= result.num_classes
  page = open(report.write(workdir)).read()
  assert f'Estimated K = {result.num_classes}' in page and 'alt="K criterion"' in page


def test_k_chart_draws_the_criterion_per_k():
  chart = report.k_chart({'num_classes': 2, 'criterion': 'loss',
                          'loss_per_k': {'1': 0.1, '2': 0.1, '3': 0.5}})
  assert chart.ndim == 3 and chart.dtype == np.uint8
  # The line is drawn in the first series colour.
  assert (chart == np.array(report.SERIES_COLOURS[0], np.uint8)).all(-1).sum() > 50


def test_k_estimate_reads_the_prior_foreground_the_one_class_rule_reads(monkeypatch):
  """With the 'saliency' rule the K estimate names the background from the same 0/1
  foreground of the co-saliency prior as the one-class init and rule, not the raw prior."""
  config = defaults.multiclass()
  config.data.image_size = 32
  config.infer.background, config.infer.method = 'saliency', 'argmax'  # argmax: prior > mean
  extractor = _pixel_extractor()
  extractor.tap_info = lambda: {'stride16': None, 'stride32': None}
  background = multiclass.Background.build(config, extractor, {})
  raw = [np.linspace(0, 1, 32 * 32, dtype=np.float32).reshape(32, 32) ** 3] * 3
  monkeypatch.setattr(multiclass.Background, 'co_saliency', lambda self, images: raw)
  monkeypatch.setattr(multiclass.baseline, 'dense_features', lambda b, v, images, taps: list(images))
  seen = {}
  monkeypatch.setattr(num_classes, 'estimate',
                      lambda *args: seen.setdefault('prior', args[-1]) and (1, {1: 0.0, 2: 1.0}))
  group = types.SimpleNamespace(samples=[types.SimpleNamespace(image=(img * 255).astype(np.uint8))
                                         for img in _group(1, n=3)])
  assert multiclass.estimate_num_classes(config, group, extractor, {}, background)[0] == 1
  for prior, r in zip(seen['prior'], raw):
    np.testing.assert_array_equal(prior, (r > r.mean()).astype(np.float32))
