"""MBD saliency prior and precomputed-map folders."""
import types

import h5py
import numpy as np
from PIL import Image
import pytest
import scipy.io

from coseg_jax.core import config
from coseg_jax.core import data
from coseg_jax.core import saliency
from coseg_jax.core.errors import InputError


def _disc_image(h=96, w=112):
  rng = np.random.default_rng(0)
  image = rng.integers(0, 90, size=(h, w, 3), dtype=np.uint8)  # textured dark clutter
  yy, xx = np.mgrid[:h, :w]
  disc = (yy - 50) ** 2 + (xx - 60) ** 2 < 22 ** 2
  image[disc] = (235, 215, 40)
  return image, disc


def test_barrier_distance_takes_lowest_barrier_path():
  # 0 (seed, value 0) -- 1 (10) -- 3 (2), and 0 -- 2 (1) -- 3: node 3 is reached over 2
  # with barrier max(0, 1, 2) - min(0, 1, 2) = 2; every path to node 1 ends at 10.
  values = np.array([0.0, 10.0, 1.0, 2.0])
  edges = np.array([[0, 1], [1, 3], [0, 2], [2, 3]])
  np.testing.assert_allclose(saliency.barrier_distance(values, edges, [0]), [0, 10, 1, 2])
  # A node not connected to any seed stays at infinity.
  assert np.isinf(saliency.barrier_distance(values, np.array([[0, 1]]), [0])[3])


def test_superpixel_graph_edges():
  labels = np.array([[0, 0, 1], [2, 2, 1]])
  np.testing.assert_array_equal(saliency.superpixel_graph(labels), [[0, 1], [0, 2], [1, 2]])


def test_mbd_saliency_disc_brighter_than_border_clutter():
  image, disc = _disc_image()
  sal = saliency.mbd_saliency(image)
  assert sal.shape == disc.shape and sal.dtype == np.float32
  assert sal.min() >= 0 and sal.max() <= 1
  assert sal[disc].mean() > 0.5
  assert sal[~disc].mean() < 0.2


def _write_v73(path, name, array):
  """A MATLAB v7.3 file: HDF5 with the 512-byte MATLAB header, arrays stored transposed."""
  with h5py.File(path, 'w', userblock_size=512) as f:
    f[name] = np.asarray(array).T
  header = b'MATLAB 7.3 MAT-file, Platform: GLNXA64, Created by: test HDF5 schema 1.00 .'
  with open(path, 'r+b') as f:
    f.write(header.ljust(116, b' ') + b'\0' * 8 + b'\x00\x02IM')


def test_load_prior_folder_png_mat_v5_and_v73(tmp_path):
  ramp = np.tile(np.linspace(0, 1, 8, dtype=np.float32), (6, 1))  # 6x8
  Image.fromarray((ramp * 255).round().astype(np.uint8)).save(tmp_path / 'a.png')
  scipy.io.savemat(tmp_path / 'b.mat', {'SalMap': ramp * 255, 'other': np.ones((3, 3))})
  _write_v73(tmp_path / 'c.mat', 'S', ramp)
  maps = saliency.load_prior_folder(str(tmp_path), ['a', 'b', 'c'], [(6, 8, 3), (6, 8, 3), (12, 16, 3)])
  np.testing.assert_allclose(maps[0], ramp, atol=1 / 255)
  np.testing.assert_allclose(maps[1], ramp, atol=1e-6)  # min-max of a 0..255 float map
  assert maps[2].shape == (12, 16)
  assert maps[2][:, 0].max() < 0.1 and maps[2][:, -1].min() > 0.9  # not transposed


def test_load_prior_folder_errors_name_the_file(tmp_path):
  with pytest.raises(InputError, match=r'x\.png: no saliency map'):
    saliency.load_prior_folder(str(tmp_path), ['x'], [(4, 4, 3)])
  (tmp_path / 'bad.mat').write_bytes(b'not a mat file at all')
  with pytest.raises(InputError, match=r'bad\.mat: cannot read'):
    saliency.load_prior_folder(str(tmp_path), ['bad'], [(4, 4, 3)])
  scipy.io.savemat(tmp_path / 'two.mat', {'p': np.ones((4, 4)), 'q': np.zeros((4, 4))})
  with pytest.raises(InputError, match=r'two\.mat: expected one 2D'):
    saliency.load_prior_folder(str(tmp_path), ['two'], [(4, 4, 3)])
  (tmp_path / 'empty.png').write_bytes(b'')
  with pytest.raises(InputError, match=r'empty\.png'):
    saliency.load_prior_folder(str(tmp_path), ['empty'], [(4, 4, 3)])
  with pytest.raises(InputError, match='saliency folder'):
    saliency.load_prior_folder(str(tmp_path / 'missing'), ['a'], [(4, 4, 3)])


def test_saliency_prior_dispatch(tmp_path):
  image, _ = _disc_image(40, 48)
  group = data.Group('g', str(tmp_path), [data.Sample('s0', 's0.jpg', image)])
  cfg = types.SimpleNamespace(prior='mbd', folder=None)
  (sal,) = saliency.saliency_prior(cfg, group)
  assert sal.shape == (40, 48)
  Image.fromarray(np.full((10, 12), 128, np.uint8)).save(tmp_path / 's0.png')
  (sal,) = saliency.saliency_prior(types.SimpleNamespace(prior='folder', folder=str(tmp_path)), group)
  np.testing.assert_allclose(sal, 128 / 255, atol=1e-6)
  with pytest.raises(ValueError, match='svfsal'):  # check_config names the field first
    saliency.saliency_prior(types.SimpleNamespace(prior='svfsal', folder=None), group)
  # 'ddt_mbd' asks for the group's descriptors.
  feats = lambda images: [np.ones((5, 6, 4), np.float32) * np.arange(4) + (im[::8, ::8, :1] > 128)
                          for im in images]
  (sal,) = saliency.saliency_prior(types.SimpleNamespace(prior='ddt_mbd', folder=None), group, feats)
  assert sal.shape == (40, 48) and 0 <= sal.min() and sal.max() <= 1


def _standing_figure(h=96, w=96, seed=0):
  """A person-like bar standing on the bottom border over a two-band street scene."""
  rng = np.random.default_rng(seed)
  image = np.empty((h, w, 3), np.uint8)
  image[: h // 2] = (90, 110, 160)   # facade
  image[h // 2:] = (100, 100, 100)   # road, filling the bottom border
  image = (image + rng.integers(-8, 8, size=image.shape)).clip(0, 255).astype(np.uint8)
  yy, xx = np.mgrid[:h, :w]
  figure = (yy >= 20) & (np.abs(xx - (30 + 10 * seed)) < 9)   # from row 20 down to the border
  image[figure] = (230, 200, 40)
  return image, figure


def test_mbd_finds_an_object_that_touches_the_bottom_border():
  image, figure = _standing_figure()
  sal = saliency.mbd_saliency(image, work_size=96)
  fg = sal > sal.mean()
  assert (fg & figure).sum() / (fg | figure).sum() > 0.6
  assert sal[figure[-1]].size and sal[-1][figure[-1]].mean() > 2 * sal[-1][~figure[-1]].mean()


def test_ddt_maps_sign_and_ddt_mbd_prior_on_a_bottom_touching_object():
  # Descriptors: the object's is shared by the group, the backgrounds differ per image.
  rng = np.random.default_rng(0)
  images, figures, feats = [], [], []
  for i in range(4):
    image, figure = _standing_figure(seed=i)
    small = figure[::8, ::8]
    f = rng.normal(0, 0.1, size=small.shape + (16,)) + rng.normal(0, 0.3, size=16)  # background
    f[small] = 3.0 * np.eye(16)[0] + rng.normal(0, 0.1, size=(small.sum(), 16))
    images.append(image), figures.append(figure), feats.append(f.astype(np.float32))
  maps = saliency.ddt_maps(feats)
  for m, figure in zip(maps, figures):
    small = figure[::8, ::8]
    assert m[small].min() > 0 and m[~small].mean() < 0
  # Flipping every descriptor's sign flips the principal direction, not the answer.
  for m, n in zip(maps, saliency.ddt_maps([-f for f in feats])):
    assert np.all((m > 0) == (n > 0))
  priors = saliency.ddt_mbd_saliency(images, feats)
  for p, figure in zip(priors, figures):
    assert p.shape == figure.shape and p.min() >= 0 and p.max() == pytest.approx(1.0)
    fg = p > p.mean()
    assert (fg & figure).sum() / (fg | figure).sum() > 0.6


def test_crf_foreground_follows_the_photo_where_the_coarse_prior_cuts_across_it():
  image, figure = _standing_figure()
  iou = lambda a, b: (a & b).sum() / (a | b).sum()
  # A stride-16 prior (the figure's share of each 16 x 16 cell), 0 on the bottom rows as
  # where a group's DDT calls a person's legs not common.
  cells = figure.reshape(6, 16, 6, 16).mean((1, 3))
  prior = np.kron(cells, np.ones((16, 16))).astype(np.float32)
  prior[80:] = 0
  crf_cfg = config.instance().saliency.crf
  split = saliency.foreground(image, prior, None, 0.01)
  np.testing.assert_array_equal(split, prior > prior.mean())
  refined = saliency.foreground(image, prior, crf_cfg, 0.01)
  assert iou(refined, figure) > iou(split, figure) + 0.25, (iou(refined, figure), iou(split, figure))
  assert not refined[~figure].any()  # the blocks' road and facade go back to background
  # With the unary pinned to 0 and 1 the CRF cannot move the split at all: the floor
  # is what lets the photo redraw it.
  np.testing.assert_array_equal(saliency.foreground(image, prior, crf_cfg, 1e-6), split)
  assert iou(saliency.foreground(image, prior, crf_cfg, 0.1), figure) > 0.95
