"""Mask proposals (generator, file loaders, quality) and Eq. 7 ranking, NMS, filtering."""
import types

import h5py
import numpy as np
import pytest
import scipy.io
from scipy import ndimage

from coseg_jax.core.errors import InputError
from coseg_jax.instance import proposals


def _scene(h=96, w=128):
  rng = np.random.default_rng(0)
  image = rng.integers(60, 120, size=(h, w, 3), dtype=np.uint8)
  yy, xx = np.mgrid[:h, :w]
  objects = [(yy - 30) ** 2 + (xx - 30) ** 2 < 18 ** 2,          # two instances of one colour
             (yy - 62) ** 2 + (xx - 70) ** 2 < 16 ** 2,
             (np.abs(yy - 30) < 12) & (np.abs(xx - 100) < 20)]   # and a different object
  for m, c in zip(objects, [(220, 40, 40), (220, 40, 40), (40, 60, 230)]):
    image[m] = c
  # Two-tone object: only a merge of two base segments recovers it.
  image[objects[2] & (xx >= 100)] = (40, 200, 230)
  return image, objects


def test_generate_recalls_known_objects():
  image, objects = _scene()
  masks = proposals.generate(image, work_size=128, max_count=300)
  assert masks.dtype == bool and masks.shape[1:] == image.shape[:2]
  assert 0 < len(masks) <= 300
  area = masks.reshape(len(masks), -1).mean(1)
  assert area.min() >= 2e-5 and area.max() <= 0.85
  assert len(np.unique(np.packbits(masks.reshape(len(masks), -1), axis=1), axis=0)) == len(masks)
  quality = proposals.proposal_quality([masks], [objects])
  assert quality['recall@0.5'] == 1.0 and quality['abo'] > 0.85
  np.testing.assert_array_equal(proposals.generate(image, work_size=128, max_count=300), masks)
  assert len(proposals.generate(image, work_size=128, max_count=5)) == 5


def test_proposal_quality_hand_case():
  a = np.zeros((4, 4), bool)
  a[:2] = True
  half = np.zeros((4, 4), bool)
  half[:1] = True
  b = ~a
  q = proposals.proposal_quality([np.stack([a, half])], [[a, b]])
  assert q == {'recall@0.5': 0.5, 'abo': 0.5, 'num_gt': 2}


def _masks():
  """Two 6x8 masks: top-left 3x4 block and right half."""
  m = np.zeros((2, 6, 8), bool)
  m[0, :3, :4] = True
  m[1, :, 4:] = True
  return m


def _write_hdf5(path, write):
  with h5py.File(path, 'w') as f:
    write(f)


def test_load_proposals_all_layouts(tmp_path):
  m = _masks()
  superpixels = 1 + m[0] + 2 * m[1]  # 1 elsewhere, 2 in block 0, 3 in the right half
  labels = np.empty((2, 1), object)
  labels[0, 0], labels[1, 0] = np.array([[2]]), np.array([[3]])
  scipy.io.savemat(tmp_path / 'v5masks.mat', {'masks': np.moveaxis(m, 0, -1), 'scores': [1, 2]})
  scipy.io.savemat(tmp_path / 'v5mcg.mat', {'superpixels': superpixels, 'labels': labels})

  # v7.3 layout: HDF5 with MATLAB arrays transposed (test_saliency covers the MATLAB header).
  _write_hdf5(tmp_path / 'v73masks.mat', lambda f: f.create_dataset('masks', data=np.moveaxis(m, 0, -1).T))

  def mcg(f):
    f['superpixels'] = superpixels.T
    refs = [f.create_dataset(f'#refs#/{i}', data=np.array([[sp]], float)).ref for i, sp in enumerate((2, 3))]
    f.create_dataset('labels', data=np.array(refs, dtype=h5py.ref_dtype)[None])
  _write_hdf5(tmp_path / 'v73mcg.mat', mcg)
  _write_hdf5(tmp_path / 'c.h5', lambda f: f.create_dataset('masks', data=m))

  for name in ('v5masks.mat', 'v5mcg.mat', 'v73masks.mat', 'v73mcg.mat', 'c.h5'):
    np.testing.assert_array_equal(proposals.load_proposals(str(tmp_path / name), (6, 8)), m, err_msg=name)
  big = proposals.load_proposals(str(tmp_path / 'c.h5'), (12, 16))
  np.testing.assert_array_equal(big[:, ::2, ::2], m)


def test_load_proposals_errors(tmp_path):
  scipy.io.savemat(tmp_path / 'nokeys.mat', {'boxes': np.ones((3, 4))})
  with pytest.raises(InputError, match=r'nokeys\.mat: no "masks"'):
    proposals.load_proposals(str(tmp_path / 'nokeys.mat'), (6, 8))
  (tmp_path / 'bad.h5').write_bytes(b'garbage')
  with pytest.raises(InputError, match=r'bad\.h5: cannot read'):
    proposals.load_proposals(str(tmp_path / 'bad.h5'), (6, 8))
  _write_hdf5(tmp_path / 'wide.h5', lambda f: f.create_dataset('masks', data=_masks()))
  with pytest.raises(InputError, match=r'wide\.h5: masks are 6x8 but the image is 8x6'):
    proposals.load_proposals(str(tmp_path / 'wide.h5'), (8, 6))
  cfg = types.SimpleNamespace(source='folder', folder=str(tmp_path), min_area=2e-5, max_area=0.85)
  with pytest.raises(InputError, match=r'img7\.mat: no proposal file'):
    proposals.proposals_for(cfg, 'img7', np.zeros((6, 8, 3), np.uint8))


def test_proposals_for_folder_filters_area(tmp_path):
  m = _masks()
  full = np.ones((1, 6, 8), bool)
  _write_hdf5(tmp_path / 'img.h5', lambda f: f.create_dataset('masks', data=np.concatenate([m, full])))
  cfg = types.SimpleNamespace(source='folder', folder=str(tmp_path), min_area=2e-5, max_area=0.85)
  np.testing.assert_array_equal(proposals.proposals_for(cfg, 'img', np.zeros((6, 8, 3), np.uint8)), m)


def test_contours_inner_and_outer_band_borders_do_not_erode():
  square = np.zeros((1, 20, 20), bool)
  square[0, 5:15, 5:15] = True
  # 5x5: dilation reaches 2 px out, erosion 2 px in: a 14x14 minus 6x6 ring.
  assert proposals.contours(square).sum() == 14 * 14 - 6 * 6
  bar = np.zeros((1, 20, 20), bool)
  bar[0, :5] = True  # touches three borders: only the bottom edge is a contour
  contour = proposals.contours(bar)[0]
  assert contour.sum() == 4 * 20 and contour[3:7].all()


@pytest.mark.parametrize('width', [1, 2, 3, 4, 5, 8])
def test_contours_equal_ndimage_grey_morphology_at_any_width(width):
  # The definition the shifts implement: a width x width window, edge pixels repeated.
  masks = np.random.default_rng(width).random((3, 17, 23)) > 0.55
  size = (1, width, width)
  want = (ndimage.maximum_filter(masks, size, mode='nearest')
          != ndimage.minimum_filter(masks, size, mode='nearest'))
  np.testing.assert_array_equal(proposals.contours(masks, width), want)


def test_rank_proposals_hand_values():
  o = np.zeros((1, 6, 6))
  o[0, 2, 2], o[0, 2, 3] = 1.0, 0.5
  s = np.full((6, 6), 0.5)
  s[2, 2] = 1.0
  p = np.zeros((3, 6, 6), bool)
  p[0, 2, 2] = True                # .8 * 1
  p[1, 2, 2:4] = True              # .8 * (1 + .25) - 1e-5 * .5
  p[2, 1:5, 1:5] = True            # .8 * 1.25 - 1e-5 * 15 * .5
  best, score = proposals.rank_proposals(o, s, p, contour_width=1)
  assert best.tolist() == [1] and score[0] == pytest.approx(1.0 - 5e-6, abs=1e-7)
  # A single pixel's 5x5 contour is its whole 5x5 neighbourhood: + sum(O S) there = 1.25.
  best, score = proposals.rank_proposals(o, s, p[:1], contour_width=5)
  assert score[0] == pytest.approx(0.8 + 1.25, rel=1e-6)
  best, score = proposals.rank_proposals(o, s, p[:0])
  assert len(best) == 0 and len(score) == 0


def test_rank_proposals_unit_mass_and_reference_area():
  rng = np.random.default_rng(0)
  o = rng.uniform(size=(3, 12, 12)) ** 4
  s = rng.uniform(size=(12, 12))
  p = rng.uniform(size=(40, 12, 12)) < 0.3
  unit = o / o.sum(axis=(1, 2), keepdims=True)
  literal_best, literal_score = proposals.rank_proposals(unit, s, p, background_penalty=0.05)
  # reference_area = this image's pixels and maps of unit sum: literally Eq. 7.
  best, score = proposals.rank_proposals(unit * 7.0, s, p, background_penalty=0.05,
                                         reference_area=144)
  assert best.tolist() == literal_best.tolist()
  np.testing.assert_allclose(score, literal_score, rtol=1e-5)
  # The maps' gain no longer matters; a 4x larger reference area is a 4x larger penalty.
  best, score = proposals.rank_proposals(unit * 0.01, s, p, background_penalty=0.05 / 4,
                                         reference_area=4 * 144)
  np.testing.assert_allclose(score, literal_score, rtol=1e-5)
  # Without normalisation a larger gain favours larger proposals (the drift it removes).
  area = p.sum(axis=(1, 2))
  small, _ = proposals.rank_proposals(unit * 0.01, s, p, background_penalty=0.05)
  large, _ = proposals.rank_proposals(unit * 100.0, s, p, background_penalty=0.05)
  assert area[large].mean() > area[small].mean()


def test_mask_nms_greedy_in_score_order():
  def cols(a, b):
    m = np.zeros((1, 10), bool)
    m[0, a:b] = True
    return m
  masks = np.stack([cols(0, 4), cols(2, 6), cols(5, 10), cols(0, 4)])
  # Score order 1, 0, 3, 2. IoU(0, 1) = 2/6, IoU(1, 2) = 1/8, IoU(0, 2) = 0; 3 duplicates 0.
  keep = proposals.mask_nms(masks, np.array([0.9, 0.95, 0.8, 0.85]), iou_thr=0.34)
  assert keep.tolist() == [1, 0, 2]
  keep = proposals.mask_nms(masks, np.array([0.9, 0.95, 0.8, 0.85]), iou_thr=0.3)
  assert keep.tolist() == [1, 2]


def test_drop_low_scores_matlab_percentile_and_best_per_image():
  # Pooled [.1 .5 1 2 3 10]: MATLAB prctile(.., 20) = .1 + .7 * (.5 - .1) = .38.
  keep = proposals.drop_low_scores([[1, 2, 3], [0.5], [10, 0.1]], 20)
  assert [k.tolist() for k in keep] == [[0, 1, 2], [0], [0]]
  # Threshold 0.1 + 0.9 * 4.9 = 4.51: image 1 would lose everything, so keeps its best.
  keep = proposals.drop_low_scores([[5, 6, 7, 8], [0.1, 0.05], [9, 10], []], 20)
  assert [k.tolist() for k in keep] == [[0, 1, 2, 3], [0], [0, 1], []]


def test_select_instances_merges_peaks_on_one_proposal():
  o = np.zeros((2, 6, 6))
  o[0, 1, 1] = o[1, 2, 2] = 1.0
  p = np.zeros((2, 6, 6), bool)
  p[0, :3, :3] = True
  p[1, 4:, 4:] = True
  masks, scores = proposals.select_instances(o, np.ones((6, 6)), p, nms_iou=0.4)
  assert len(masks) == 1 and np.array_equal(masks[0], p[0])
  masks, scores = proposals.select_instances(o, np.ones((6, 6)), p[:0])  # no proposals
  assert masks.shape == (0, 6, 6) and len(scores) == 0


def test_every_candidate_is_a_detection_scored_by_its_best_peak():
  # Three people, two peaks (both on the left one): 'peaks' keeps one detection, the
  # left person; 'candidates' keeps all three, each scored by Eq. 7 of its best peak.
  h, w = 20, 30
  yy, xx = np.mgrid[:h, :w]
  people = np.stack([(np.abs(xx - c) < 3) & (yy > 4) for c in (5, 15, 25)])
  sal = np.where(people.any(0), 0.9, 0.1)
  prm = np.stack([np.exp(-((yy - 10) ** 2 + (xx - x0) ** 2) / 8.0) for x0 in (4, 7)])
  kw = dict(reference_area=h * w, contour_width=3)
  masks, scores = proposals.select_instances(prm, sal, people, **kw)
  assert len(masks) == 1 and np.array_equal(masks[0], people[0])
  masks, scores = proposals.select_instances(prm, sal, people, detections='candidates', **kw)
  assert len(masks) == 3
  expected = proposals.proposal_scores(prm, sal, people, **kw).max(axis=1)
  order = np.argsort(-expected)
  np.testing.assert_array_equal(masks, people[order])
  np.testing.assert_allclose(scores, expected[order])
  assert np.array_equal(masks[0], people[0])   # the person under the peaks ranks first
  # Overlapping candidates still go through NMS.
  twice = np.concatenate([people, people[:1]])
  masks, _ = proposals.select_instances(prm, sal, twice, detections='candidates', **kw)
  assert len(masks) == 3
  # No candidates: no detections either way.
  masks, scores = proposals.select_instances(prm, sal, people[:0], detections='candidates', **kw)
  assert masks.shape == (0, h, w) and len(scores) == 0


def test_generate_recovers_a_non_convex_object():
  # A C-shaped (non-convex) object on textured clutter: its bounding box is mostly
  # background, so a box-shaped or convex candidate cannot reach IoU 0.8.
  rng = np.random.default_rng(1)
  h, w = 96, 96
  image = rng.integers(70, 130, size=(h, w, 3), dtype=np.uint8)
  yy, xx = np.mgrid[:h, :w]
  ring = ((yy - 48) ** 2 + (xx - 48) ** 2 < 34 ** 2) & ((yy - 48) ** 2 + (xx - 48) ** 2 > 20 ** 2)
  c_shape = ring & ~((np.abs(yy - 48) < 10) & (xx > 48))
  image[c_shape] = (210, 60, 50)
  masks = proposals.generate(image, work_size=96, max_count=300)
  best = proposals.best_overlaps(masks, [c_shape])[0]
  assert best > 0.8
  hull_fill = c_shape.sum() / ((yy - 48) ** 2 + (xx - 48) ** 2 < 34 ** 2).sum()
  assert hull_fill < 0.6  # the object really is far from convex


def test_rank_proposals_picks_the_proposal_under_a_known_prm_map():
  # Two instances; each peak's response map is a blob on one of them. Every candidate
  # (each instance, both together, halves, the background) is offered: each peak must
  # take exactly its own instance, and the pair proposal must lose to both.
  h, w = 40, 60
  yy, xx = np.mgrid[:h, :w]
  left = (np.abs(yy - 20) < 12) & (np.abs(xx - 15) < 6)
  right = (np.abs(yy - 20) < 12) & (np.abs(xx - 45) < 6)
  sal = np.where(left | right, 0.9, 0.1)
  prm = np.stack([np.exp(-((yy - 18) ** 2 + (xx - 15) ** 2) / 30.0),
                  np.exp(-((yy - 22) ** 2 + (xx - 45) ** 2) / 30.0)])
  cands = np.stack([left | right, left, right, left & (yy < 20), right & (yy >= 20),
                    ~(left | right), np.ones((h, w), bool)])
  best, _ = proposals.rank_proposals(prm, sal, cands, reference_area=h * w, contour_width=3)
  assert best.tolist() == [1, 2]
  masks, _ = proposals.select_instances(prm, sal, cands, reference_area=h * w, contour_width=3)
  assert len(masks) == 2 and {m.sum() for m in masks} == {left.sum()}
