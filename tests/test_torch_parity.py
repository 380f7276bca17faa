"""JAX vs the PyTorch twins in coseg_jax.torch_ref: same inputs and weights, same losses
and gradients (multi-class training step, DeepCO3 losses), and the same optimizer.

Loss gradients are compared in float64 (jax.enable_x64, torch double): the co-attention
loss L2-normalises pooled features that share a large common component, so its
gradients are ill-conditioned and two correct float32 implementations differ by up to
~1e-2 in them (their float32 losses agree to ~1e-6). In float64 the two agree to ~1e-12,
so TOL leaves a wide margin while any real difference (a transposed kernel, a wrong
resize, a missing term) is orders of magnitude above it. The EfficientNet generator is
checked in float32 (torch's float64 depthwise convolution is too slow) on a
well-conditioned objective.
"""
import functools

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from coseg_jax import torch_ref
from coseg_jax.backbones import convert
from coseg_jax.backbones import modules as backbones
from coseg_jax.backbones import weights
from coseg_jax.core import config
from coseg_jax.core import train
from coseg_jax.instance import model as deepco3
from coseg_jax.multiclass import pipeline as multiclass

TOL = 1e-4
STEP_FACTORS = (1.0, -0.5, 2.0)


def _randomize(shapes, seed):
  """Random values for a tree of shapes (jax.eval_shape of an init; no init is compiled):
  He-normal kernels, small random biases and BN statistics, so that every mapped leaf
  matters (zero biases and unit statistics would hide a wrong mapping)."""
  rng = np.random.default_rng(seed)
  out = {}
  for path, leaf in traverse_util.flatten_dict(shapes).items():
    shape = leaf.shape
    if path[-1] == 'kernel':
      x = rng.normal(0.0, np.sqrt(2.0 / np.prod(shape[:-1])), shape)
    elif path[-1] in ('bias', 'mean'):
      x = 0.1 * rng.normal(size=shape)
    elif path[-1] in ('scale', 'var'):
      x = rng.uniform(0.5, 1.5, shape)
    else:
      x = np.zeros(shape)
    out[path] = jnp.asarray(x, jnp.float32)
  return traverse_util.unflatten_dict(out)


def _backbone(name, size, seed):
  module = backbones.make(name)
  variables = _randomize(
      jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3))), seed)
  if name == 'resnet50':  # torchvision convs have no bias
    variables = traverse_util.unflatten_dict({
        k: jnp.zeros_like(v) if k[-1] == 'bias' and 'conv' in k[-2] else v
        for k, v in traverse_util.flatten_dict(variables).items()})
  preprocessing = 'caffe' if name == 'vgg16' else 'imagenet'
  if preprocessing == 'caffe':  # inputs in 0..255: keep activations O(1)
    variables['params']['conv1_1']['kernel'] /= 64.0
  return weights.Backbone(name, module, preprocessing, 'random'), variables


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.moveaxis(np.asarray(x), -1, 1)))


def _f64(tree):
  # Through numpy: an eager astype would compile one conversion per leaf shape.
  return jax.tree.map(lambda a: jnp.asarray(np.asarray(a, np.float64)), tree)


def _assert_close(got, want, what, floor=0.0):
  """Elementwise, relative to the largest entry of `want` (rtol TOL), at least `floor`."""
  got, want = np.asarray(got), np.asarray(want)
  assert got.shape == want.shape, (what, got.shape, want.shape)
  np.testing.assert_allclose(got, want, rtol=TOL, atol=max(TOL * np.abs(want).max(), floor),
                             err_msg=what)


def _assert_grads_close(jax_grads_by_name, torch_module, noise=1e-9):
  """Every trainable torch parameter against its JAX gradient; returns how many were used.

  Gradients that are zero in exact arithmetic (the key biases: a row softmax ignores a
  constant added to its row) are rounding noise in both, hence an absolute floor of
  `noise` times the largest gradient (float64: 1e-9; float32 needs more).
  """
  params = dict(torch_module.named_parameters())
  assert set(jax_grads_by_name) == set(params)
  floor = noise * max(float(p.grad.abs().max()) for p in params.values() if p.grad is not None)
  used = 0
  for k, p in params.items():
    if p.grad is None:  # layers after the tap: torch skips them, JAX's gradient is zero
      assert not np.any(np.asarray(jax_grads_by_name[k])), k
      continue
    _assert_close(jax_grads_by_name[k], p.grad, k, floor)
    used += bool(p.grad.abs().max() > floor)
  return used


@pytest.mark.parametrize('direction,size', [('up', (29, 40)), ('down', (5, 6))])
def test_resize_matches_jax_bilinear(direction, size):
  x = np.random.default_rng(0).random((2, 3, 13, 17), np.float32)
  want = np.asarray(jax.image.resize(jnp.asarray(x), (2, 3) + size, 'bilinear'))
  np.testing.assert_allclose(torch_ref.resize_bilinear(torch.from_numpy(x), size), want,
                             atol=1e-6)
  # Without antialiasing torch only agrees when upsampling.
  plain = F.interpolate(torch.from_numpy(x), size=size, mode='bilinear', align_corners=False)
  assert np.allclose(plain, want, atol=1e-6) == (direction == 'up')


@pytest.mark.parametrize('name', ['vgg16', 'resnet50'])
def test_backbone_state_dict_inverts_convert(name):
  _, variables = _backbone(name, 32, seed=1)
  state = {k: v.numpy() for k, v in torch_ref.backbone_state_dict(name, variables).items()}
  rules = {'vgg16': convert.vgg16_torch_rules, 'resnet50': convert.resnet50_torch_rules}[name]()
  back = convert.apply_rules(state, rules, path='state', what=name)
  flat_back, flat = (traverse_util.flatten_dict(v) for v in (back, variables))
  assert set(flat_back) == set(flat)
  for k, v in flat.items():
    np.testing.assert_array_equal(flat_back[k], v, err_msg=str(k))


def _multiclass_setup(encoder_name, extractor_name, size=64, k=2, batch=3, cluster_taps='auto'):
  cfg = config.multiclass()
  cfg.num_classes = k
  cfg.model.cluster_taps = cluster_taps
  encoder, encoder_vars = _backbone(encoder_name, size, seed=1)
  extractor, extractor_vars = _backbone(extractor_name, size, seed=2)
  gen = multiclass.build_generator(cfg, encoder, extractor, cfg.num_classes)
  params = _randomize(jax.eval_shape(gen.init, jax.random.PRNGKey(0),
                                     jnp.zeros((batch, size, size, 3)))['params'], seed=0)
  params['encoder'] = encoder_vars['params']
  # Non-zero gamma and classifier bias so that attention and all of its projections
  # shape the output (gamma starts at 0 in training); smaller query/key projections keep
  # the attention softmaxes off saturation.
  att = {name: dict(layer, kernel=0.1 * layer['kernel']) if name.endswith(('query', 'key'))
         else layer for name, layer in params['attention'].items()}
  params['attention'] = dict(att, gamma=jnp.asarray(0.7))
  params['classifier'] = dict(params['classifier'], bias=jnp.asarray([0.3, -0.2, 0.1][:k + 1]))
  image = np.random.default_rng(3).random((batch, size, size, 3), np.float32)
  loss_fn = functools.partial(multiclass.loss_fn, gen, extractor, cfg.loss)
  return cfg, gen, params, extractor, extractor_vars, {'image': jnp.asarray(image)}, loss_fn


def _three_steps(optimizer, params, grads):
  """Three optimizer steps with gradients `grads` times 1, -0.5, 2: exercises both moment
  estimates and the coupled decay while each framework uses its own gradients."""
  opt_state = optimizer.init(params)
  for factor in STEP_FACTORS:
    updates, opt_state = optimizer.update(jax.tree.map(lambda g: factor * g, grads), opt_state,
                                          params)
    params = jax.tree.map(jnp.add, params, updates)
  return params


@pytest.mark.slow
def test_multiclass_training_step_matches_torch():
  # The thesis' networks: VGG16 encoder, ResNet-50 extractor.
  encoder_name, extractor_name = 'vgg16', 'resnet50'
  cfg, gen, params, extractor, extractor_vars, batch, loss_fn = _multiclass_setup(
      encoder_name, extractor_name, size=64)
  tc = train.TrainConfig(epochs=1, batch_size=3, learning_rate=1e-3, weight_decay=5e-4)
  optimizer = train.make_optimizer(tc)
  with jax.enable_x64(True):
    params, extractor_vars, batch = _f64((params, extractor_vars, batch))
    (loss, _), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
        params, extractor_vars, batch)
    maps = jax.jit(gen.apply)({'params': params}, batch['image'])
    stepped = jax.jit(functools.partial(_three_steps, optimizer))(params, grads)

  gen_t = torch_ref.generator_from_flax(gen.spec, encoder_name, params, torch.float64)
  extractor_t = torch_ref.backbone_from_flax(extractor_name, extractor_vars, torch.float64)
  loss_t, maps_t = torch_ref.multiclass_loss(
      gen_t, extractor_t, multiclass.EXTRACTOR_TAPS[extractor_name], extractor.preprocessing,
      _nchw(batch['image']), cfg.loss)
  loss_t.backward()

  _assert_close(maps, maps_t.detach().permute(0, 2, 3, 1), 'maps')
  np.testing.assert_allclose(loss, loss_t.item(), rtol=TOL)
  assert 0.05 < float(loss) < 5.0  # neither saturated nor trivially zero
  used = _assert_grads_close(torch_ref.generator_state_dict(encoder_name, grads), gen_t)
  # Every parameter before the tap has a non-zero gradient, except the two key biases.
  assert used == sum(p.grad is not None for p in gen_t.parameters()) - 2
  assert all(p.grad is None for p in extractor_t.parameters())  # f stays frozen

  adam = torch_ref.make_adam(gen_t.parameters(), tc)
  grads_t = {k: torch.zeros_like(p) if p.grad is None else p.grad.clone()
             for k, p in gen_t.named_parameters()}
  for factor in STEP_FACTORS:
    for k, p in gen_t.named_parameters():
      p.grad = factor * grads_t[k]
    adam.step()
  want = torch_ref.generator_state_dict(encoder_name, stepped)
  for k, p in gen_t.named_parameters():
    np.testing.assert_allclose(p.detach(), want[k], rtol=1e-7, atol=1e-9, err_msg=k)
  moved = np.abs(np.asarray(want['classifier.weight']) - np.asarray(
      torch_ref.generator_state_dict(encoder_name, params)['classifier.weight']))
  assert moved.min() > 1e-4  # the steps really changed the parameters


@pytest.mark.slow
@pytest.mark.parametrize('cluster_taps', ['auto', 'stride8+stride16+stride32'])
def test_efficientnet_generator_float32_matches_torch(cluster_taps):
  # float32, because torch's float64 depthwise convolution takes seconds per call. The
  # co-attention loss' gradients are ill-conditioned in float32 (module docstring), so
  # the generator's gradients are checked on a linear functional of its maps instead;
  # the loss itself (through the EfficientNet extractor) must still agree. With a
  # stride-8 tap the attention runs on the map resized to the stride-16 grid.
  name = 'efficientnet_lite0'
  cfg, gen, params, extractor, extractor_vars, batch, loss_fn = _multiclass_setup(
      name, name, size=64, cluster_taps=cluster_taps)
  assert gen.spec.attention.pool == (2 if 'stride8' in cluster_taps else 1)
  loss, _ = jax.jit(loss_fn)(params, extractor_vars, batch)
  weights_ = np.random.default_rng(7).normal(size=(3, 64, 64, 3)).astype(np.float32)
  grads = jax.jit(jax.grad(lambda p: jnp.sum(gen.apply({'params': p}, batch['image'])
                                             * weights_)))(params)

  gen_t = torch_ref.generator_from_flax(gen.spec, name, params)
  with torch.no_grad():
    loss_t, _ = torch_ref.multiclass_loss(
        gen_t, torch_ref.backbone_from_flax(name, extractor_vars), 'head',
        extractor.preprocessing, _nchw(batch['image']), cfg.loss)
  (gen_t(_nchw(batch['image'])) * _nchw(weights_)).sum().backward()

  np.testing.assert_allclose(loss, loss_t.item(), rtol=TOL)
  used = _assert_grads_close(torch_ref.generator_state_dict(name, grads), gen_t, noise=1e-5)
  assert used == sum(p.grad is not None for p in gen_t.parameters()) - 2


@pytest.mark.slow
def test_deepco3_losses_and_gradients_match_torch():
  size, batch = 96, 4
  backbone, variables = _backbone('vgg16', size, seed=4)
  model = deepco3.DeepCO3(deepco3.BackboneFeatures(backbone, 'conv5_3'))
  rng = np.random.default_rng(5)
  params = {'backbone': variables['params'],
            'head': {'kernel': jnp.asarray(rng.normal(0, 0.02, (1, 1, 512, 1)), jnp.float32),
                     'bias': jnp.asarray([0.2], jnp.float32)}}
  image = rng.random((batch, size, size, 3), np.float32)
  prior = rng.random((batch, size, size), np.float32)
  data = {'image': jnp.asarray(image), 'prior': jnp.asarray(prior)}
  weights_ = deepco3.LossWeights()
  loss_fn = functools.partial(deepco3.deepco3_loss, model=model, weights=weights_)

  @jax.jit
  def copeak_masks(params, image):
    out = model(params, None, image)
    t = jax.vmap(deepco3.correlation)(out['feat'][:2], out['feat'][2:], out['sal_small'][:2],
                                      out['sal_small'][2:])
    return jax.vmap(deepco3.copeak_mask)(t)

  # float64 also keeps near-ties of T from ordering differently in the two frameworks.
  with jax.enable_x64(True):
    params = _f64(params)
    (loss, aux), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params, None, data)
    masks = copeak_masks(params, data['image'])

  model_t = torch_ref.deepco3_from_flax('vgg16', 'conv5_3', 'caffe', params, dtype=torch.float64)
  loss_t, aux_t, masks_t = torch_ref.deepco3_loss(
      model_t, _nchw(image).double(), torch.from_numpy(prior).double(), weights_)
  loss_t.backward()

  np.testing.assert_array_equal(masks, masks_t)
  assert 0 < int(masks.sum()) < masks.size // 10
  for term in ('copeak', 'affinity', 'saliency'):
    np.testing.assert_allclose(aux[term], aux_t[term].item(), rtol=TOL, err_msg=term)
  np.testing.assert_allclose(loss, loss_t.item(), rtol=TOL)
  want = torch_ref.deepco3_state_dict('vgg16', grads)
  assert _assert_grads_close(want, model_t) == len(want)


@pytest.mark.slow
def test_peaks_and_median_match_jax_on_ties():
  # Plateaus (ties) and an even element count exercise '>=' and the two-value median.
  x = np.random.default_rng(6).integers(0, 4, (3, 4, 5, 4, 6)).astype(np.float32)
  want = jax.vmap(deepco3.local_maxima)(jnp.asarray(x))
  np.testing.assert_array_equal(torch_ref.local_maxima(torch.from_numpy(x), batch_dims=1), want)
  np.testing.assert_allclose(torch_ref.median(torch.from_numpy(x), batch_dims=1),
                             np.median(x.reshape(3, -1), axis=1))
