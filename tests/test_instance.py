"""DeepCO3 pipeline (coseg_jax.instance) end to end through main.run, and its helpers."""
import json
import os
import shutil

import flax.linen as nn
import h5py
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest
from scipy import ndimage

from coseg_jax.backbones import weights
from coseg_jax.cli import main
from coseg_jax.core import config as defaults
from coseg_jax.core import data
from coseg_jax.core import demo
from coseg_jax.core import saliency
from coseg_jax.core import visualize
from coseg_jax.core.errors import InputError
from coseg_jax.instance import baseline as instance_baseline
from coseg_jax.instance import metrics as instance_metrics
from coseg_jax.instance import model as deepco3
from coseg_jax.instance import pipeline as instance
from coseg_jax.instance import proposals

_SIZE = 96  # demo images; the network sees 64 x 64


@pytest.fixture(scope='module')
def group_dir(tmp_path_factory):
  """4 images of 1-3 cat heads with exact instance masks."""
  return demo.make_instance_demo(str(tmp_path_factory.mktemp('data')), num_images=4, size=_SIZE)


def _config(root, **baseline):
  c = defaults.instance()
  c.data.root = root
  c.data.image_size = 64
  c.data.batch_size = 2
  c.train.steps = 2  # one pass over the 4 images in batches of 2
  c.output.quiet = True
  c.update(baseline)
  return c


def _read(path):
  with open(path) as f:
    return json.load(f)


def _png(path):
  return np.asarray(Image.open(path))


def _check_metrics(scores):
  for k in ('mAP_r@0.25', 'mAP_r@0.5', 'mAP_r@0.75', 'CorLoc_r'):
    assert 0.0 <= scores[k] <= 1.0, (k, scores[k])
  # A higher IoU threshold can only lose true positives.
  assert scores['mAP_r@0.25'] >= scores['mAP_r@0.5'] >= scores['mAP_r@0.75']


def _check_outputs(group, out_dir):
  """Files agree with each other and with the images; returns per image (masks, scores)."""
  det = _read(os.path.join(out_dir, 'detections.json'))
  assert [r['stem'] for r in det['images']] == [s.stem for s in group.samples]
  found = []
  for record, sample in zip(det['images'], group.samples):
    shape = sample.image.shape[:2]
    labels = _png(os.path.join(out_dir, record['labels']))
    assert labels.shape == shape
    insts = record['instances']
    assert insts, 'every image keeps at least its best detection'
    scores = [i['score'] for i in insts]
    assert scores == sorted(scores, reverse=True) and all(np.isfinite(scores))
    assert labels.max() == len(insts)
    masks = []
    for inst in insts:
      mask = _png(os.path.join(out_dir, inst['mask'])) > 0
      assert mask.shape == shape and mask.sum() == inst['area']
      x, y, w, h = inst['bbox_xywh']
      assert mask[y:y + h, x:x + w].sum() == inst['area']
      assert mask[y, x:x + w].any() and mask[y + h - 1, x:x + w].any()
      # The label map shows instance `rank` wherever no better-ranked instance lies.
      assert np.all((labels == inst['rank']) <= mask)
      masks.append(mask)
    found.append((np.stack(masks), np.asarray(scores)))
    assert _png(os.path.join(out_dir, 'overlays', f'{sample.stem}.png')).shape == shape + (3,)
  assert os.path.isfile(os.path.join(out_dir, 'contact_sheet.png'))
  return found


def _corloc(found, group):
  return instance_metrics.corloc([list(zip(m, s)) for m, s in found],
                                 [s.instances for s in group.samples])


@pytest.mark.slow
def test_deepco3_end_to_end(group_dir, tmp_path):
  workdir = str(tmp_path / 'run')
  summary = main.run(_config(group_dir), workdir)
  group = data.load_group(group_dir, need='instances')
  metrics = _read(os.path.join(workdir, 'metrics.json'))
  assert metrics == json.loads(json.dumps(summary))
  assert metrics['method'] == 'DeepCO3'
  bb = metrics['backbone']
  expected = weights.resolve_name('auto', 'encoder', defaults.instance().weights)
  assert bb['name'] == expected and bb['feature'] == instance.FEATURE_TAPS[expected] and bb['weights']
  scores = metrics['groups'][group.name]
  _check_metrics(scores)
  _check_metrics(metrics['mean'])
  assert scores['gt_instances'] == sum(len(s.instances) for s in group.samples)
  assert 0.0 <= scores['proposal_recall@0.5'] <= 1.0 and 0.0 < scores['proposal_abo'] <= 1.0
  out_dir = os.path.join(workdir, group.name)
  found = _check_outputs(group, out_dir)
  assert scores['detections'] == sum(len(s) for _, s in found)
  # Scores come from the written masks, not from a different copy of them.
  assert scores['CorLoc_r'] == pytest.approx(_corloc(found, group))
  log = [json.loads(l) for l in open(os.path.join(out_dir, 'loss.jsonl'))]
  assert [r['step'] for r in log] == [1, 2]
  assert all(np.isfinite(r['loss']) and r['copeaks_per_pair'] >= 1 for r in log)


def test_saliency_baseline_is_components_of_the_prior(group_dir, tmp_path):
  workdir = str(tmp_path / 'base')
  config = _config(group_dir, baseline='saliency')
  # SPEC §6(b) as written: whole components (the split has its own tests below).
  config.saliency.split = 'none'
  summary = main.run(config, workdir)
  group = data.load_group(group_dir, need='instances')
  assert summary['method'] == 'saliency baseline' and summary['backbone'] is None
  # The default prior, ddt_mbd, reads the frozen backbone's DDT tap.
  name = weights.resolve_name('auto', 'encoder', config.weights)
  assert summary['saliency_backbone']['feature'] == saliency.DDT_TAPS[name]
  backbone, variables = weights.load_backbone(name, config.weights)
  priors = saliency.saliency_prior(config.saliency, group,
                                   instance.descriptor_fn(config, backbone, variables))
  assert not os.path.exists(os.path.join(workdir, group.name, 'checkpoints'))
  scores = summary['groups'][group.name]
  _check_metrics(scores)
  found = _check_outputs(group, os.path.join(workdir, group.name))
  for (masks, got), prior, sample in zip(found, priors, group.samples):
    fg = saliency.foreground(sample.image, prior, config.saliency.crf, config.saliency.crf_floor)
    labels, n = ndimage.label(fg)
    big = [i for i in range(1, n + 1) if (labels == i).sum() >= labels.size / saliency.MBD_SEGMENTS]
    assert len(masks) == len(big) > 0  # no percentile filter, no NMS
    want = sorted((prior[labels == i].sum() / prior.size for i in big), reverse=True)
    np.testing.assert_allclose(got, want, rtol=1e-4)
    np.testing.assert_array_equal(masks.any(0), np.isin(labels, big))
  assert scores['CorLoc_r'] == pytest.approx(_corloc(found, group))


@pytest.mark.slow
def test_dataset_of_categories_scores_each_and_the_mean(group_dir, tmp_path):
  root = tmp_path / 'dataset'
  shutil.copytree(group_dir, root / 'cats')
  demo.make_instance_demo(str(tmp_path / 'other'), num_images=3, size=_SIZE, seed=5)
  shutil.copytree(tmp_path / 'other' / 'cat_heads', root / 'more_cats')
  shutil.copytree(root / 'more_cats' / 'images', root / 'unlabelled' / 'images')
  shutil.copytree(root / 'more_cats' / 'images', root / 'no_objects' / 'images')
  os.makedirs(root / 'no_objects' / 'instances')
  workdir = str(tmp_path / 'run')
  summary = main.run(_config(str(root), baseline='saliency'), workdir)
  # Groups without instance masks are predicted but not scored.
  assert sorted(summary['groups']) == ['cats', 'more_cats', 'no_objects']
  assert os.path.isfile(os.path.join(workdir, 'unlabelled', 'detections.json'))
  # Annotated, but nothing to find: no AP, and left out of the means.
  assert summary['groups']['no_objects']['mAP_r@0.5'] is None
  assert summary['groups']['no_objects']['gt_instances'] == 0
  for k, v in summary['mean'].items():
    assert v == pytest.approx(np.mean([summary['groups'][g][k] for g in ('cats', 'more_cats')])), k


def test_saliency_components_rank_by_prior_mass_and_drop_specks():
  prior = np.full((30, 40), 0.05, np.float32)
  prior[2:12, 2:12] = 0.5    # a person: 100 px of moderate prior
  prior[20:22, 30:32] = 0.9  # 4 px of high prior: ranked below the person, above the line
  prior[25, 5] = 0.9         # 1 px, under one superpixel (1200 / 300 = 4 px): dropped
  prior[2:12, 20] = 0.3      # a thin part of the foreground that does not touch the rest
  masks, scores = instance_baseline.saliency_components(prior, prior > 0.1)
  np.testing.assert_allclose(scores, np.array([50.0, 3.6, 3.0]) / prior.size, rtol=1e-6)
  assert [m.sum() for m in masks] == [100, 4, 10]
  assert masks[0][2:12, 2:12].all() and masks[1][20:22, 30:32].all()
  assert not masks.any(0)[25, 5]
  empty_masks, empty_scores = instance_baseline.saliency_components(prior, np.zeros((30, 40), bool))
  assert empty_masks.shape == (0, 30, 40) and not len(empty_scores)


def _ellipse(shape, cy, cx, ry, rx):
  yy, xx = np.mgrid[:shape[0], :shape[1]]
  return (yy - cy) ** 2 / ry ** 2 + (xx - cx) ** 2 / rx ** 2 <= 1


def _people_group():
  """Four 48 x 80 priors: upright people (height 2.5x width) of three sizes, one image
  with three of them touching side by side, one with a person twice as tall for its width."""
  shape = (48, 80)
  people = [[_ellipse(shape, 24, 40, 20, 8)], [_ellipse(shape, 20, 30, 15, 6)],
            [_ellipse(shape, 24, cx, 20, 8) for cx in (24, 39, 54)],
            [_ellipse(shape, 24, 40, 22, 4.4)]]
  priors = [np.where(np.any(p, 0), 0.9, 0.05).astype(np.float32) for p in people]
  return people, priors


def test_group_aspect_split_cuts_people_side_by_side_only():
  people, priors = _people_group()
  whole = instance_baseline.group_components(priors, [p > 0.5 for p in priors], 'none')
  assert [len(m) for m, _ in whole] == [1, 1, 1, 1]  # the three are one component
  split = instance_baseline.group_components(priors, [p > 0.5 for p in priors], 'aspect')
  assert [len(m) for m, _ in split] == [1, 1, 3, 1]
  for (masks, scores), gts, prior in zip(split, people, priors):
    best = proposals.best_overlaps(masks, gts)
    assert min(best) > 0.8, best  # each person is an instance, the tall one uncut
    np.testing.assert_allclose(scores, [(prior * m).sum() / m.size for m in masks], rtol=1e-6)
    assert list(scores) == sorted(scores, reverse=True)
  assert max(proposals.best_overlaps(whole[2][0], people[2])) < 0.5


def test_group_aspect_split_keeps_a_group_of_wide_objects_whole():
  """The ratio is the group's own: horses, wider than tall, are not cut for being wide."""
  shape = (48, 80)
  horses = [_ellipse(shape, 24, 40, 8, 24), _ellipse(shape, 20, 30, 6, 15), _ellipse(shape, 30, 44, 10, 30)]
  priors = [np.where(h, 0.9, 0.05).astype(np.float32) for h in horses]
  split = instance_baseline.group_components(priors, [p > 0.5 for p in priors], 'aspect')
  assert [len(m) for m, _ in split] == [1, 1, 1]
  assert all(np.array_equal(m[0], h) for (m, _), h in zip(split, horses))


def test_the_baseline_splits_people_side_by_side_end_to_end(tmp_path):
  """`saliency.split` reaches the baseline's detections through the pipeline."""
  people, priors = _people_group()
  samples = [data.Sample(f'im{i}', str(tmp_path / f'im{i}.png'), np.zeros(p.shape + (3,), np.uint8), instances=g)
             for i, (p, g) in enumerate(zip(priors, people))]
  group = data.Group('people', str(tmp_path), samples)
  config = _config(None, baseline='saliency')
  config.saliency.refine = 'none'
  hits = {}
  for split in instance_baseline.SPLITS:
    config.saliency.split = split
    masks, scores, _ = instance.detect_group(config, group, priors, None, None)
    hits[split] = instance.score_group('people', masks, scores, masks, [s.instances for s in samples])
  assert hits['aspect']['mAP_r@0.5'] == pytest.approx(1.0)
  assert hits['aspect']['detections'] == 6 and hits['none']['detections'] == 4
  assert hits['none']['mAP_r@0.5'] < 0.5


def _two_people():
  """A 24 x 32 image's two people side by side, its prior, and a peak's map on each."""
  yy, xx = np.mgrid[:24, :32]
  people = [(yy - 12) ** 2 / 64 + (xx - cx) ** 2 / 16 <= 1 for cx in (8, 24)]
  prior = np.where(people[0] | people[1], 0.9, 0.05).astype(np.float32)
  prms = np.stack([np.exp(-((yy - 12) ** 2 + (xx - cx) ** 2) / 8.0) for cx in (8, 24)])
  return people, prior, prms


def test_the_ranking_can_choose_the_prior_components_the_proposals_lack(tmp_path):
  """With `proposals.prior_components` the prior's components join the candidates, and a
  peak's map on a person selects that person's outline where no proposal has it."""
  people, prior, prms = _two_people()
  halves = np.zeros((2, 24, 32), bool)
  halves[0, :, :16] = halves[1, :, 16:] = True  # each holds one person and its ground
  with h5py.File(tmp_path / 'img.h5', 'w') as f:
    f.create_dataset('masks', data=halves)
  config = defaults.instance()
  config.proposals.source, config.proposals.folder = 'folder', str(tmp_path)
  sample = data.Sample('img', str(tmp_path / 'img.png'), np.zeros((24, 32, 3), np.uint8))
  for with_components in (True, False):
    config.proposals.prior_components = with_components
    components, _ = instance_baseline.saliency_components(prior, prior > prior.mean())
    candidates = instance.candidate_masks(config, sample, components)
    assert len(candidates) == 2 + 2 * with_components
    masks, _ = proposals.select_instances(prms, prior, candidates, reference_area=24 * 32)
    best = proposals.best_overlaps(masks, people)
    if with_components:
      assert min(best) == 1.0, best
    else:
      assert max(best) < 0.5, best


def test_without_proposals_the_peaks_rank_the_baseline_instances():
  """`proposals.source='none'`: Eq. 7 chooses among the saliency baseline's instances only,
  so a peak's map picks its person's piece, not a larger region around it."""
  people, prior, prms = _two_people()
  components, _ = instance_baseline.saliency_components(prior, prior > prior.mean())
  config = defaults.instance()
  config.proposals.source = 'none'
  sample = data.Sample('img', 'img.png', np.zeros((24, 32, 3), np.uint8))
  candidates = instance.candidate_masks(config, sample, components)
  np.testing.assert_array_equal(candidates, components)
  config.proposals.source = 'builtin'  # the superpixel grouping's regions, then the instances
  image = np.where(prior[..., None] > 0.5, [200, 40, 40], [40, 120, 40]).astype(np.uint8)
  built = instance.candidate_masks(config, data.Sample('img', 'img.png', image), components)
  own = proposals.generate(image, min_area=config.proposals.min_area, max_area=config.proposals.max_area)
  assert len(own) > 0
  np.testing.assert_array_equal(built, np.concatenate([own, components]))
  masks, _ = proposals.select_instances(prms, prior, candidates, reference_area=24 * 32)
  assert len(masks) == 2 and min(proposals.best_overlaps(masks, people)) == 1.0
  # 'auto' detections: every instance without proposals, a peak's best with them.
  assert instance.detections(config) == 'peaks'
  config.proposals.source = 'none'
  assert instance.detections(config) == 'candidates'
  config.rank.detections = 'peaks'
  assert instance.detections(config) == 'peaks'


def test_no_proposals_and_no_components_is_a_config_error(tmp_path):
  c = _config(None)
  c.proposals.source, c.proposals.prior_components = 'none', False
  with pytest.raises(InputError, match='no candidates'):
    instance.run(c, str(tmp_path))
  assert not os.listdir(tmp_path)


def test_instance_labels_best_rank_wins_and_bbox():
  a = np.zeros((5, 6), bool)
  a[1:4, 1:4] = True
  b = np.zeros((5, 6), bool)
  b[2:5, 3:6] = True
  labels = visualize.instance_labels([a, b], (5, 6))
  assert labels[2, 3] == 1 and labels[4, 5] == 2 and labels[0, 0] == 0
  assert visualize.instance_labels([], (2, 3)).shape == (2, 3)
  assert instance.bbox_xywh(b) == [3, 2, 3, 3]


@pytest.mark.parametrize('field, value, words', [
    ('baseline', 'cluster', 'config.baseline'),
    ('proposals.source', 'mcg', 'config.proposals.source'),
    ('proposals.source', 'folder', 'proposals folder does not exist'),
    ('saliency.prior', 'folder', 'saliency folder does not exist'),
    ('saliency.split', 'voronoi', 'config.saliency.split'),
    ('rank.detections', 'all', 'config.rank.detections'),
    ('data.batch_size', 3, 'must be even'),
])
def test_bad_config_fails_before_any_work(tmp_path, field, value, words):
  c = _config(None)
  section, name = field.split('.') if '.' in field else (None, field)
  (c[section] if section else c)[name] = value
  with pytest.raises(InputError, match=words):
    instance.run(c, str(tmp_path))
  assert not os.listdir(tmp_path)  # not even the demo data


def test_unknown_feature_tap():
  bb, _ = weights.load_backbone('efficientnet_lite0', defaults.instance().weights)
  assert instance.feature_tap('auto', bb) == 'head'
  assert instance.feature_tap('stride16', bb) == 'stride16'
  with pytest.raises(InputError, match='no tap'):
    instance.feature_tap('conv5_3', bb)


class _TinyNet(nn.Module):
  conv_general_dilated: object = jax.lax.conv_general_dilated

  @nn.compact
  def __call__(self, x):
    return {'feat': nn.relu(nn.Conv(8, (3, 3), strides=4, conv_general_dilated=self.conv_general_dilated)(x))}


@pytest.mark.slow
def test_predict_maps_wraps_the_last_batch_and_compiles_once():
  variables = _TinyNet().init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
  params = {'backbone': variables['params'],
            'head': {'kernel': jax.random.normal(jax.random.key(1), (1, 1, 8, 1)), 'bias': jnp.zeros(1)}}
  make = lambda: deepco3.DeepCO3(deepco3.BackboneFeatures(
      weights.Backbone('tiny', _TinyNet(), 'imagenet', 'test'), 'feat'))
  images = np.random.default_rng(0).uniform(size=(5, 16, 16, 3)).astype(np.float32)
  score, sal = instance.predict_maps(make(), params, {}, images, batch_size=2)
  want = make()(params, {}, images)
  np.testing.assert_allclose(score, want['score'], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(sal, want['sal_full'], rtol=1e-5, atol=1e-6)
  # Groups build equal models: the compiled prediction is reused.
  compiled = instance._score_and_saliency._cache_size()
  instance.predict_maps(make(), params, {}, images[:3], batch_size=2)
  assert instance._score_and_saliency._cache_size() == compiled
