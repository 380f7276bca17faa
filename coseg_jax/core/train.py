"""Shared trainer: coupled-L2 Adam, one jitted step, orbax checkpoints with resume.

Both methods train one model per image group with `fit`. The step is compiled once:
batches have a fixed shape (the last batch of an epoch wraps around to the start of
that epoch's permutation), and the frozen backbone is an argument, not a constant.
The data order depends only on (seed, epoch), so a run resumed from step s replays
exactly the batches an uninterrupted run would have seen.

Data parallelism: the mini-batch is split over a ('data', 'replica') mesh of all
devices (every process's, after `initialize_distributed`); params, optimizer state and
the frozen tree are replicated. GSPMD inserts the gathers that mutual attention needs
(it pairs every image with the whole mini-batch) and the gradient all-reduce.
"""
import dataclasses
import functools
import glob
import json
import logging
import math
import os
import shutil
import signal

import jax
import jax.numpy as jnp
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec
import numpy as np
import optax
import orbax.checkpoint as ocp

from coseg_jax.core import errors
from coseg_jax.core import fileio
from coseg_jax.core import progress
from coseg_jax.core.errors import DivergedError
from coseg_jax.core.errors import InputError

log = logging.getLogger('coseg_jax')


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  epochs: int
  batch_size: int
  learning_rate: float
  weight_decay: float
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  checkpoint_every: int = 50
  max_checkpoints: int = 2
  seed: int = 0
  head_lr_mult: float = 1.0
  steps: int = 0  # > 0: the training length instead of `epochs`
  schedule: str = 'constant'  # 'constant' | 'cosine' (`lr_scale`)

  @classmethod
  def from_config(cls, config):
    t = config.train
    return cls(epochs=t.epochs, steps=t.steps, batch_size=config.data.batch_size,
               learning_rate=t.learning_rate, weight_decay=t.weight_decay, b1=t.b1, b2=t.b2,
               eps=t.eps, checkpoint_every=t.checkpoint_every,
               max_checkpoints=t.max_checkpoints, seed=config.seed, head_lr_mult=t.head_lr_mult,
               schedule=t.schedule)


# Top-level parameter subtrees initialised from ImageNet weights; everything else
# (attention, classifier, saliency head) starts from scratch and gets head_lr_mult.
PRETRAINED = ('encoder', 'backbone')


def make_optimizer(tc: TrainConfig) -> optax.GradientTransformation:
  # PyTorch's Adam(weight_decay=...) adds wd * w to the gradient before the moment
  # estimates (coupled L2), unlike AdamW; the papers trained with the former.
  adam = optax.chain(
      optax.add_decayed_weights(tc.weight_decay),
      optax.scale_by_adam(b1=tc.b1, b2=tc.b2, eps=tc.eps),
      optax.scale(-tc.learning_rate))
  if tc.head_lr_mult == 1.0:
    return adam
  return optax.chain(adam, optax.multi_transform(
      {'pretrained': optax.identity(), 'head': optax.scale(tc.head_lr_mult)},
      lambda params: {k: jax.tree.map(lambda _: 'pretrained' if k in PRETRAINED else 'head', v)
                      for k, v in params.items()}))


def lr_scale(schedule, step, total):
  """The factor on every learning rate at `step` of `total` (0-based): 1 throughout
  ('constant'), or a half cosine from 1 at step 0 towards 0 at `total` ('cosine').

  A host-side function of the step, passed to the jitted step as an argument, so one
  compile serves groups of any length and a resumed run continues the same curve.
  """
  if schedule == 'cosine':
    return 0.5 * (1.0 + math.cos(math.pi * step / total))
  if schedule == 'constant':
    return 1.0
  raise ValueError(f'unknown schedule {schedule!r}')


def steps_per_epoch(num_items, batch_size):
  return math.ceil(num_items / batch_size)


def batch_indices(num_items, batch_size, seed, step):
  """Indices of the batch at global `step`; a pure function of its arguments."""
  per_epoch = steps_per_epoch(num_items, batch_size)
  epoch, k = divmod(step, per_epoch)
  order = np.random.default_rng([seed, epoch]).permutation(num_items)
  return np.take(order, np.arange(k * batch_size, (k + 1) * batch_size), mode='wrap')


def train_step(loss_fn, optimizer, state, frozen, batch, lr_scale):
  """One Adam step, its update times `lr_scale` (the schedule's factor at this step, from
  the function of that name); the loss comes back NaN when the updated params are not finite, so the trainer's guard also
  stops a step whose loss was finite but whose update was not (e.g. a NaN learning rate),
  before those params reach a checkpoint."""
  (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state['params'], frozen, batch)
  updates, opt_state = optimizer.update(grads, state['opt_state'], state['params'])
  updates = jax.tree.map(lambda u: lr_scale * u, updates)
  params = optax.apply_updates(state['params'], updates)
  finite = jnp.all(jnp.stack([jnp.isfinite(p).all() for p in jax.tree.leaves(params)]))
  new_state = {'params': params, 'opt_state': opt_state, 'step': state['step'] + 1}
  return new_state, jnp.where(finite, loss, jnp.nan), aux


def initialize_distributed(cfg):
  """Joins a multi-process run when `cfg.coordinator_address` is set (config.distributed).

  Must run before anything touches devices. Unset num_processes / process_id are left
  to JAX, which reads them from the cluster environment (SLURM, Cloud TPU, ...).
  """
  if cfg.coordinator_address is None:
    return
  jax.distributed.initialize(coordinator_address=cfg.coordinator_address,
                             num_processes=cfg.num_processes, process_id=cfg.process_id)
  log.info('distributed: process %d of %d, %d devices in total', jax.process_index(),
           jax.process_count(), jax.device_count())


def data_mesh(batch_size, devices=None):
  """A ('data', 'replica') mesh over `devices` (default: every device of every process).

  The batch is split over gcd(batch_size, #devices) devices so that all shards have the
  same size; the rest of the factor holds replicas that repeat the same computation
  (e.g. the thesis' batch of 3 on 4 devices is not split at all).
  """
  devices = list(jax.devices() if devices is None else devices)
  split = math.gcd(batch_size, len(devices))
  return jax.make_mesh((split, len(devices) // split), ('data', 'replica'),
                       axis_types=(AxisType.Auto, AxisType.Auto), devices=devices)


def put(tree, mesh, spec=PartitionSpec()):
  """Places `tree` on `mesh` (replicated by default; PartitionSpec('data') splits axis 0).

  Every process holds the same full values (same data, same seed) and supplies only its
  own devices' shards, so this also works across hosts without a transfer between them.
  """
  sharding = NamedSharding(mesh, spec)

  def place(x):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

  return jax.tree.map(place, tree)


def jit_step(loss_fn, optimizer, mesh):
  """`train_step` compiled for `mesh`: batch split over 'data', everything else (the lr
  scale included) replicated.

  The state is donated on accelerators only. On CPU, XLA copies every donated parameter
  that the backward still reads when its update could already run (all the conv kernels):
  the 128 px thesis step took 661-695 ms donated, 619-653 not (BENCHMARKS.md, change 14).
  Host memory holds the second state easily.
  """
  replicated = NamedSharding(mesh, PartitionSpec())
  on_cpu = mesh.devices.flat[0].platform == 'cpu'
  return jax.jit(functools.partial(train_step, loss_fn, optimizer),
                 in_shardings=(replicated, replicated, NamedSharding(mesh, PartitionSpec('data')),
                               replicated),
                 out_shardings=replicated, donate_argnums=() if on_cpu else (0,))


def predict_in_batches(apply_fn, items_NxD, batch_size):
  """`apply_fn` over fixed-size batches of `items_NxD` (an array or a pytree of arrays with
  a common leading axis; one compile; the last batch wraps around to the start, as models
  with cross-image terms need partners): per item, its outputs as numpy (a pytree of
  arrays with a leading batch axis)."""
  n = len(jax.tree.leaves(items_NxD)[0])
  out = []
  for start in range(0, n, batch_size):
    idx = np.arange(start, start + batch_size) % n
    batch = jax.tree.map(np.asarray, apply_fn(jax.tree.map(lambda a, i=idx: a[i], items_NxD)))
    out.extend(jax.tree.map(lambda a, i=i: a[i], batch) for i in range(min(batch_size, n - start)))
  return out


class _StopRequested:
  """Turns SIGINT/SIGTERM into a flag checked between steps, so a checkpoint is written."""

  def __init__(self):
    self.signum = None
    self._old = {}

  def __enter__(self):
    errors.raise_if_interrupted()
    for s in (signal.SIGINT, signal.SIGTERM):
      try:
        self._old[s] = signal.signal(s, self._handle)
      except ValueError:  # not the main thread: leave signals alone
        pass
    return self

  def _handle(self, signum, frame):
    del frame
    if self.signum is not None:  # second signal: give up at once
      raise KeyboardInterrupt
    self.signum = signum

  def __exit__(self, *exc):
    for s, h in self._old.items():
      signal.signal(s, h)


def _rewrite_log_upto(log_path, last_step):
  """Drops records after `last_step` (and a line cut short by a kill), so a resumed
  run's log has no duplicate or broken steps."""
  if not os.path.exists(log_path):
    return
  keep = []
  with open(log_path) as f:
    for line in f:
      try:
        if json.loads(line)['step'] <= last_step:
          keep.append(line)
      except (ValueError, KeyError):
        pass
  fileio.atomic_write_text(log_path, ''.join(keep))


class Trainer:
  """The optimizer and the jitted step of one loss, built once per run and reused by every
  group: the step's inputs (a batch of `tc.batch_size`, params, frozen tree) have the same
  shapes for every group, so it compiles once per run however many groups there are.
  """

  def __init__(self, loss_fn, tc: TrainConfig, devices=None):
    """`loss_fn(params, frozen, batch) -> (loss, aux)`, pure; `aux` is a dict of scalars
    logged per step. `devices`: the devices to train on (default: all, see `data_mesh`)."""
    self.tc = tc
    self.optimizer = make_optimizer(tc)
    self.mesh = data_mesh(tc.batch_size, devices)
    self.step_fn = jit_step(loss_fn, self.optimizer, self.mesh)

  def fit(self, params, frozen, data, *, ckpt_dir, log_path, quiet=False, desc='train'):
    """Trains `params` on `data`, resuming from the latest checkpoint in `ckpt_dir`.

    Args:
      params: trainable pytree (the only thing the optimizer sees).
      frozen: pytree passed through unchanged (e.g. the frozen extractor's weights).
      data: dict of arrays with a common leading axis N; batches are dicts of the same keys.
      ckpt_dir: orbax checkpoint directory; the latest checkpoint there is resumed (one of
        another model or holding non-finite weights is an InputError). A failed fit leaves
        no partial step there and its manager closed; a full disk is an InputError. None: no
        checkpoints (the Python API without a work directory).
      log_path: JSONL file, one record per step (step, epoch, loss, aux); written by
        process 0 only, first cut back to the resumed step (0 without a checkpoint). None: not
        written.

    Returns:
      (params, history) where history is the list of per-step loss records of this call.
    """
    tc, mesh = self.tc, self.mesh
    num_items = len(next(iter(data.values())))
    per_epoch = steps_per_epoch(num_items, tc.batch_size)
    total = tc.steps or tc.epochs * per_epoch
    log.info('%s: %d device(s), batch of %d split %d-way', desc, mesh.size, tc.batch_size,
             mesh.shape['data'])
    if mesh.shape['replica'] > 1:
      log.warning('%s: batch size %d is not a multiple of the %d devices; %d replicas repeat '
                  'each shard', desc, tc.batch_size, mesh.size, mesh.shape['replica'])
    state = put({'params': params, 'opt_state': self.optimizer.init(params),
                 'step': jnp.zeros((), jnp.int32)}, mesh)
    frozen = put(frozen, mesh)
    chief = jax.process_index() == 0
    if ckpt_dir is None:
      mngr = _NoCheckpoints()
    else:
      ckpt_dir = os.path.abspath(ckpt_dir)
      mngr = ocp.CheckpointManager(
          ckpt_dir,
          options=ocp.CheckpointManagerOptions(max_to_keep=tc.max_checkpoints, create=True))
    # Closed on every way out (a divergence or an interrupt while a save is in flight
    # included), so no orbax thread is left to fail at exit.
    try:
      result = self._fit(mngr, state, frozen, data, ckpt_dir=ckpt_dir, log_path=log_path,
                         total=total, per_epoch=per_epoch, chief=chief, quiet=quiet, desc=desc)
    except BaseException as e:
      _close_quietly(mngr)
      if ckpt_dir is not None:
        _remove_partial_checkpoints(ckpt_dir)
      if fileio.is_disk_full(e):
        raise fileio.disk_full(ckpt_dir, e) from None
      raise
    mngr.close()
    return result

  def _fit(self, mngr, state, frozen, data, *, ckpt_dir, log_path, total, per_epoch, chief,
           quiet, desc):
    tc, mesh = self.tc, self.mesh
    num_items = len(next(iter(data.values())))
    latest = mngr.latest_step()
    if latest is not None:
      try:
        state = mngr.restore(latest, args=ocp.args.StandardRestore(state))
      except (ValueError, TypeError, KeyError) as e:  # shapes or tree of another model
        reason = ' '.join(str(e).split())[:200]
        raise InputError(f'{ckpt_dir}: checkpoint {latest} does not fit this model (another '
                         f'config wrote it?): {reason}') from None
      if not all(bool(jnp.isfinite(p).all()) for p in jax.tree.leaves(state['params'])):
        # Written by an older version that saved diverged weights; never resume them.
        raise InputError(f'{ckpt_dir}: checkpoint {latest} holds non-finite weights (a '
                         'diverged run); delete the folder to train again')
      log.info('%s: resumed from checkpoint at step %d/%d', desc, latest, total)
    if chief and log_path:
      # Records after the resumed step (all of them without a checkpoint) are from a run
      # that was killed before its next checkpoint: this run writes them again.
      _rewrite_log_upto(log_path, 0 if latest is None else latest)
    start = int(state['step'])

    history = []
    running = None
    # The step's loss is read on the host one step late, after the next step has been
    # dispatched, so the device never waits for the host (nanodo); every loss is still
    # checked, and read before any checkpoint that holds its update is written.
    pending = None

    def settle():
      nonlocal pending, running
      if pending is None:
        return
      step, loss, aux = pending
      pending = None
      loss = float(loss)
      if not math.isfinite(loss):
        raise DivergedError(
            f'{desc}: loss is {loss} at step {step + 1}; nothing was written for this group. '
            'Lower --config.train.learning_rate or check the input images.')
      rec = {'step': step + 1, 'epoch': step // per_epoch + 1, 'loss': loss,
             **{k: float(v) for k, v in aux.items()}}
      history.append(rec)
      try:
        log_file.write(json.dumps(rec) + '\n')
        log_file.flush()
      except OSError as e:
        if fileio.is_disk_full(e):
          raise fileio.disk_full(log_path) from None
        raise
      running = loss if running is None else 0.9 * running + 0.1 * loss
      pbar.set_postfix(loss=f'{running:.4f}')
      pbar.update(1)

    with _StopRequested() as stop, open(log_path if chief and log_path else os.devnull, 'a') as log_file, \
        progress.bar(total=total, desc=desc, quiet=quiet or not chief) as pbar:
      pbar.update(start)
      for step in range(start, total):
        idx = batch_indices(num_items, tc.batch_size, tc.seed, step)
        batch = put({k: v[idx] for k, v in data.items()}, mesh, PartitionSpec('data'))
        scale = put(np.float32(lr_scale(tc.schedule, step, total)), mesh)
        state, loss, aux = self.step_fn(state, frozen, batch, scale)
        settle()
        pending = (step, loss, aux)
        done = step + 1
        if done % tc.checkpoint_every == 0 or done == total or stop.signum is not None:
          settle()
          mngr.save(done, args=ocp.args.StandardSave(state), force=True)
        if stop.signum is not None:
          mngr.wait_until_finished()
          log.info('%s: stopped by signal %d at step %d; checkpoint written', desc,
                   stop.signum, done)
          raise KeyboardInterrupt
      settle()
    mngr.wait_until_finished()
    return state['params'], history


def _close_quietly(mngr):
  """Waits for (and drops the error of) a save still in flight and closes the manager, so
  a failure shows once, here, rather than in orbax threads at exit."""
  for action in (mngr.wait_until_finished, mngr.close):
    try:
      action()
    except Exception:  # noqa: BLE001 -- the error that got us here is the one reported
      pass


def _remove_partial_checkpoints(ckpt_dir):
  """orbax writes a step into <step>.orbax-checkpoint-tmp* and renames it when complete."""
  for tmp in glob.glob(os.path.join(glob.escape(ckpt_dir), '*.orbax-checkpoint-tmp*')):
    shutil.rmtree(tmp, ignore_errors=True)


class _NoCheckpoints:
  """Stands in for orbax's CheckpointManager when `fit` has no checkpoint directory."""

  def latest_step(self):
    return None

  def save(self, *args, **kwargs):
    del args, kwargs

  def wait_until_finished(self):
    pass

  def close(self):
    pass


def fit(loss_fn, params, frozen, data, tc: TrainConfig, *, devices=None, **kwargs):
  """`Trainer(loss_fn, tc, devices).fit(params, frozen, data, **kwargs)`: for one-off
  training; a run over several groups builds its Trainer once."""
  return Trainer(loss_fn, tc, devices).fit(params, frozen, data, **kwargs)
