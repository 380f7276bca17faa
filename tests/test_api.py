"""The Python API (coseg_jax.cosegment / coseg_jax.instances): arguments, inputs, results."""
import os
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from coseg_jax import api
from coseg_jax.cli import flags
from coseg_jax.core import data
from coseg_jax.core import demo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = dict(baseline='cluster', image_size=32, method='argmax')


def test_import_is_light_and_the_api_lazy():
  code = ('import sys, coseg_jax; assert "jax" not in sys.modules; '
          'assert callable(coseg_jax.cosegment) and callable(coseg_jax.instances); '
          'assert "jax" in sys.modules; assert "cosegment" in dir(coseg_jax)')
  subprocess.run([sys.executable, '-c', code], check=True, cwd=ROOT,
                 env={**os.environ, 'PYTHONPATH': ROOT})


@pytest.mark.parametrize('config_file,make', [
    ('two_class.py', lambda: api.multiclass_config(2)),
    ('three_class.py', lambda: api.multiclass_config(3)),
    ('auto_k.py', lambda: api.multiclass_config(None)),
    ('instance.py', api.instance_config)])
def test_defaults_are_the_cli_configs(config_file, make):
  cli = flags.load_config(os.path.join(ROOT, 'configs', config_file))
  assert make().to_dict() == cli.to_dict()


def test_overrides_by_leaf_name_and_unknown_or_ambiguous_names():
  config = api.multiclass_config()
  resolved = api.apply_overrides(config, dict(image_size=160, attention='ma', crf_iterations=2,
                                              steps=3, seed=4))
  assert resolved['crf_iterations'] == 'infer.crf.iterations'
  assert (config.data.image_size, config.model.attention, config.infer.crf.iterations,
          config.train.steps, config.seed) == (160, 'ma', 2, 3, 4)
  with pytest.raises(TypeError, match="'image_sise'.*did you mean image_size"):
    api.apply_overrides(config, {'image_sise': 64})
  with pytest.raises(TypeError, match='several config fields.*saliency_folder'):
    api.apply_overrides(api.instance_config(), {'folder': '/x'})
  with pytest.raises(TypeError, match='image_size'):
    api.apply_overrides(config, {'image_size': 'big'})
  # Progress bars are off unless asked for; workdir and progress are the API's own.
  assert api._prepare(api.multiclass_config(), {})[0].output.quiet
  quiet_off, workdir = api._prepare(api.instance_config(), {'progress': True, 'workdir': 'w'})
  assert not quiet_off.output.quiet and workdir == 'w'
  # The public functions refuse before touching the images.
  with pytest.raises(TypeError, match='did you mean attention'):
    api.cosegment([], 2, atention='ma')
  with pytest.raises(TypeError, match='no such config field'):
    api.instances([], num_classes=2)


def _images(n=3, size=40):
  rng = np.random.default_rng(0)
  return [rng.integers(0, 256, (size, size + 8 * i, 3), dtype=np.uint8) for i in range(n)]


def test_bad_items_name_their_index(tmp_path):
  good = _images()
  not_image = tmp_path / 'notes.png'
  not_image.write_text('hello')
  cases = [
      (np.zeros((8, 8, 2), np.uint8), r'images\[1\].*shape'),
      (str(tmp_path / 'missing.png'), r'images\[1\] \(.*missing.png\): no such file'),
      (str(not_image), r'images\[1\]: .*notes.png: cannot read image'),
      (np.full((8, 8, 3), 2.0), r'images\[1\]: float pixels must lie in \[0, 1\]'),
      (np.full((8, 8), np.nan), r'images\[1\]: not finite'),
      ('x' and {'a': 1}, r'images\[1\]: not an image'),
  ]
  for bad, pattern in cases:
    with pytest.raises(ValueError, match=pattern):
      api.cosegment([good[0], bad, good[2]], 2, **FAST)
  with pytest.raises(ValueError, match='at least 3 are needed.*batch_size'):
    api.cosegment(good[:2], 2, **FAST)
  with pytest.raises(ValueError, match='sequence of images'):
    api.cosegment(good[0], 2, **FAST)
  with pytest.raises(ValueError, match='num_classes'):
    api.cosegment(good, 0, **FAST)


def test_grey_rgba_float_pil_and_paths_become_rgb(tmp_path):
  rgb = _images(1)[0]
  path = tmp_path / 'a.png'
  Image.fromarray(rgb).save(path)
  grey = rgb[..., 0]
  rgba = np.concatenate([rgb, np.zeros(rgb.shape[:2] + (1,), np.uint8)], -1)  # transparent
  group = api.as_group([rgb, grey, grey[..., None], rgba, rgb / 255.0, Image.fromarray(rgb),
                        str(path)], 1)
  images = [s.image for s in group.samples]
  assert all(im.dtype == np.uint8 and im.shape == rgb.shape for im in images)
  assert (images[1] == grey[..., None]).all() and (images[2] == images[1]).all()
  assert (images[3] == 255).all()  # composited over white
  for i in (4, 5, 6):
    np.testing.assert_array_equal(images[i], rgb)
  assert group.samples[6].image_path == str(path)


def test_rgba_gives_the_same_pixels_as_an_array_a_pil_image_or_a_file(tmp_path):
  rgb = _images(1)[0]
  rgba = np.concatenate([rgb, np.zeros((*rgb.shape[:2], 1), np.uint8)], -1)
  rgba[..., 3] = np.arange(rgba[..., 3].size).reshape(rgba.shape[:2]) % 256  # every alpha
  path = tmp_path / 'a.png'
  Image.fromarray(rgba).save(path)
  images = [s.image for s in api.as_group([rgba, Image.fromarray(rgba), str(path)], 1).samples]
  np.testing.assert_array_equal(images[0], data.read_image(str(path)))
  for im in images[1:]:
    np.testing.assert_array_equal(im, images[0])
  assert images[0][rgba[..., 3] == 0].min() == 255


@pytest.mark.slow
def test_cosegment_matches_the_cli_and_writes_nothing(tmp_path, monkeypatch):
  items = demo.render_multiclass(2, num_images=4, size=64, seed=0)
  images = [im for _, im, _ in items]
  images[1] = images[1][:48, :40]  # another size
  monkeypatch.chdir(tmp_path)
  result = api.cosegment(images, 2, **FAST)
  assert os.listdir(tmp_path) == []
  assert [l.shape for l in result.labels] == [im.shape[:2] for im in images]
  assert all(l.dtype == np.uint8 and l.max() <= 2 for l in result.labels)
  for m in result.maps:
    assert m.shape[-1] == 3 and m.dtype == np.float32
    peaks = m.max(axis=(0, 1))  # Eq. 8: 1, or 0 for a channel absent from the image
    assert np.all(np.isclose(peaks, 1.0, atol=1e-6) | (peaks == 0)) and peaks.max() == 1
  assert sorted(result.class_order) == [0, 1, 2] and result.class_order[0] == 0
  areas = [result.area[i] for i in result.class_order[1:]]
  assert areas == sorted(areas, reverse=True) and sum(result.area.values()) == pytest.approx(1)
  assert result.overlay(0).shape[1] >= images[0].shape[1]

  # bin/run.py's pipeline on the same images as a group folder gives the same labels.
  from coseg_jax.multiclass import pipeline
  group_dir = tmp_path / 'data' / 'g'
  os.makedirs(group_dir / 'images')
  for i, im in enumerate(images):
    Image.fromarray(im).save(group_dir / 'images' / f'image{i:03d}.png')
  config = api.multiclass_config(2)
  api.apply_overrides(config, dict(FAST, root=str(tmp_path / 'data'), quiet=True))
  pipeline.run(config, str(tmp_path / 'run'))
  for i, labels in enumerate(result.labels):
    cli = np.asarray(Image.open(tmp_path / 'run' / 'g' / 'labels' / f'image{i:03d}.png'))
    np.testing.assert_array_equal(cli, labels)

  # With a work directory, the run's files are kept.
  api.cosegment(images, 2, workdir=str(tmp_path / 'api'), **FAST)
  assert {'metrics.json', 'config.json', 'images'} <= set(os.listdir(tmp_path / 'api'))


@pytest.mark.slow
def test_instances_gives_masks_and_scores_per_image(tmp_path, monkeypatch):
  items = demo.render_instances(num_images=2, size=64, seed=0)
  monkeypatch.chdir(tmp_path)
  found = api.instances([im for _, im, _ in items], baseline='saliency', image_size=32)
  assert os.listdir(tmp_path) == [] and len(found) == 2
  for (_, im, _), dets in zip(items, found):
    assert dets, 'the saliency baseline finds at least one component'
    for mask, score in dets:
      assert mask.dtype == bool and mask.shape == im.shape[:2] and isinstance(score, float)
