"""Compile once: both pipelines across the steps, epochs and groups of a dataset."""
import os

import jax
import numpy as np
from PIL import Image
import pytest

from coseg_jax.core import config
from coseg_jax.instance import pipeline as instance
from coseg_jax.multiclass import pipeline as multiclass

SIZE, BATCH, EPOCHS = 32, 3, 2
# An executable comes from the backend compiler or, under the session's persistent cache
# (conftest.py), from the cache: count both.
EXECUTABLE_EVENTS = ('/jax/core/compile/backend_compile_duration',
                     '/jax/compilation_cache/cache_retrieval_time_sec')


def _write_group(root, name, num_images, seed):
  rng = np.random.default_rng(seed)
  os.makedirs(os.path.join(root, name, 'images'))
  for i in range(num_images):
    pixels = rng.integers(0, 256, (SIZE + 8 * i, SIZE, 3), np.uint8)  # sizes differ too
    Image.fromarray(pixels).save(os.path.join(root, name, 'images', f'{i}.png'))


@pytest.mark.slow
@pytest.mark.parametrize('method', ['multiclass', 'instance'])
def test_a_dataset_of_two_groups_compiles_once(tmp_path, monkeypatch, method):
  # Groups of 3 and 4 images: every jitted function (training step, cluster init,
  # prediction, PRM) is compiled for the first group and reused by the second, whose
  # steps over 2 epochs (multi-class: batch 3, the second step of each epoch padded)
  # compile nothing.
  root = str(tmp_path / 'data')
  _write_group(root, 'a', 3, seed=0)
  _write_group(root, 'b', 4, seed=1)
  if method == 'multiclass':
    cfg, pipeline = config.multiclass(), multiclass
    cfg.num_classes, cfg.data.batch_size, cfg.infer.method = 2, BATCH, 'argmax'
  else:
    cfg, pipeline = config.instance(), instance
    cfg.data.batch_size = 2  # DeepCO3 pairs image i with i + B/2
  cfg.data.root, cfg.data.image_size = root, SIZE
  cfg.train.epochs, cfg.train.steps = EPOCHS, 0
  cfg.output.images, cfg.output.quiet = False, True

  compiles, at_group = [], []
  listener = lambda event, duration, **kw: compiles.append(event) if (
      event in EXECUTABLE_EVENTS) else None
  group_fn = 'segment_group' if method == 'multiclass' else 'detect_group'
  real = getattr(pipeline, group_fn)

  def recording(*args, **kwargs):
    at_group.append(len(compiles))
    return real(*args, **kwargs)

  monkeypatch.setattr(pipeline, group_fn, recording)
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    pipeline.run(cfg, str(tmp_path / 'run'))
    at_group.append(len(compiles))
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert len(at_group) == 3
  assert at_group[1] > at_group[0]     # the first group compiles ...
  assert at_group[2] == at_group[1]    # ... and the second one compiles nothing
