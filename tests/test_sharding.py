"""Data parallelism: training split over 4 devices, or over 2 processes, matches one device.

JAX fixes its devices at start-up, so the sharded runs happen in child processes (this
file run as a script) with XLA_FLAGS forcing several CPU devices; each prints one JSON
line of measurements that the tests assert on.
"""
import json
import os
import pathlib
import socket
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import test_train

from coseg_jax.core import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(num_devices):
  env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={num_devices}',
             JAX_PLATFORMS='cpu')
  env['PYTHONPATH'] = os.pathsep.join(filter(None, [ROOT, env.get('PYTHONPATH')]))
  return env


def _child_output(proc):
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _devices_child(tmp):
  import flax.linen as nn
  import jax
  from jax.sharding import PartitionSpec
  import optax

  from coseg_jax.multiclass import attention

  class Tiny(nn.Module):
    """Dense -> self + mutual attention -> Dense: MA mixes every image with the batch."""

    @nn.compact
    def __call__(self, x_BxHxWxC):
      feat = nn.Dense(8)(x_BxHxWxC)
      feat = attention.AttentionModule(attention.AttentionSpec(mode='sa_ma'))(feat)
      return nn.Dense(1)(feat)[..., 0]

  model = Tiny()

  def loss_fn(params, frozen, batch):
    pred_BxHxW = model.apply({'params': params}, batch['x'])
    loss = jnp.mean((pred_BxHxW * frozen['scale'] - batch['y']) ** 2)
    return loss, {'mean_pred': pred_BxHxW.mean()}

  rng = np.random.default_rng(0)
  data = {'x': rng.normal(size=(6, 3, 3, 5)).astype(np.float32),
          'y': rng.normal(size=(6, 3, 3)).astype(np.float32)}
  params = jax.device_get(model.init(jax.random.PRNGKey(0), data['x'][:4])['params'])
  # gamma = 0 at init would hide the attention branch from both the loss and the grads.
  params['AttentionModule_0']['gamma'] = np.float32(0.7)
  frozen = {'scale': np.float32(1.5)}
  devices = jax.devices()
  out = {'num_devices': len(devices),
         'mesh_3': dict(train.data_mesh(3, devices).shape),
         'mesh_6': dict(train.data_mesh(6, devices).shape)}

  # One step with SGD(lr=1): params - new params are exactly the gradients.
  sgd = optax.sgd(1.0)
  batch = {k: v[:4] for k, v in data.items()}
  grads, losses = [], []
  for devs in (devices[:1], devices):
    mesh = train.data_mesh(4, devs)
    state = train.put({'params': params, 'opt_state': sgd.init(params),
                       'step': np.zeros((), np.int32)}, mesh)
    placed = train.put(batch, mesh, PartitionSpec('data'))
    new_state, loss, _ = train.jit_step(loss_fn, sgd, mesh)(state, train.put(frozen, mesh), placed,
                                                       1.0)
    grads.append(jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), params,
                              new_state['params']))
    losses.append(float(loss))
  out['step_batch_shard_rows'] = placed['x'].sharding.shard_shape(placed['x'].shape)[0]
  out['step_losses'] = losses
  out['ma_query_grad_norm'] = float(np.abs(grads[0]['AttentionModule_0']['ma_query']['kernel']).sum())
  # Relative to the largest gradient: key biases have an exactly zero gradient (softmax
  # is shift invariant), so a per-leaf ratio would compare rounding noise.
  out['grad_max_rel_diff'] = max(
      float(np.abs(a - b).max()) for a, b in zip(*map(jax.tree.leaves, grads))) / max(
          float(np.abs(a).max()) for a in jax.tree.leaves(grads[0]))

  # Full fit with Adam, batch 6 on 4 devices: split 2-way, 2 replicas. Adam's eps=1e-8
  # would turn the ~1e-9 rounding noise of those zero gradients into full-size steps.
  tc = train.TrainConfig(epochs=3, batch_size=6, learning_rate=1e-2, weight_decay=5e-4,
                         eps=1e-3, checkpoint_every=100)
  fits = []
  for name, devs in (('one', devices[:1]), ('all', devices)):
    fitted, history = train.fit(loss_fn, params, frozen, data, tc, devices=devs, quiet=True,
                                ckpt_dir=os.path.join(tmp, name, 'ckpt'),
                                log_path=os.path.join(tmp, name, 'loss.jsonl'))
    fits.append((fitted, [r['loss'] for r in history]))
  out['fit_param_devices'] = len(jax.tree.leaves(fits[1][0])[0].sharding.device_set)
  out['fit_losses'] = [f[1] for f in fits]
  out['fit_param_max_abs_diff'] = max(
      float(np.abs(np.asarray(a) - np.asarray(b)).max())
      for a, b in zip(jax.tree.leaves(fits[0][0]), jax.tree.leaves(fits[1][0])))
  return out


@pytest.mark.slow
def test_sharded_step_and_fit_match_single_device(tmp_path):
  out = _child_output(subprocess.run(
      [sys.executable, __file__, 'devices', str(tmp_path)], env=_env(4), capture_output=True,
      text=True, timeout=300))

  assert out['num_devices'] == 4
  # Batch sizes that are not a multiple of the device count split as far as they divide.
  assert out['mesh_3'] == {'data': 1, 'replica': 4}
  assert out['mesh_6'] == {'data': 2, 'replica': 2}
  # The 4-image step really ran one image per device.
  assert out['step_batch_shard_rows'] == 1
  assert out['ma_query_grad_norm'] > 1e-4          # mutual attention is in the gradient
  one, four = out['step_losses']
  assert abs(one - four) <= 1e-5 * abs(one)
  assert out['grad_max_rel_diff'] < 1e-5

  assert out['fit_param_devices'] == 4            # trained params live on every device
  single, sharded = out['fit_losses']
  assert len(single) == len(sharded) == 3
  assert sharded[-1] < sharded[0]
  for a, b in zip(single, sharded):
    assert abs(a - b) <= 1e-5 * abs(a)
  assert out['fit_param_max_abs_diff'] < 1e-5


def _fit_record(tmp):
  # The trainer test's linear problem (batch 2: split 2-way over 4 devices).
  params, history = test_train._fit(pathlib.Path(tmp))
  return {'losses': [r['loss'] for r in history],
          'params': {k: np.asarray(v).tolist() for k, v in params.items()}}


def _process_child(process_id, address, tmp):
  import jax
  from ml_collections import config_dict
  train.initialize_distributed(config_dict.ConfigDict(
      {'coordinator_address': address, 'num_processes': 2, 'process_id': int(process_id)}))
  return {'process_count': jax.process_count(), 'device_count': jax.device_count(),
          **_fit_record(tmp)}


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
  with socket.socket() as s:
    s.bind(('localhost', 0))
    address = f'localhost:{s.getsockname()[1]}'
  # Both processes share one work directory, as on a cluster with a shared file system.
  procs = [subprocess.Popen([sys.executable, __file__, 'process', str(i), address,
                             str(tmp_path / 'shared')], env=_env(2), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for i in range(2)]
  outs = []
  for p in procs:
    stdout, stderr = p.communicate(timeout=300)
    outs.append(_child_output(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr)))
  single = _fit_record(tmp_path / 'single')
  for out in outs:
    assert out['process_count'] == 2 and out['device_count'] == 4
    np.testing.assert_allclose(out['losses'], single['losses'], rtol=1e-5)
    for k, v in single['params'].items():
      np.testing.assert_allclose(out['params'][k], v, rtol=1e-5, atol=1e-6)
  # Only process 0 writes the loss log.
  steps = [json.loads(l)['step'] for l in open(tmp_path / 'shared' / 'loss.jsonl')]
  assert steps == list(range(1, 10))


if __name__ == '__main__':
  _CHILDREN = {'devices': _devices_child, 'process': _process_child}
  print(json.dumps(_CHILDREN[sys.argv[1]](*sys.argv[2:])))
