"""JAX vs the PyTorch reference (coseg_jax.torch_ref) of the same computations, in one process.

  python bin/bench.py --out=bench.json --md=bench.md           # paper sizes: 384 and 128
  python bin/bench.py --sizes=128 --repeats=3 --out=quick.json # quick (< 5 min on 2 cores)

Rows (SPEC §7): the multi-class training step (generator + attention + frozen extractor
+ co-attention loss, forward, backward and the Adam update), inference per image, mutual
attention alone (forward; forward + backward), and the DeepCO3 4D correlation + co-peak
maxima at 448 input. Per row: the median wall time of each framework over alternating
blocks of runs (both see the same drift in machine load; see `Bench.run`), the JAX/PyTorch ratio,
the ratio of process CPU time (all threads; steadier while other processes load the
machine, but it counts threads that spin-wait), peak memory, and GFLOP/s from XLA's cost
analysis of the function (`_flops`; the same count is used for PyTorch) against the
machine's peak.

Memory: on CPU, the peak resident-set growth while the first (warm-up) call runs,
sampled every millisecond after freed heap memory is returned to the OS (a lower bound
for short-lived peaks), and XLA's buffer plan for one call (`memory_analysis`:
temporaries plus outputs not aliased to donated inputs, the quantity comparable to the
RSS growth as arguments are resident before the call); on GPU, the device allocator's
peak for JAX (PyTorch, the CPU reference, always runs on the CPU). Weights are random
(timings do not depend on them).

XLA flags go through the environment: XLA_FLAGS=... python bin/bench.py. On a machine
that other processes load, PyTorch's OpenMP threads spin at every barrier and small ops
slow down ~100x; OMP_WAIT_POLICY=PASSIVE avoids that (the run records both settings and
warns when the load average exceeds the CPUs).
"""
import ctypes
import functools
import gc
import os
import platform
import statistics
import sys
import threading
import time

from absl import app
from absl import flags
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import torch

from coseg_jax import torch_ref
from coseg_jax.backbones import cpu_kernels
from coseg_jax.backbones import modules as backbones
from coseg_jax.backbones import weights
from coseg_jax.core import config
from coseg_jax.core import fileio
from coseg_jax.core import train
from coseg_jax.instance import model as deepco3
from coseg_jax.multiclass import attention
from coseg_jax.multiclass import generator
from coseg_jax.multiclass import pipeline as multiclass

_SIZES = flags.DEFINE_list('sizes', ['384', '128'], 'Square input sizes of the train / '
                           'inference / attention rows.')
_BATCH = flags.DEFINE_integer('batch', 3, 'Mini-batch size (the thesis: 3).')
_CLASSES = flags.DEFINE_integer('classes', 3, 'K foreground classes.')
_ENCODER = flags.DEFINE_enum('encoder', 'vgg16', ['vgg16', 'efficientnet_lite0'],
                             'Generator encoder (the thesis: vgg16).')
_EXTRACTOR = flags.DEFINE_enum('extractor', 'resnet50', ['resnet50', 'efficientnet_lite0'],
                               'Frozen extractor (the thesis: resnet50).')
_COPEAK_MAPS = flags.DEFINE_list('copeak_maps', ['14', '28'], 'Feature map sides for the '
                                 'co-peak rows (448 input at stride 32 / 16).')
_COPEAK_CHANNELS = flags.DEFINE_integer('copeak_channels', 512, 'Feature channels there.')
_COPEAK_PAIRS = flags.DEFINE_integer('copeak_pairs', 3, 'Image pairs (DeepCO3: batch 6).')
_ROWS = flags.DEFINE_list('rows', ['train', 'infer', 'attention', 'convgrad', 'copeak'],
                          'Which rows.')
_LAX_CONV_GRADS = flags.DEFINE_bool('lax_conv_grads', False, 'convgrad rows differentiate '
                                    'lax.conv_general_dilated (XLA\'s own gradients) instead '
                                    'of cpu_kernels.conv_general_dilated.')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Timed runs per framework and row, at least; '
                                 'short rows repeat until --min_seconds.')
_BLOCK = flags.DEFINE_integer('block', 2, 'Timed runs per framework in a row, after one untimed.')
_MIN_SECONDS = flags.DEFINE_float('min_seconds', 3.0, 'Least time a row is timed for, both '
                                  'frameworks together: a median of 5 millisecond runs is noise.')
_PEAK = flags.DEFINE_float('peak_gflops', None, 'Machine peak FP32 GFLOP/s; default: '
                           'estimated from the CPU (see machine_info).')
_OUT = flags.DEFINE_string('out', None, 'Write the results as JSON here.')
_MD = flags.DEFINE_string('md', None, 'Write the markdown table here (always printed).')

MIB = 2.0**20


def _rss():
  with open('/proc/self/statm') as f:
    return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')


def _release_heap():
  gc.collect()
  try:
    ctypes.CDLL('libc.so.6').malloc_trim(0)
  except (OSError, AttributeError):  # not glibc
    pass


class PeakRSS:
  """Peak growth of the resident set size inside the `with` block (1 ms sampling)."""

  def __enter__(self):
    _release_heap()
    self.start = self.peak = _rss()
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._sample, daemon=True)
    self._thread.start()
    return self

  def _sample(self):
    while not self._stop.wait(0.001):
      self.peak = max(self.peak, _rss())

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()
    self.peak = max(self.peak, _rss())
    self.mib = (self.peak - self.start) / MIB


def machine_info():
  """CPU model, logical CPUs, clock, and a peak FP32 estimate: cores x clock x FLOP/cycle.

  FLOP/cycle per core assumes two FMA pipes of the widest vector ISA the flags list
  (AVX-512: 2 x 16 lanes x 2 = 64; AVX2+FMA: 32; else SSE: 8), as on current server
  x86 cores; the clock is the highest 'cpu MHz' in /proc/cpuinfo (the base clock in
  most VMs, which do not expose boost clocks).
  """
  info = {'platform': platform.platform(), 'python': platform.python_version(),
          'logical_cpus': len(os.sched_getaffinity(0))}
  model, flags_, mhz = 'unknown', set(), 0.0
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        key, _, value = line.partition(':')
        key = key.strip()
        if key == 'model name':
          model = value.strip()
        elif key == 'flags':
          flags_ = set(value.split())
        elif key == 'cpu MHz':
          mhz = max(mhz, float(value))
  except OSError:
    pass
  per_cycle = 64 if 'avx512f' in flags_ else 32 if {'avx2', 'fma'} <= flags_ else 8
  info.update(cpu=model, mhz=mhz, flops_per_cycle_per_core=per_cycle,
              peak_gflops_estimate=info['logical_cpus'] * mhz / 1e3 * per_cycle)
  return info


def matmul_gflops(n=2048, repeats=5):
  """Best FP32 n x n matmul rate of each framework: a practical peak next to the estimate."""
  a = np.random.default_rng(0).random((n, n), np.float32)
  a_j, a_t = jnp.asarray(a), torch.from_numpy(a)
  mm = jax.jit(jnp.matmul)
  rates = {}
  for fw, call in (('jax', lambda: jax.block_until_ready(mm(a_j, a_j))),
                   ('torch', lambda: torch.mm(a_t, a_t))):
    call()
    best = min(_timed(call) for _ in range(repeats))
    rates[fw] = 2 * n**3 / best / 1e9
  return rates


def _timed(call):
  t0 = time.perf_counter()
  call()
  return time.perf_counter() - t0


def _median_ms(times):
  return 1e3 * statistics.median(times)


def _flops(traced):
  """XLA's FLOP count of a traced function lowered with `lax.platform_dependent`'s non-CPU
  branches.

  The CPU branch of the convolutions' kernel gradient is a loop over bands, whose body
  the cost analysis counts once; the other branch is XLA's convolution, the same FLOPs.
  """
  lowered = traced.lower(lowering_platforms=('tpu',))
  return float(lowered.cost_analysis().get('flops', 0.0))


class Bench:
  """Runs JAX/PyTorch pairs of callables and collects result rows."""

  def __init__(self, peak_gflops, repeats, block, min_seconds):
    self.peak = peak_gflops
    self.repeats = repeats
    self.block = block
    self.min_seconds = min_seconds
    self.gpu = jax.default_backend() == 'gpu'
    self.rows = []

  def _memory(self, call, on_gpu):
    if on_gpu:  # the device allocator's peak since start (JAX has no reset)
      call()
      return jax.devices()[0].memory_stats()['peak_bytes_in_use'] / MIB
    with PeakRSS() as rss:
      call()
    return rss.mib

  def run(self, name, shape, jitted, args, jax_fn, torch_fn, per=1):
    """Compiles `jitted` for `args` (FLOP count, XLA's memory plan); `jax_fn(compiled)` and
    `torch_fn()` run one step each (they may carry state). Times are divided by `per`."""
    t0 = time.perf_counter()
    traced = jitted.trace(*args)
    compiled = traced.lower().compile()
    compile_s = time.perf_counter() - t0
    flops = _flops(traced)
    mem = compiled.memory_analysis()  # buffers a call allocates beyond its arguments
    plan_mib = (mem.temp_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes) / MIB
    jax_call = lambda: jax.block_until_ready(jax_fn(compiled))
    jax_mib = self._memory(jax_call, self.gpu)  # also the warm-up runs
    torch_mib = self._memory(torch_fn, False)
    times = {'jax': [], 'torch': [], 'jax_cpu': [], 'torch_cpu': []}
    start = time.perf_counter()
    while (len(times['jax']) < self.repeats
           or (time.perf_counter() - start < self.min_seconds and len(times['jax']) < 1000)):
      # Blocks of runs, alternating frameworks: both see the same drift in machine load, and
      # each is timed in its steady state, as in a training loop. The first run after a
      # switch is not timed: right after PyTorch, JAX's 384 Lite0 step took 3.0-3.4 s
      # instead of 2.2-2.5 (the allocator's state), which measures the mix, not JAX.
      for fw, call in (('jax', jax_call), ('torch', torch_fn)):
        call()
        for _ in range(self.block):
          t0, c0 = time.perf_counter(), time.process_time()
          call()
          times[fw].append(time.perf_counter() - t0)
          times[f'{fw}_cpu'].append(time.process_time() - c0)
    ms = {k: _median_ms(v) / per for k, v in times.items()}
    jax_ms, torch_ms = ms['jax'], ms['torch']
    row = {'name': name, 'shape': shape, 'jax_ms': jax_ms, 'torch_ms': torch_ms,
           'ratio': jax_ms / torch_ms, 'jax_cpu_ms': ms['jax_cpu'], 'torch_cpu_ms': ms['torch_cpu'],
           'cpu_ratio': ms['jax_cpu'] / ms['torch_cpu'],
           'times_ms': {k: [1e3 * t for t in v] for k, v in times.items()}, 'compile_s': compile_s,
           'gflop': flops / per / 1e9, 'jax_mib': jax_mib, 'xla_plan_mib': plan_mib,
           'torch_mib': torch_mib}
    for fw in ('jax', 'torch'):
      row[f'{fw}_gflops'] = row['gflop'] / (row[f'{fw}_ms'] / 1e3)
      row[f'{fw}_peak_pct'] = 100 * row[f'{fw}_gflops'] / self.peak if self.peak else None
    self.rows.append(row)
    print(f'{name} [{shape}]: JAX {jax_ms:.1f} ms, PyTorch {torch_ms:.1f} ms, '
          f'ratio {row["ratio"]:.2f} (CPU time {row["cpu_ratio"]:.2f}), {row["gflop"]:.2f} GFLOP',
          flush=True)


def _random_variables(module, input_shape, seed):
  """He-normal kernels, zero biases, identity BatchNorms, in `module.init`'s tree
  (through eval_shape, so no initialiser is compiled)."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.zeros(input_shape))
  out = {}
  for path, leaf in traverse_util.flatten_dict(shapes).items():
    if path[-1] == 'kernel':
      value = rng.normal(0, np.sqrt(2.0 / np.prod(leaf.shape[:-1])), leaf.shape)
    elif path[-1] in ('scale', 'var'):
      value = np.ones(leaf.shape)
    else:
      value = np.zeros(leaf.shape)
    out[path] = jnp.asarray(value, jnp.float32)
  return traverse_util.unflatten_dict(out)


def multiclass_rows(bench, size):
  batch, k = _BATCH.value, _CLASSES.value
  cfg = config.multiclass()
  cfg.num_classes = k
  shape = f'{batch}x{size}x{size}, K={k}, {_ENCODER.value}+{_EXTRACTOR.value}'

  def backbone(name, seed):
    module = backbones.make(name)
    variables = _random_variables(module, (1, 64, 64, 3), seed)
    preprocessing = 'caffe' if name == 'vgg16' else 'imagenet'
    return weights.Backbone(name, module, preprocessing, 'random'), variables

  encoder, encoder_vars = backbone(_ENCODER.value, 1)
  extractor, extractor_vars = backbone(_EXTRACTOR.value, 2)
  gen = multiclass.build_generator(cfg, encoder, extractor, cfg.num_classes)
  params = _random_variables(gen, (batch, 64, 64, 3), 3)['params']
  params['encoder'] = encoder_vars['params']
  x = np.random.default_rng(4).random((batch, size, size, 3), np.float32)
  data = {'image': jnp.asarray(x)}
  x_t = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
  gen_t = torch_ref.generator_from_flax(gen.spec, _ENCODER.value, params)
  extractor_t = torch_ref.backbone_from_flax(_EXTRACTOR.value, extractor_vars)
  tap = multiclass.EXTRACTOR_TAPS[_EXTRACTOR.value]

  if 'train' in _ROWS.value:
    tc = train.TrainConfig(epochs=1, batch_size=batch, learning_rate=1e-5, weight_decay=5e-4)
    optimizer = train.make_optimizer(tc)
    loss_fn = functools.partial(multiclass.loss_fn, gen, extractor, cfg.loss)
    step = train.jit_step(loss_fn, optimizer, train.data_mesh(batch))
    # Off CPU the step donates its state: give it its own copy of the parameters.
    own = jax.tree.map(jnp.copy, params)
    holder = {'state': {'params': own, 'opt_state': optimizer.init(own),
                        'step': jnp.zeros((), jnp.int32)}}

    def jax_step(compiled):
      holder['state'], loss, _ = compiled(holder['state'], extractor_vars, data, 1.0)
      return loss

    adam = torch_ref.make_adam(gen_t.parameters(), tc)

    def torch_step():
      adam.zero_grad(set_to_none=True)
      loss, _ = torch_ref.multiclass_loss(gen_t, extractor_t, tap, extractor.preprocessing, x_t,
                                          cfg.loss)
      loss.backward()
      adam.step()
      return loss

    bench.run('train step', shape, step, (holder['state'], extractor_vars, data, 1.0), jax_step,
              torch_step)

  if 'infer' in _ROWS.value:
    apply = jax.jit(lambda p, x: gen.apply({'params': p}, x))

    def torch_infer():
      with torch.inference_mode():
        return gen_t(x_t)

    bench.run('inference per image', shape, apply, (params, data['image']),
              lambda f: f(params, data['image']), torch_infer, per=batch)


def attention_rows(bench, size):
  """Mutual attention alone, on the generator's attention map at this input size."""
  model_cfg = config.multiclass().model
  stride, channels = backbones.tap_info(_ENCODER.value)[generator.ENCODER_TAPS[_ENCODER.value]]
  side = -(-size // stride)
  m, d, b = side * side, max(channels // model_cfg.attention_reduction, 1), _BATCH.value
  scale = float(m) ** -model_cfg.mutual_scale_power
  rng = np.random.default_rng(5)
  qkv = [rng.normal(size=(b, m, d)).astype(np.float32) / d**0.25 for _ in range(3)]
  cot = rng.normal(size=(b, m, 2 * d)).astype(np.float32)
  qkv_j, cot_j = [jnp.asarray(a) for a in qkv], jnp.asarray(cot)
  qkv_t = [torch.from_numpy(a) for a in qkv]
  cot_t = torch.from_numpy(cot)
  shape = f'B={b}, M={side}x{side}, D={d}'

  fwd = jax.jit(functools.partial(attention.mutual_attention, scale=scale))

  def torch_fwd():
    with torch.inference_mode():
      return torch_ref.mutual_attention(*qkv_t, scale)

  bench.run('mutual attention fwd', shape, fwd, qkv_j, lambda f: f(*qkv_j), torch_fwd)

  def objective(q, k, v, cot):
    return jnp.sum(attention.mutual_attention(q, k, v, scale) * cot)

  grad = jax.jit(jax.grad(objective, argnums=(0, 1, 2)))
  leaves_t = [a.clone().requires_grad_() for a in qkv_t]

  def torch_grad():
    for a in leaves_t:
      a.grad = None
    (torch_ref.mutual_attention(*leaves_t, scale) * cot_t).sum().backward()
    return [a.grad for a in leaves_t]

  bench.run('mutual attention fwd+bwd', shape, grad, (*qkv_j, cot_j),
            lambda f: f(*qkv_j, cot_j), torch_grad)


def _convgrad_layers():
  """(input downsampling, input channels, output channels, kernel, stride) of VGG16's convs
  and of ResNet-50's strided k x k convs (torchvision: the stem and each layer's first 3x3)."""
  vgg, cin = [], 3
  for s, widths in enumerate(backbones._VGG16_STAGES):
    for width in widths:
      vgg.append((2**s, cin, width, 3, 1))
      cin = width
  resnet = [(1, 3, 64, 7, 2)] + [(2**i, width, width, 3, 2)
                                 for i, (width, _) in enumerate(backbones._RESNET50_LAYERS[1:], 2)]
  return vgg, resnet


def convgrad_rows(bench, size):
  """The convolution gradients the training step spends most on, layer by layer, summed:
  VGG16's kernel gradients (the generator's encoder) and the input gradients of ResNet-50's
  strided k x k convs (the extractor, B(K+1) masked images)."""
  conv_fn = jax.lax.conv_general_dilated if _LAX_CONV_GRADS.value else cpu_kernels.conv_general_dilated
  rng = np.random.default_rng(7)
  vgg, resnet = _convgrad_layers()
  for name, convs, images, wrt in (('VGG16 kernel gradients', vgg, _BATCH.value, 'kernel'),
                                   ('ResNet-50 strided input gradients', resnet,
                                    _BATCH.value * (_CLASSES.value + 1), 'input')):
    layers = []
    for down, cin, cout, k, s in convs:
      side = size // down
      x = rng.normal(size=(images, side, side, cin)).astype(np.float32)
      w = (rng.normal(size=(k, k, cin, cout)) / np.sqrt(k * k * cin)).astype(np.float32)
      out = -(-side // s)
      g = rng.normal(size=(images, out, out, cout)).astype(np.float32)
      layers.append((x, w, g, s, (k - 1) // 2))
    args = [tuple(jnp.asarray(a) for a in layer[:3]) for layer in layers]
    static = [layer[3:] for layer in layers]

    @jax.jit
    def grads(args):
      out = []
      for (x, w, g), (s, p) in zip(args, static):
        conv = lambda x, w: conv_fn(x, w, (s, s), ((p, p), (p, p)),
                                    dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
        _, vjp = jax.vjp((lambda w: conv(x, w)) if wrt == 'kernel' else (lambda x: conv(x, w)),
                         w if wrt == 'kernel' else x)
        out.append(vjp(g)[0])
      return out

    layers_t = [tuple(torch.from_numpy(np.ascontiguousarray(a.transpose(perm)))
                      for a, perm in zip(layer[:3], ((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))))
                + layer[3:] for layer in layers]
    mask = [wrt == 'input', wrt == 'kernel', False]

    def torch_grads():
      return [torch.ops.aten.convolution_backward(g, x, w, None, [s, s], [p, p], [1, 1], False,
                                                  [0, 0], 1, mask)
              for x, w, g, s, p in layers_t]

    bench.run(name, f'{images}x{size}x{size}, {len(convs)} convs', grads, (args,),
              lambda f: f(args), torch_grads)


def copeak_rows(bench, side):
  """4D correlation + co-peak maxima of `pairs` pairs of side x side feature maps."""
  p, c = _COPEAK_PAIRS.value, _COPEAK_CHANNELS.value
  rng = np.random.default_rng(6)
  feat = np.maximum(rng.normal(size=(2, p, side, side, c)), 0).astype(np.float32)
  feat /= np.sqrt((feat**2).sum(-1, keepdims=True) + 1e-2)
  sal = rng.random((2, p, side, side), np.float32)
  args = (jnp.asarray(feat[0]), jnp.asarray(feat[1]), jnp.asarray(sal[0]), jnp.asarray(sal[1]))
  feat_t = torch.from_numpy(np.ascontiguousarray(feat.transpose(0, 1, 4, 2, 3)))
  sal_t = torch.from_numpy(sal)

  @jax.jit
  def copeaks(fn, fm, sn, sm):
    return jax.vmap(deepco3.copeak_mask)(jax.vmap(deepco3.correlation)(fn, fm, sn, sm))

  def torch_copeaks():
    with torch.inference_mode():
      t = torch_ref.correlation(feat_t[0], feat_t[1], sal_t[0], sal_t[1])
      return torch_ref.local_maxima(t, batch_dims=1)

  bench.run('correlation + co-peaks', f'{p} pairs, {side}x{side}x{c} (448 input)', copeaks, args,
            lambda f: f(*args), torch_copeaks)


def markdown(result):
  m = result['machine']
  lines = [
      f"Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs at {m['mhz']:.0f} MHz; peak "
      f"{result['peak_gflops']:.0f} GFLOP/s FP32 ({m['logical_cpus']} x {m['mhz'] / 1e3:.2f} GHz "
      f"x {m['flops_per_cycle_per_core']} FLOP/cycle). JAX {result['versions']['jax']}, "
      f"PyTorch {result['versions']['torch']} ({result['versions']['torch_threads']} threads), "
      f"XLA_FLAGS={result['xla_flags']!r}, OMP_WAIT_POLICY={result['omp_wait_policy']!r}. "
      f"Measured 2048^2 matmul: JAX "
      f"{m['matmul_gflops']['jax']:.0f}, PyTorch {m['matmul_gflops']['torch']:.0f} GFLOP/s.",
      f"Load average before / after: {result['load_before']} / {result['load_after']}.",
      '',
      '| benchmark | shape | JAX ms | PyTorch ms | JAX/PyTorch | CPU-time ratio | GFLOP '
      '| JAX GFLOP/s (% peak) | PyTorch GFLOP/s (% peak) | JAX MiB (RSS / XLA plan) '
      '| PyTorch MiB (RSS) |',
      '|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|']
  for r in result['rows']:
    pct = lambda fw: f" ({r[f'{fw}_peak_pct']:.0f}%)" if r[f'{fw}_peak_pct'] is not None else ''
    lines.append(
        f"| {r['name']} | {r['shape']} | {r['jax_ms']:.1f} | {r['torch_ms']:.1f} | "
        f"{r['ratio']:.2f} | {r['cpu_ratio']:.2f} | {r['gflop']:.2f} | "
        f"{r['jax_gflops']:.1f}{pct('jax')} | {r['torch_gflops']:.1f}{pct('torch')} | "
        f"{r['jax_mib']:.0f} / {r['xla_plan_mib']:.0f} | {r['torch_mib']:.0f} |")
  return '\n'.join(lines) + '\n'


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  machine = machine_info()
  machine['matmul_gflops'] = matmul_gflops()
  peak = _PEAK.value or machine['peak_gflops_estimate']
  load_before = [round(x, 2) for x in os.getloadavg()]
  if load_before[0] > os.cpu_count():
    print(f'warning: load average {load_before[0]} exceeds the {os.cpu_count()} CPUs; '
          'timings are unreliable', file=sys.stderr)
  bench = Bench(peak, _REPEATS.value, _BLOCK.value, _MIN_SECONDS.value)
  for size in map(int, _SIZES.value):
    if {'train', 'infer'} & set(_ROWS.value):
      multiclass_rows(bench, size)
    if 'attention' in _ROWS.value:
      attention_rows(bench, size)
    if 'convgrad' in _ROWS.value:
      convgrad_rows(bench, size)
  if 'copeak' in _ROWS.value:
    for side in map(int, _COPEAK_MAPS.value):
      copeak_rows(bench, side)
  result = {
      'command': ' '.join(['python'] + sys.argv), 'machine': machine, 'peak_gflops': peak,
      'versions': {'jax': jax.__version__, 'torch': torch.__version__,
                   'torch_threads': torch.get_num_threads(), 'backend': jax.default_backend()},
      'xla_flags': os.environ.get('XLA_FLAGS', ''),
      'omp_wait_policy': os.environ.get('OMP_WAIT_POLICY', ''), 'load_before': load_before,
      'load_after': [round(x, 2) for x in os.getloadavg()], 'rows': bench.rows}
  table = markdown(result)
  print(table)
  if _OUT.value:
    fileio.atomic_write_json(_OUT.value, result)
  if _MD.value:
    fileio.atomic_write_text(_MD.value, table)


if __name__ == '__main__':
  app.run(main)
