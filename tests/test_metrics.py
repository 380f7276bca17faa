import itertools

import numpy as np
import pytest

from coseg_jax.multiclass import metrics


def test_confusion_hand_worked_and_ignores_255():
  gt = np.array([[0, 0, 1], [1, 2, 255]], np.uint8)
  pred = np.array([[0, 1, 1], [1, 2, 0]], np.uint8)
  expected = np.array([[1, 1, 0],
                       [0, 2, 0],
                       [0, 0, 1]])
  np.testing.assert_array_equal(metrics.confusion(pred, gt, 3), expected)
  pred_other = pred.copy()
  pred_other[1, 2] = 2  # under an ignored pixel: must not count
  np.testing.assert_array_equal(metrics.confusion(pred_other, gt, 3), expected)


def test_confusion_rejects_out_of_range_labels():
  with pytest.raises(ValueError, match='prediction'):
    metrics.confusion(np.array([3]), np.array([0]), 3)
  with pytest.raises(ValueError, match='ground truth'):
    metrics.confusion(np.array([0]), np.array([7]), 3)


def test_hand_worked_p_and_j():
  gt = np.array([[0, 0, 1, 1],
                 [0, 0, 1, 1],
                 [2, 2, 255, 255]], np.uint8)
  pred = np.array([[0, 1, 1, 1],
                   [0, 0, 1, 1],
                   [2, 0, 0, 0]], np.uint8)
  s = metrics.score_group([pred], [gt], 2, fixed_background=True)
  assert s['mapping'] == [0, 1, 2]
  im = s['images'][0]
  assert im['P'] == pytest.approx(8 / 10)
  # class 1: inter 4, union 5; class 2: inter 1, union 2; background: inter 3, union 5.
  assert im['iou'] == pytest.approx([3 / 5, 4 / 5, 1 / 2])
  assert im['J'] == pytest.approx((4 / 5 + 1 / 2) / 2)
  assert s['J_pooled'] == pytest.approx(im['J'])


def _random_group(rng, num_classes, n=3, shape=(6, 7)):
  return [rng.integers(0, num_classes + 1, shape).astype(np.uint8) for _ in range(n)]


def test_matching_recovers_permutation_with_fixed_background():
  rng = np.random.default_rng(0)
  gts = _random_group(rng, 3)
  perm = np.array([0, 3, 1, 2])
  preds = [perm[g].astype(np.uint8) for g in gts]
  s = metrics.score_group(preds, gts, 3, fixed_background=True)
  assert s['P'] == 1.0 and s['J'] == 1.0 and s['J_pooled'] == 1.0
  np.testing.assert_array_equal(np.array(s['mapping'])[perm], np.arange(4))


def test_fixed_background_keeps_zero_and_free_matching_moves_it():
  rng = np.random.default_rng(1)
  gts = _random_group(rng, 2)
  swap = np.array([1, 0, 2])  # the prediction calls background "1" and class 1 "0"
  preds = [swap[g].astype(np.uint8) for g in gts]
  fixed = metrics.score_group(preds, gts, 2, fixed_background=True)
  assert fixed['mapping'][0] == 0
  assert fixed['P'] < 1.0
  free = metrics.score_group(preds, gts, 2, fixed_background=False)
  assert free['mapping'] == [1, 0, 2]
  assert free['P'] == 1.0 and free['J'] == 1.0


@pytest.mark.parametrize('fixed_background', [True, False])
def test_matching_maximises_pooled_iou_sum(fixed_background):
  rng = np.random.default_rng(2)
  K = 3
  gts, preds = _random_group(rng, K), _random_group(rng, K)
  conf = sum(metrics.confusion(p, g, K + 1) for p, g in zip(preds, gts))
  union = conf.sum(0)[None] + conf.sum(1)[:, None] - conf
  iou = conf / union

  def total(mapping):
    return sum(iou[mapping[p], p] for p in range(K + 1))

  first = 1 if fixed_background else 0
  best = max(total(list(range(first)) + list(rest))
             for rest in itertools.permutations(range(first, K + 1)))
  mapping = metrics.match_labels(preds, gts, K, fixed_background=fixed_background)
  assert total(mapping) == pytest.approx(best)
  assert sorted(mapping) == list(range(K + 1))


def test_one_mapping_for_the_whole_group():
  # Image a (larger) calls class 1 "1"; image b calls it "2". The group map follows the
  # pooled counts, and b is then scored with it (J = 0), not re-matched on its own.
  gt_a, gt_b = np.array([[0, 1, 1, 2]] * 4, np.uint8), np.array([[0, 1, 1, 2]], np.uint8)
  pred_b = np.array([[0, 2, 2, 1]], np.uint8)
  s = metrics.score_group([gt_a, pred_b], [gt_a, gt_b], 2, fixed_background=True)
  assert s['mapping'] == [0, 1, 2]
  assert s['images'][0]['J'] == 1.0
  assert s['images'][1]['J'] == 0.0
  assert s['images'][1]['P'] == pytest.approx(1 / 4)


def test_absent_classes_in_per_image_j():
  gt = np.array([[0, 0, 1, 1]], np.uint8)
  # Class 2 absent from both: skipped, J = IoU of class 1 only.
  s = metrics.score_group([np.array([[0, 1, 1, 1]], np.uint8)], [gt], 2, fixed_background=True)
  assert s['images'][0]['iou'][2] is None
  assert s['images'][0]['J'] == pytest.approx(2 / 3)
  # Class 2 predicted but absent from the GT: IoU 0 counts.
  s = metrics.score_group([np.array([[0, 2, 1, 1]], np.uint8)], [gt], 2, fixed_background=True)
  assert s['images'][0]['J'] == pytest.approx((1.0 + 0.0) / 2)
  # All background in both: J = 1.
  bg = np.zeros((2, 2), np.uint8)
  s = metrics.score_group([bg], [bg], 2, fixed_background=True)
  assert s['images'][0]['J'] == 1.0 and s['images'][0]['P'] == 1.0
  assert s['J_pooled'] is None


def test_summarize_and_table():
  gt = np.array([[0, 0, 1, 1]], np.uint8)
  g1 = metrics.score_group([np.array([[0, 1, 1, 1]], np.uint8)], [gt], 1,
                           fixed_background=True, names=['cat_01'])
  g2 = metrics.score_group([gt], [gt], 1, fixed_background=True)
  summary = metrics.summarize({'cats': g1, 'dogs': g2})
  assert summary['mean']['P'] == pytest.approx((3 / 4 + 1) / 2)
  assert summary['mean']['J'] == pytest.approx((2 / 3 + 1) / 2)
  table = metrics.format_table(summary)
  assert 'cat_01' in table and '[cats]' in table and '[dogs]' in table
  assert '0.750' in table and '0.667' in table
  assert f'{summary["mean"]["P"]:.3f}' in table.splitlines()[-1]
  assert f'{summary["mean"]["J"]:.3f}' in table.splitlines()[-1]
