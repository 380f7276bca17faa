"""Compile once: the real multi-class training step across steps and epochs (train.fit),
and both pipelines across the groups of a dataset."""
import os

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from coseg_jax.backbones import modules as backbones
from coseg_jax.backbones import weights
from coseg_jax.core import config
from coseg_jax.core import train
from coseg_jax.instance import pipeline as instance
from coseg_jax.multiclass import pipeline as multiclass

SIZE, NUM_IMAGES, BATCH, EPOCHS = 32, 4, 3, 2  # 2 steps per epoch, the second one padded


def _random_variables(module, shape, seed):
  """Small random values in the tree of `module.init` (eval_shape: no init is compiled)."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.zeros(shape))
  flat = traverse_util.flatten_dict(shapes)
  return traverse_util.unflatten_dict(
      {k: jnp.asarray(0.1 * rng.normal(size=v.shape), jnp.float32) for k, v in flat.items()})


@pytest.mark.slow
def test_multiclass_step_compiles_once_across_steps_and_epochs(tmp_path, monkeypatch):
  cfg = config.multiclass()
  cfg.num_classes = 2
  module = backbones.make('efficientnet_lite0')
  backbone = weights.Backbone('efficientnet_lite0', module, 'imagenet', 'random')
  extractor_vars = _random_variables(module, (1, SIZE, SIZE, 3), seed=1)
  gen = multiclass.build_generator(cfg, backbone, cfg.num_classes)
  params = _random_variables(gen, (BATCH, SIZE, SIZE, 3), seed=2)['params']
  images = np.random.default_rng(3).integers(0, 256, (NUM_IMAGES, SIZE, SIZE, 3), np.uint8)

  traces = []

  def counting_loss(*args):
    traces.append(1)
    return multiclass.loss_fn(gen, backbone, cfg.loss, *args)

  # Backend compilations seen at the start of every step and after the last one.
  compiles, at_step = [], []
  listener = lambda event, duration, **kw: compiles.append(event) if (
      event == '/jax/core/compile/backend_compile_duration') else None
  real_indices = train.batch_indices

  def recording_indices(*args):
    at_step.append(len(compiles))
    return real_indices(*args)

  monkeypatch.setattr(train, 'batch_indices', recording_indices)
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    tc = train.TrainConfig(epochs=EPOCHS, batch_size=BATCH, learning_rate=1e-4,
                           weight_decay=5e-4)
    _, history = train.fit(counting_loss, params, extractor_vars,
                           {'image': images.astype(np.float32) / 255.0}, tc,
                           ckpt_dir=str(tmp_path / 'ckpt'), log_path=str(tmp_path / 'loss.jsonl'),
                           quiet=True)
    at_step.append(len(compiles))  # after the last step (and the final checkpoint)
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)

  steps = EPOCHS * train.steps_per_epoch(NUM_IMAGES, BATCH)
  assert [r['epoch'] for r in history] == [1, 1, 2, 2]
  assert len(at_step) == steps + 1
  assert len(traces) == 1                       # the loss is traced once ...
  assert at_step[1] == at_step[0] + 1           # ... the first step compiles once ...
  assert at_step[1] == at_step[-1]              # ... and no later step compiles anything
  assert all(np.isfinite(r['loss']) for r in history)


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
  # prediction, PRM) is compiled for the first group and reused by the second.
  root = str(tmp_path / 'data')
  _write_group(root, 'a', 3, seed=0)
  _write_group(root, 'b', 4, seed=1)
  if method == 'multiclass':
    cfg, pipeline = config.multiclass(), multiclass
    cfg.num_classes, cfg.data.batch_size, cfg.infer.method = 2, 3, 'argmax'
  else:
    cfg, pipeline = config.instance(), instance
    cfg.data.batch_size = 2
  cfg.data.root, cfg.data.image_size, cfg.train.epochs = root, SIZE, 1
  cfg.output.images, cfg.output.quiet = False, True

  compiles, at_group = [], []
  listener = lambda event, duration, **kw: compiles.append(event) if (
      event == '/jax/core/compile/backend_compile_duration') else None
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
