"""bin/bench.py end to end at tiny sizes: rows, timings and the FLOP count it reports."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip('torch')

BENCH_PY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'bin',
                        'bench.py')
SIZE, BATCH, CLASSES = 32, 2, 1


def _vgg16_kernel_gradient_flops():
  # A kernel gradient costs what its forward costs: 2 * cin * cout per (output position,
  # tap) pair that reads inside the image. 3x3, padding 1, n x n: (3n - 2)^2 such pairs.
  convs = [(1, 3, 64), (1, 64, 64), (2, 64, 128), (2, 128, 128), (4, 128, 256), (4, 256, 256),
           (4, 256, 256), (8, 256, 512), (8, 512, 512), (8, 512, 512), (16, 512, 512),
           (16, 512, 512), (16, 512, 512)]
  return sum(2 * BATCH * (3 * (SIZE // down) - 2) ** 2 * cin * cout for down, cin, cout in convs)


@pytest.mark.slow
def test_bench_rows(tmp_path):
  out = tmp_path / 'bench.json'
  proc = subprocess.run(
      [sys.executable, BENCH_PY, f'--sizes={SIZE}', f'--batch={BATCH}', f'--classes={CLASSES}',
       '--rows=attention,convgrad,copeak', '--copeak_maps=4', '--copeak_channels=8',
       '--repeats=2', '--block=1', '--min_seconds=0', f'--out={out}', f'--md={tmp_path / "b.md"}'],
      capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  rows = {row['name']: row for row in json.loads(out.read_text())['rows']}
  assert set(rows) == {'mutual attention fwd', 'mutual attention fwd+bwd', 'VGG16 kernel gradients',
                       'ResNet-50 strided input gradients', 'correlation + co-peaks'}
  for row in rows.values():
    assert len(row['times_ms']['jax']) == len(row['times_ms']['torch']) == 2
    assert row['jax_ms'] > 0 and row['torch_ms'] > 0
    assert row['ratio'] == pytest.approx(row['jax_ms'] / row['torch_ms'])
  # The CPU kernel gradient is a loop; counted on the CPU lowering, its body would count once.
  assert rows['VGG16 kernel gradients']['gflop'] * 1e9 == pytest.approx(
      _vgg16_kernel_gradient_flops(), rel=1e-6)
  assert '| VGG16 kernel gradients |' in (tmp_path / 'b.md').read_text()
