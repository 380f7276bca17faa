"""mAP^r and CorLoc^r on hand-worked cases."""
import math

import numpy as np
import pytest

from coseg_jax.instance import metrics as im


def _box(y0, y1, x0, x1, shape=(10, 10)):
  m = np.zeros(shape, bool)
  m[y0:y1, x0:x1] = True
  return m


A = _box(0, 4, 0, 4)         # 16 px
B = _box(5, 10, 5, 10)       # 25 px
C = _box(0, 2, 6, 10)        # 8 px
B60 = _box(5, 10, 5, 8)      # 15 px inside B: IoU 15/25 = 0.6


def test_mask_iou():
  iou = im.mask_iou(np.stack([A, B60]), np.stack([A, B, np.zeros((10, 10), bool)]))
  np.testing.assert_allclose(iou, [[1, 0, 0], [0, 0.6, 0]])
  assert im.mask_iou(np.zeros((0, 10, 10), bool), np.stack([A])).shape == (0, 1)


def test_average_precision_duplicates_and_unmatched_gt():
  # Image 1: GT A, B; detections A (.9, TP), A again (.8, duplicate: FP), B60 (.7, IoU .6).
  # Image 2: GT C never detected. Ranked TP, FP, TP over 3 GT:
  # precision 1, .5, 2/3 at recall 1/3, 1/3, 2/3 -> AP = 1/3 * 1 + 1/3 * 2/3 = 5/9.
  dets = [[(A, 0.9), (A, 0.8), (B60, 0.7)], []]
  gts = [[A, B], [C]]
  assert im.average_precision(dets, gts, 0.5) == pytest.approx(5 / 9)
  # At 0.75 the B60 detection is a false positive: only the first TP counts.
  assert im.average_precision(dets, gts, 0.75) == pytest.approx(1 / 3)


def test_matching_follows_score_order_across_images():
  # Pooled ranking: image 2's false positive (.9) before image 1's true positive (.5);
  # 2 GT in all: precision 0, .5 at recall 0, .5 -> AP = .5 * .5 = .25.
  dets = [[(A, 0.5)], [(A, 0.9)]]
  gts = [[A], [C]]
  assert im.average_precision(dets, gts, 0.5) == pytest.approx(0.25)


def test_detection_goes_to_gt_of_highest_iou_and_threshold_is_strict():
  left, right = _box(0, 10, 0, 5), _box(0, 10, 5, 10)
  wide = _box(0, 10, 2, 10)    # IoU .3 with `left`, .625 with `right`
  narrow = _box(0, 10, 0, 4)   # IoU .8 with `left`
  # `wide` must take `right` (highest IoU), leaving `left` for `narrow`: both TP.
  assert im.average_precision([[(wide, 0.9), (narrow, 0.8)]], [[left, right]], 0.25) == pytest.approx(1.0)
  # IoU exactly at the threshold is not enough (> tau).
  assert im.average_precision([[(left, 0.9)]], [[_box(0, 10, 0, 10)]], 0.5) == 0.0


def test_empty_predictions_and_no_ground_truth():
  assert im.average_precision([[], []], [[A], [B]], 0.5) == 0.0
  assert math.isnan(im.average_precision([[(A, 1.0)]], [[]], 0.5))


def test_map_r_per_category_and_mean():
  dets = {'cat': [[(A, 0.9), (A, 0.8), (B60, 0.7)], []], 'dog': [[(C, 1.0)]]}
  gts = {'cat': [[A, B], [C]], 'dog': [[C]]}
  out = im.map_r(dets, gts)
  assert out['per_category']['cat']['0.5'] == pytest.approx(5 / 9)
  assert out['per_category']['dog']['0.75'] == pytest.approx(1.0)
  assert out['mean']['0.5'] == pytest.approx((5 / 9 + 1) / 2)
  assert out['mean']['0.25'] == pytest.approx((5 / 9 + 1) / 2)


def test_corloc_uses_top_scored_mask():
  dets = [[(A, 0.2), (B, 0.9)],   # top is B: correct
          [(C, 0.9), (A, 0.1)],   # top is C, GT A: wrong
          []]                     # nothing detected: wrong
  gts = [[B], [A], [A]]
  assert im.corloc(dets, gts) == pytest.approx(1 / 3)
  assert im.corloc([[(B60, 1.0)]], [[B]]) == 1.0
  assert im.corloc([[(B60, 1.0)]], [[B]], iou_thr=0.6) == 0.0
