"""The real multi-class training step compiles once across steps and epochs (train.fit)."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from coseg_jax import backbones
from coseg_jax import config
from coseg_jax import multiclass
from coseg_jax import train
from coseg_jax import weights

SIZE, NUM_IMAGES, BATCH, EPOCHS = 32, 4, 3, 2  # 2 steps per epoch, the second one padded


def _random_variables(module, shape, seed):
  """Small random values in the tree of `module.init` (eval_shape: no init is compiled)."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.zeros(shape))
  flat = traverse_util.flatten_dict(shapes)
  return traverse_util.unflatten_dict(
      {k: jnp.asarray(0.1 * rng.normal(size=v.shape), jnp.float32) for k, v in flat.items()})


def test_multiclass_step_compiles_once_across_steps_and_epochs(tmp_path, monkeypatch):
  cfg = config.multiclass()
  cfg.num_classes = 2
  module = backbones.make('efficientnet_lite0')
  backbone = weights.Backbone('efficientnet_lite0', module, 'imagenet', 'random')
  extractor_vars = _random_variables(module, (1, SIZE, SIZE, 3), seed=1)
  gen = multiclass.build_generator(cfg, backbone)
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
