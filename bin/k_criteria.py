"""Training-free criteria for the number of classes K of a group, per K = 1..Kmax.

  python bin/k_criteria.py [--size=384] [--kmax=5] [--demo_seeds=0,1,2,3,4] GROUP_DIR ...

For each group (folders with images/ and classes.txt, whose line count is the true K;
and the built-in demo groups for K = 2 and 3 at the given seeds) it clusters the frozen
EfficientNet-Lite0 head features (the extractor f, data.image_size input) into K+1
k-means clusters, as the clustering baseline and the classifier initialisation do, and
prints per K: the cosine silhouette (2000 sampled pixels), the mean squared distance to
the centroids, and the cross-image presence (the smallest fraction of images in which a
cluster takes >= 3% of the pixels), with the K each rule picks. BUILD.md ("Estimating K:
measured, not shipped") has the numbers.
"""
import argparse

import jax
import numpy as np

from coseg_jax.backbones import weights
from coseg_jax.core import config as defaults
from coseg_jax.core import data
from coseg_jax.core import demo
from coseg_jax.multiclass import baseline


def _unit(x):
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def silhouette(x, labels, rng, n=2000):
  idx = rng.choice(len(x), min(n, len(x)), replace=False)
  xs, ls = x[idx], labels[idx]
  d = 1 - xs @ xs.T
  present = np.unique(ls)
  if len(present) < 2:
    return 0.0
  means = np.stack([d[:, ls == l].mean(1) for l in present], 1)  # n x L
  own = np.searchsorted(present, ls)
  counts = np.array([(ls == l).sum() for l in present])
  a = means[np.arange(len(xs)), own] * counts[own] / np.maximum(counts[own] - 1, 1)
  means[np.arange(len(xs)), own] = np.inf
  b = means.min(1)
  return float(np.mean((b - a) / np.maximum(np.maximum(a, b), 1e-12)))


def criteria(feats, kmax, seed=0):
  x = _unit(np.concatenate([f.reshape(-1, f.shape[-1]) for f in feats]))
  rng = np.random.default_rng(seed)
  out = {}
  for k in range(1, kmax + 1):
    centers, labels = baseline.kmeans_group(feats, k + 1, seed)
    flat = np.concatenate([l.ravel() for l in labels])
    presence = np.array([[np.mean(l == c) >= 0.03 for l in labels] for c in range(k + 1)])
    out[k] = {'silhouette': silhouette(x, flat, rng),
              'inertia': float(((x - centers[flat]) ** 2).sum(1).mean()),
              'presence': float(presence.mean(1).min())}
  return out


def main():
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('groups', nargs='*')
  ap.add_argument('--size', type=int, default=384)
  ap.add_argument('--kmax', type=int, default=5)
  ap.add_argument('--demo_seeds', default='0,1,2,3,4')
  args = ap.parse_args()
  backbone, variables = weights.load_backbone('efficientnet_lite0', defaults.multiclass().weights)
  head = jax.jit(lambda x: backbone.apply(variables, x, taps=('head',))['head'])
  groups = []
  for path in args.groups:
    g = data.load_group(path)
    groups.append((g.name, len(g.class_names), [s.image for s in g.samples]))
  for k in (2, 3):
    for seed in [int(s) for s in args.demo_seeds.split(',') if s]:
      groups.append((f'demo K={k} seed {seed}', k, [im for _, im, _ in demo.render_multiclass(k, seed=seed)]))
  hits = {'silhouette': 0, 'presence>=0.75': 0, 'presence>=0.5': 0}
  for name, k_true, images in groups:
    feats = [np.asarray(head(x[None]))[0] for x in data.resize_batch(images, args.size)]
    c = criteria(feats, args.kmax)
    picks = {'silhouette': max(c, key=lambda k: c[k]['silhouette']),
             'presence>=0.75': max([k for k in c if c[k]['presence'] >= 0.75], default=1),
             'presence>=0.5': max([k for k in c if c[k]['presence'] >= 0.5], default=1)}
    for rule, k in picks.items():
      hits[rule] += k == k_true
    print(f'{name:24s} K={k_true} picks ' + ' '.join(f'{r}:{k}' for r, k in picks.items()))
    print('   ' + '  '.join(f'K{k}: sil {v["silhouette"]:.3f} inertia {v["inertia"]:.3f} '
                           f'presence {v["presence"]:.2f}' for k, v in c.items()), flush=True)
  print(f'true K found, of {len(groups)} groups: ' + ', '.join(f'{r} {n}' for r, n in hits.items()))


if __name__ == '__main__':
  main()
