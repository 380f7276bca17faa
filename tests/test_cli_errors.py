"""Bad input through the command line (SPEC §8).

Every case must end with exit status 2 and exactly one line on stderr naming the file
and the reason, without a traceback, without touching what the work directory already
held, and before any model is built (so a typo costs seconds, not a compile).
"""
import hashlib
import os
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from coseg_jax.cli import main
from coseg_jax.core import config as defaults
from coseg_jax.core import train
from coseg_jax.instance import pipeline as instance
from coseg_jax.multiclass import pipeline as multiclass

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_PY = os.path.join(REPO, 'bin', 'run.py')
AS_ROOT = hasattr(os, 'geteuid') and os.geteuid() == 0


def _png(path, array):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(np.asarray(array, np.uint8)).save(path)


def _group(root, *, num_images=3, size=32):
  """A valid 2-class group folder: random images, masks with labels 0..2."""
  rng = np.random.default_rng(0)
  for i in range(num_images):
    _png(os.path.join(root, 'images', f'img{i}.png'), rng.integers(0, 256, (size, size, 3)))
    _png(os.path.join(root, 'masks', f'img{i}.png'), rng.integers(0, 3, (size, size)))
  return root


def _previous_run(workdir):
  """Files an earlier run left in `workdir`; returns their digests."""
  files = {'metrics.json': b'{"mean": {"P": 0.5}}\n', 'notes.txt': b'keep me\n',
           os.path.join('grp', 'labels', 'img0.png'): b'\x89PNG earlier label map'}
  for rel, content in files.items():
    os.makedirs(os.path.dirname(os.path.join(workdir, rel)), exist_ok=True)
    with open(os.path.join(workdir, rel), 'wb') as f:
      f.write(content)
  return _digests(workdir, files)


def _digests(workdir, rels):
  out = {}
  for rel in rels:
    with open(os.path.join(workdir, rel), 'rb') as f:
      out[rel] = hashlib.sha256(f.read()).hexdigest()
  return out


# Each case builds its bad input under `tmp` and returns (data root, config overrides, the
# path the message must name, words of the reason).
def _corrupt(tmp):
  g = _group(os.path.join(tmp, 'grp'))
  bad = os.path.join(g, 'images', 'img1.png')
  with open(bad, 'wb') as f:
    f.write(np.random.default_rng(1).bytes(500))
  return g, {}, bad, 'cannot read image'


def _truncated(tmp):
  g = _group(os.path.join(tmp, 'grp'))
  bad = os.path.join(g, 'images', 'img1.png')
  with open(bad, 'rb') as f:
    head = f.read()[:120]
  with open(bad, 'wb') as f:
    f.write(head)
  return g, {}, bad, 'cannot read image'


def _zero_bytes(tmp):
  g = _group(os.path.join(tmp, 'grp'))
  bad = os.path.join(g, 'images', 'img1.png')
  open(bad, 'wb').close()
  return g, {}, bad, 'empty file'


def _dangling_link(tmp):
  g = _group(os.path.join(tmp, 'grp'))
  bad = os.path.join(g, 'images', 'img1.png')
  os.unlink(bad)
  os.symlink(os.path.join(tmp, 'gone.png'), bad)
  return g, {}, bad, 'not an image file'


def _unreadable(tmp):
  g = _group(os.path.join(tmp, 'grp'))
  bad = os.path.join(g, 'images', 'img1.png')
  os.chmod(bad, 0)
  return g, {}, bad, 'Permission denied'


def _not_an_image(tmp):
  g = _group(os.path.join(tmp, 'grp'))
  bad = os.path.join(g, 'images', 'notes.txt')
  with open(bad, 'w') as f:
    f.write('not a picture\n')
  return g, {}, bad, 'not an image file'


def _mask_wrong_size(tmp):
  g = _group(os.path.join(tmp, 'grp'))
  bad = os.path.join(g, 'masks', 'img1.png')
  _png(bad, np.zeros((16, 24)))
  return g, {}, bad, 'does not match'


def _mask_unknown_label(tmp):
  g = _group(os.path.join(tmp, 'grp'))
  bad = os.path.join(g, 'masks', 'img1.png')
  labels = np.zeros((32, 32))
  labels[:4, :4] = 7
  _png(bad, labels)
  # K given: with num_classes unset it would come from classes.txt (test_background_rules.py).
  return g, {'num_classes': 2}, bad, 'unknown label(s) 7'


def _too_few_images(tmp):
  g = _group(os.path.join(tmp, 'grp'), num_images=2)
  return g, {'data.batch_size': 3}, g, 'at least 3'


def _zero_classes(tmp):
  g = _group(os.path.join(tmp, 'grp'))
  return g, {'num_classes': 0}, 'config.num_classes', 'at least 1'


def _tiny_images(tmp):
  g = _group(os.path.join(tmp, 'grp'))
  return g, {'data.image_size': 0}, 'config.data.image_size', 'at least 32'


def _zero_batch(tmp):
  g = _group(os.path.join(tmp, 'grp'))
  return g, {'data.batch_size': 0}, 'config.data.batch_size', 'at least 1'


def _single_image_batch(tmp):
  g = _group(os.path.join(tmp, 'grp'))
  return g, {'data.batch_size': 1}, 'config.data.batch_size', 'at least 2 images'


def _unknown_pooling(tmp):
  g = _group(os.path.join(tmp, 'grp'))
  return g, {'loss.pooling': 'max'}, 'config.loss.pooling', 'not one of masked | global'


def _unknown_inference(tmp):
  g = _group(os.path.join(tmp, 'grp'))
  return g, {'infer.method': 'mrf'}, 'config.infer.method', 'not one of argmax | crf'


def _empty_root(tmp):
  root = os.path.join(tmp, 'empty')
  os.makedirs(root)
  return root, {}, root, 'no groups'


def _empty_images(tmp):
  g = os.path.join(tmp, 'grp')
  os.makedirs(os.path.join(g, 'images'))
  return g, {}, os.path.join(g, 'images'), 'no images'


def _missing_root(tmp):
  root = os.path.join(tmp, 'nowhere')
  return root, {}, root, 'no such folder'


DATA_CASES = [
    pytest.param(_corrupt, id='corrupt'),
    pytest.param(_truncated, id='truncated'),
    pytest.param(_zero_bytes, id='zero_bytes'),
    pytest.param(_dangling_link, id='dangling_link'),
    pytest.param(_unreadable, id='unreadable', marks=pytest.mark.skipif(
        AS_ROOT, reason='root reads files whatever their mode; dangling_link covers unreadable')),
    pytest.param(_not_an_image, id='not_an_image'),
    pytest.param(_mask_wrong_size, id='mask_wrong_size'),
    pytest.param(_mask_unknown_label, id='mask_unknown_label'),
    pytest.param(_too_few_images, id='too_few_images'),
    pytest.param(_zero_classes, id='zero_classes'),
    pytest.param(_tiny_images, id='tiny_images'),
    pytest.param(_single_image_batch, id='single_image_batch'),
    pytest.param(_unknown_pooling, id='unknown_pooling'),
    pytest.param(_unknown_inference, id='unknown_inference'),
    pytest.param(_zero_batch, id='zero_batch'),
    pytest.param(_empty_root, id='empty_root'),
    pytest.param(_empty_images, id='empty_images'),
    pytest.param(_missing_root, id='missing_root'),
]


def _config(root, overrides, method='multiclass'):
  c = getattr(defaults, method)()
  c.data.root = root
  c.data.image_size = 64
  c.train.epochs = 1
  c.output.quiet = True
  for key, value in overrides.items():
    section, _, field = key.rpartition('.')
    setattr(c[section] if section else c, field, value)
  return c


@pytest.fixture
def no_model(monkeypatch):
  """Fails the test if a model is built or trained before the input error."""
  def forbidden(*args, **kwargs):
    raise AssertionError('a model was built before the bad input was reported')

  monkeypatch.setattr(multiclass, 'build_generator', forbidden)
  monkeypatch.setattr(instance, 'build_network', forbidden)
  monkeypatch.setattr(train, 'fit', forbidden)


def _one_error_line(err, path, reason):
  lines = err.splitlines()
  assert len(lines) == 1, err
  assert lines[0].startswith(f'error: {path}: '), lines[0]
  assert reason in lines[0]


@pytest.mark.parametrize('make_case', DATA_CASES)
def test_bad_input_is_one_line_exit_2_and_keeps_earlier_outputs(make_case, tmp_path, capsys,
                                                                no_model):
  root, overrides, path, reason = make_case(str(tmp_path))
  workdir = str(tmp_path / 'work')
  before = _previous_run(workdir)
  assert main.run_cli(_config(root, overrides), workdir) == 2
  _one_error_line(capsys.readouterr().err, path, reason)
  assert _digests(workdir, before) == before
  written = {os.path.relpath(os.path.join(d, n), workdir)
             for d, _, names in os.walk(workdir) for n in names}
  assert not any('checkpoints' in w or w.endswith('loss.jsonl') for w in written), written


def _instance_group(root, num_images):
  _group(root, num_images=num_images)
  for i in range(num_images):
    _png(os.path.join(root, 'instances', f'img{i}_1.png'), np.pad(np.full((8, 8), 255), 12))
  return root


@pytest.mark.parametrize('num_images, bad, reason', [
    (4, '', 'at least 6'),
    (6, os.path.join('instances', 'img2_1.png'), 'does not match'),
], ids=['too_few_images', 'instance_mask_wrong_size'])
def test_instance_bad_input(tmp_path, capsys, no_model, num_images, bad, reason):
  root = _instance_group(str(tmp_path / 'grp'), num_images)
  if bad:
    _png(os.path.join(root, bad), np.full((8, 8), 255))
  workdir = str(tmp_path / 'work')
  before = _previous_run(workdir)
  assert main.run_cli(_config(root, {}, 'instance'), workdir) == 2
  _one_error_line(capsys.readouterr().err, os.path.join(root, bad) if bad else root, reason)
  assert _digests(workdir, before) == before


def test_bad_file_in_a_later_group_is_reported_before_training(tmp_path, capsys, no_model):
  _group(str(tmp_path / 'data' / 'a_good'))
  bad = os.path.join(_group(str(tmp_path / 'data' / 'b_bad')), 'images', 'img1.png')
  open(bad, 'wb').close()
  assert main.run_cli(_config(str(tmp_path / 'data'), {}), str(tmp_path / 'work')) == 2
  _one_error_line(capsys.readouterr().err, bad, 'empty file')


def test_workdir_that_cannot_be_created(tmp_path, capsys, no_model):
  blocker = tmp_path / 'a_file'
  blocker.write_bytes(b'not a folder\n')
  workdir = str(blocker / 'work')
  assert main.run_cli(_config(_group(str(tmp_path / 'grp')), {}), workdir) == 2
  _one_error_line(capsys.readouterr().err, workdir, 'cannot create work directory')
  assert blocker.read_bytes() == b'not a folder\n'


@pytest.mark.skipif(AS_ROOT, reason='root writes into read-only folders; '
                    'test_workdir_that_cannot_be_created covers an unwritable path')
def test_read_only_workdir(tmp_path, capsys, no_model):
  workdir = str(tmp_path / 'work')
  before = _previous_run(workdir)
  os.chmod(workdir, 0o555)
  try:
    assert main.run_cli(_config(_group(str(tmp_path / 'grp')), {}), workdir) == 2
  finally:
    os.chmod(workdir, 0o755)
  _one_error_line(capsys.readouterr().err, workdir, 'not writable')
  assert _digests(workdir, before) == before


def _cli(*args, cwd=REPO):
  proc = subprocess.run([sys.executable, RUN_PY, *args], cwd=cwd, capture_output=True,
                        text=True, timeout=300)
  assert 'Traceback' not in proc.stderr, proc.stderr
  return proc


@pytest.mark.slow
def test_cli_bad_image_exits_2_with_one_line(tmp_path):
  root, _, bad, reason = _corrupt(str(tmp_path))
  workdir = str(tmp_path / 'work')
  before = _previous_run(workdir)
  proc = _cli('--config=configs/two_class.py', f'--workdir={workdir}',
              f'--config.data.root={root}', '--config.data.image_size=64')
  assert proc.returncode == 2
  _one_error_line(proc.stderr, bad, reason)
  assert _digests(workdir, before) == before


@pytest.mark.parametrize('args, message', [
    (['--config.data.imag_size=1'], 'configs/two_class.py: no config field data.imag_size'),
    (['--config.data.image_size=abc'], "--config.data.image_size=abc: invalid literal"),
    (['--config.nosuchsection.x=1'], 'configs/two_class.py: no config field nosuchsection.x'),
    (['--bogus=1'], "Unknown command line flag 'bogus'"),
    (['extra_argument'], 'unexpected arguments: extra_argument'),
], ids=['typo', 'bad_value', 'unknown_section', 'unknown_flag', 'extra_argument'])
def test_cli_flag_errors_are_one_line_before_anything_runs(tmp_path, args, message):
  workdir = tmp_path / 'work'
  proc = _cli('--config=configs/two_class.py', f'--workdir={workdir}', *args)
  assert proc.returncode == 2
  assert proc.stderr.splitlines() == [proc.stderr.strip()] and message in proc.stderr, proc.stderr
  assert proc.stderr.startswith('error: ')
  assert not workdir.exists()


def test_cli_missing_config_file(tmp_path):
  proc = _cli('--config=configs/no_such_config.py', f'--workdir={tmp_path / "work"}')
  assert proc.returncode == 2
  assert proc.stderr == 'error: configs/no_such_config.py: no such config file\n'
  assert not (tmp_path / 'work').exists()
