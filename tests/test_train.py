import dataclasses
import functools
import gc
import json
import os
import signal
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from coseg_jax.core import train
from coseg_jax.core.errors import DivergedError

TC = train.TrainConfig(epochs=3, batch_size=2, learning_rate=0.3, weight_decay=5e-4,
                       checkpoint_every=2, seed=3)


def _data():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(5, 4)).astype(np.float32)
  return {'x': x, 'y': (x @ np.arange(4, dtype=np.float32) + 1.0)[:, None]}


def _loss(params, frozen, batch):
  pred = batch['x'] @ params['w'] * frozen['scale'] + params['b']
  loss = jnp.mean((pred - batch['y']) ** 2)
  return loss, {'abs_b': jnp.abs(params['b']).sum()}


def _params():
  return {'w': jnp.zeros((4, 1)), 'b': jnp.zeros((1,))}


def _fit(tmp_path, loss=_loss, tc=TC):
  return train.fit(loss, _params(), {'scale': jnp.ones(())}, _data(), tc,
                   ckpt_dir=str(tmp_path / 'ckpt'), log_path=str(tmp_path / 'loss.jsonl'),
                   quiet=True)


def test_batches_cover_epoch_and_wrap():
  per_epoch = train.steps_per_epoch(5, 2)
  seen = np.concatenate([train.batch_indices(5, 2, 0, s) for s in range(per_epoch)])
  assert per_epoch == 3 and len(seen) == 6
  assert set(seen[:5]) == set(range(5))      # every item once per epoch
  assert seen[5] == seen[0]                  # the last batch wraps around
  assert not np.array_equal(train.batch_indices(5, 2, 0, 0), train.batch_indices(5, 2, 0, 3))


def test_coupled_weight_decay_matches_torch_adam_formula():
  tc = train.TrainConfig(epochs=1, batch_size=1, learning_rate=0.1, weight_decay=0.5)
  opt = train.make_optimizer(tc)
  p = {'w': jnp.array([2.0])}
  g = {'w': jnp.array([0.3])}
  upd, _ = opt.update(g, opt.init(p), p)
  # First Adam step on g + wd * p: m_hat / (sqrt(v_hat) + eps) = sign(g + wd p).
  np.testing.assert_allclose(upd['w'], [-0.1], rtol=1e-5)
  upd_neg, _ = opt.update({'w': jnp.array([-1.5])}, opt.init(p), p)  # -1.5 + 1.0 < 0
  np.testing.assert_allclose(upd_neg['w'], [0.1], rtol=1e-5)


def test_trains_compiles_once_and_logs(tmp_path):
  traces = []

  def counting_loss(params, frozen, batch):
    traces.append(1)
    return _loss(params, frozen, batch)

  params, history = _fit(tmp_path, counting_loss)
  assert len(traces) == 1                     # one trace for 9 steps incl. padded batches
  assert len(history) == 9
  first, last = (np.mean([r['loss'] for r in history[s]]) for s in (slice(0, 3), slice(6, 9)))
  assert last < 0.5 * first
  lines = [json.loads(l) for l in open(tmp_path / 'loss.jsonl')]
  assert [r['step'] for r in lines] == list(range(1, 10))
  assert {'loss', 'epoch', 'abs_b'} <= set(lines[0])


def test_steps_set_the_length_whatever_the_group_size(tmp_path):
  tc = train.TrainConfig(epochs=3, batch_size=2, steps=4, learning_rate=0.3, weight_decay=0.0)
  _, history = _fit(tmp_path, tc=tc)          # 5 items: 3 epochs would be 9 steps
  assert [r['step'] for r in history] == [1, 2, 3, 4]
  assert [r['epoch'] for r in history] == [1, 1, 1, 2]


def test_cosine_schedule_scales_each_update_and_compiles_once(tmp_path):
  traces = []

  def counting_loss(params, frozen, batch):
    traces.append(1)
    return _loss(params, frozen, batch)

  tc = dataclasses.replace(TC, schedule='cosine')
  fitted, _ = _fit(tmp_path, counting_loss, tc)
  assert len(traces) == 1                     # the factor is an argument, not a constant
  # The same 9 steps by hand: Adam's update times the factor of its step.
  total = 9
  scales = [train.lr_scale('cosine', s, total) for s in range(total)]
  assert scales[0] == 1.0 and all(a > b for a, b in zip(scales, scales[1:])) and scales[-1] < 0.05
  opt = train.make_optimizer(tc)
  params, frozen, data = _params(), {'scale': jnp.ones(())}, _data()
  state = opt.init(params)
  for step, scale in enumerate(scales):
    idx = train.batch_indices(5, 2, tc.seed, step)
    grads = jax.grad(lambda p: _loss(p, frozen, {k: v[idx] for k, v in data.items()})[0])(params)
    upd, state = opt.update(grads, state, params)
    params = jax.tree.map(lambda p, u: p + scale * u, params, upd)
  for k in params:
    np.testing.assert_allclose(fitted[k], params[k], rtol=1e-5, atol=1e-6)
  constant, _ = _fit(tmp_path / 'constant')
  assert not np.allclose(constant['w'], fitted['w'], atol=1e-3)


@pytest.mark.parametrize('schedule', ['constant', 'cosine'])
def test_signal_checkpoint_and_resume_equal_uninterrupted(tmp_path, monkeypatch, schedule):
  tc = dataclasses.replace(TC, schedule=schedule)
  fit = functools.partial(_fit, tc=tc)
  full, _ = fit(tmp_path / 'full')

  real = train.batch_indices

  def interrupt_at_step_4(n, b, seed, step):
    if step == 4:
      os.kill(os.getpid(), signal.SIGTERM)
    return real(n, b, seed, step)

  monkeypatch.setattr(train, 'batch_indices', interrupt_at_step_4)
  with pytest.raises(KeyboardInterrupt):
    fit(tmp_path / 'cut')
  monkeypatch.setattr(train, 'batch_indices', real)
  assert sorted(os.listdir(tmp_path / 'cut' / 'ckpt'))[-1] == '5'
  resumed, history = fit(tmp_path / 'cut')
  assert [r['step'] for r in history] == [6, 7, 8, 9]
  for k in full:
    np.testing.assert_array_equal(full[k], resumed[k])
  steps = [json.loads(l)['step'] for l in open(tmp_path / 'cut' / 'loss.jsonl')]
  assert steps == list(range(1, 10))
  # A finished run is not trained again.
  again, history = fit(tmp_path / 'cut')
  assert history == []
  np.testing.assert_array_equal(again['w'], full['w'])


def test_nan_loss_stops_with_clear_error(tmp_path):
  def bad_loss(params, frozen, batch):
    loss, aux = _loss(params, frozen, batch)
    return loss * jnp.where(params['b'][0] != 0, jnp.nan, 1.0), aux

  with pytest.raises(DivergedError, match='loss is nan at step 2'):
    _fit(tmp_path, bad_loss)


def test_head_lr_mult_scales_only_layers_trained_from_scratch():
  tc = train.TrainConfig(epochs=1, batch_size=1, learning_rate=0.1, weight_decay=0.0,
                         head_lr_mult=10.0)
  opt = train.make_optimizer(tc)
  p = {'encoder': {'w': jnp.array([1.0])}, 'classifier': {'w': jnp.array([1.0])}}
  g = jax.tree.map(lambda x: jnp.array([0.5]), p)
  upd, _ = opt.update(g, opt.init(p), p)
  np.testing.assert_allclose(upd['encoder']['w'], [-0.1], rtol=1e-5)
  np.testing.assert_allclose(upd['classifier']['w'], [-1.0], rtol=1e-5)


def _sigterm_self():
  os.kill(os.getpid(), signal.SIGTERM)
  for _ in range(1000):  # the handler runs at the next bytecode boundary
    pass


def _swallowed_sigterm():
  """A SIGTERM whose KeyboardInterrupt is lost, as when it lands in a gc callback."""
  try:
    _sigterm_self()
  except KeyboardInterrupt:
    pass


def test_dropped_sigterm_interrupt_still_stops_the_run():
  from coseg_jax.core import errors
  with pytest.raises(KeyboardInterrupt):
    with errors.sigterm_as_interrupt():
      _swallowed_sigterm()
  # The trainer refuses to start once one was received.
  with pytest.raises(KeyboardInterrupt):
    with errors.sigterm_as_interrupt():
      _swallowed_sigterm()
      with train._StopRequested():
        pytest.fail('training started after a SIGTERM')
  with errors.sigterm_as_interrupt():  # a fresh block starts clean
    pass


def test_dropped_sigterm_interrupt_stops_before_any_output_is_written(tmp_path):
  # A run with no trainer (the clustering baseline) must not go on to write its results.
  from coseg_jax.core import errors
  from coseg_jax.core import fileio
  out = tmp_path / 'metrics.json'
  with pytest.raises(KeyboardInterrupt):
    with errors.sigterm_as_interrupt():
      _swallowed_sigterm()
      fileio.atomic_write_json(str(out), {'J': 1.0})
  assert not out.exists() and not list(tmp_path.iterdir())
  fileio.atomic_write_json(str(out), {'J': 1.0})  # outside the block: written
  assert out.exists()


def test_sigterm_in_a_gc_callback_stops_the_run_without_a_traceback(monkeypatch):
  # JAX's gc callback is where a SIGTERM's KeyboardInterrupt was dropped, with Python
  # printing "Exception ignored in ..." and a traceback to stderr.
  from coseg_jax.core import errors
  reported = []  # what Python would print as "Exception ignored in ..."
  monkeypatch.setattr(sys, 'unraisablehook', reported.append)

  def callback(phase, info):
    del info
    if phase == 'start':
      gc.callbacks.remove(callback)
      _sigterm_self()  # the handler raises here, inside the callback

  with pytest.raises(KeyboardInterrupt):
    with errors.sigterm_as_interrupt():
      gc.callbacks.append(callback)
      gc.collect()
      assert errors._received  # the interrupt did not get out of the callback
  assert not reported


def test_step_donates_its_state_only_off_cpu():
  # On CPU XLA would copy every donated parameter the backward still reads (slower step).
  loss = lambda params, frozen, batch: (jnp.sum((params['w'] * batch['x']) ** 2), {})
  optimizer = train.make_optimizer(train.TrainConfig(1, 2, learning_rate=0.1, weight_decay=0.0))
  params = {'w': jnp.ones((3,))}
  state = {'params': params, 'opt_state': optimizer.init(params), 'step': jnp.zeros((), jnp.int32)}
  args = (state, {}, {'x': jnp.ones((2, 3))}, 1.0)
  donating = jax.jit(functools.partial(train.train_step, loss, optimizer), donate_argnums=(0,))
  assert 'tf.aliasing_output' in donating.lower(*args).as_text()  # what donation looks like
  step = train.jit_step(loss, optimizer, train.data_mesh(2))
  assert 'tf.aliasing_output' not in step.lower(*args).as_text()
  new_state, _, _ = step(*args)
  assert int(new_state['step']) == 1 and not state['params']['w'].is_deleted()


# ---- issue 14: a diverged or failed fit leaves nothing to resume from ----

def _logged_steps(path):
  with open(path) as f:
    return [json.loads(line)['step'] for line in f]


@jax.custom_vjp
def _nan_gradient_if(flag, b):
  """0 with a NaN gradient for `b` where any `flag` is set: a loss that stays finite while
  its update is not (the NaN-learning-rate case, reached without one)."""
  del flag
  return jnp.zeros_like(b).sum()


def _nan_fwd(flag, b):
  return _nan_gradient_if(flag, b), (flag, b)


def _nan_bwd(res, g):
  flag, b = res
  return jnp.zeros_like(flag), jnp.where(flag.any(), jnp.nan, 0.0) * g * jnp.ones_like(b)


_nan_gradient_if.defvjp(_nan_fwd, _nan_bwd)


def _poisoned_last_step(tc):
  """Data whose only item first seen in the last step of a 1-epoch run poisons that step."""
  d = _data()
  steps = train.steps_per_epoch(len(d['x']), tc.batch_size)
  seen_before = {int(i) for s in range(steps - 1)
                 for i in train.batch_indices(len(d['x']), tc.batch_size, tc.seed, s)}
  last = set(int(i) for i in train.batch_indices(len(d['x']), tc.batch_size, tc.seed, steps - 1))
  poison = np.zeros((len(d['x']),), np.float32)
  poison[sorted(last - seen_before)] = 1.0
  assert poison.any()
  return dict(d, poison=poison)


def _poisoned_loss(params, frozen, batch):
  loss, aux = _loss(params, frozen, batch)
  return loss + _nan_gradient_if(batch['poison'], params['b']), aux


def test_nan_update_on_the_last_step_writes_no_checkpoint_and_is_not_resumed(tmp_path):
  tc = train.TrainConfig(epochs=1, batch_size=2, learning_rate=0.3, weight_decay=0.0,
                         checkpoint_every=1000, seed=3)
  kwargs = dict(ckpt_dir=str(tmp_path / 'ckpt'), log_path=str(tmp_path / 'loss.jsonl'), quiet=True)
  fit = lambda: train.fit(_poisoned_loss, _params(), {'scale': jnp.ones(())},
                          _poisoned_last_step(tc), tc, **kwargs)
  with pytest.raises(DivergedError, match='loss is nan at step 3'):
    fit()
  assert os.listdir(tmp_path / 'ckpt') == []  # the final checkpoint held the NaN weights
  assert _logged_steps(tmp_path / 'loss.jsonl') == [1, 2]
  with pytest.raises(DivergedError, match='at step 3'):  # trains again, not resumed
    fit()
  assert os.listdir(tmp_path / 'ckpt') == []


def test_checkpoint_manager_is_closed_when_the_run_diverges(tmp_path, monkeypatch):
  real = train.ocp.CheckpointManager
  managers = []

  class Recording(real):
    def __init__(self, *args, **kwargs):
      super().__init__(*args, **kwargs)
      self.closed = False
      managers.append(self)

    def close(self):
      self.closed = True
      super().close()

  monkeypatch.setattr(train.ocp, 'CheckpointManager', Recording)

  def bad_loss(params, frozen, batch):
    loss, aux = _loss(params, frozen, batch)
    return loss * jnp.where(params['b'][0] != 0, jnp.nan, 1.0), aux

  tc = train.TrainConfig(epochs=2, batch_size=2, learning_rate=0.3, weight_decay=0.0,
                         checkpoint_every=1, seed=3)
  with pytest.raises(DivergedError):  # step 1 is being saved when step 2 diverges
    _fit(tmp_path, bad_loss, tc)
  assert managers and all(m.closed for m in managers)
  assert not [n for n in os.listdir(tmp_path / 'ckpt') if 'tmp' in n]


def test_loss_log_is_trimmed_to_step_0_without_a_checkpoint(tmp_path):
  # A run killed before its first checkpoint left steps 1..3; the rerun starts at 0.
  with open(tmp_path / 'loss.jsonl', 'w') as f:
    for step in (1, 2, 3):
      f.write(json.dumps({'step': step, 'loss': 1.0}) + '\n')
    f.write('{"step": 4, "lo')  # cut short by the kill
  _fit(tmp_path)
  assert _logged_steps(tmp_path / 'loss.jsonl') == list(range(1, 10))


def test_disk_full_during_a_checkpoint_is_one_line_and_leaves_no_partial_step(tmp_path,
                                                                              monkeypatch):
  import errno
  from coseg_jax.core.errors import InputError

  def no_space(self, step, *args, **kwargs):
    os.makedirs(os.path.join(self.directory, f'{step}.orbax-checkpoint-tmp-1234'))
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  monkeypatch.setattr(train.ocp.CheckpointManager, 'save', no_space)
  with pytest.raises(InputError, match='ckpt: cannot write: the disk is full'):
    _fit(tmp_path)
  assert os.listdir(tmp_path / 'ckpt') == []


# orbax leaves the coroutines of the failed restore to be collected, each with its error.
@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
def test_checkpoint_of_another_model_is_one_line(tmp_path):
  _fit(tmp_path)
  from coseg_jax.core.errors import InputError
  wider = {'w': jnp.zeros((4, 3)), 'b': jnp.zeros((3,))}
  with pytest.raises(InputError, match='does not fit this model') as info:
    train.fit(lambda p, f, b: (jnp.sum(p['w']) + jnp.sum(p['b']), {}), wider,
              {'scale': jnp.ones(())}, _data(), TC, ckpt_dir=str(tmp_path / 'ckpt'),
              log_path=str(tmp_path / 'loss.jsonl'), quiet=True)
  assert '\n' not in str(info.value)


def test_checkpoint_with_non_finite_weights_is_never_resumed(tmp_path):
  # Older versions saved the weights of a diverged last step.
  from coseg_jax.core.errors import InputError
  tc = train.TrainConfig(epochs=1, batch_size=2, learning_rate=0.3, weight_decay=0.0, seed=3)
  optimizer = train.make_optimizer(tc)
  params = {'w': jnp.full((4, 1), jnp.nan), 'b': jnp.zeros((1,))}
  state = {'params': params, 'opt_state': optimizer.init(params), 'step': jnp.array(3, jnp.int32)}
  with train.ocp.CheckpointManager(str(tmp_path / 'ckpt')) as mngr:
    mngr.save(3, args=train.ocp.args.StandardSave(state))
    mngr.wait_until_finished()
  with pytest.raises(InputError, match='holds non-finite weights'):
    _fit(tmp_path, tc=tc)
