"""How often the K estimate (multiclass/num_classes.py) finds the true K.

  python bin/k_criteria.py [--size=384] [--max_classes=5] [--demo_seeds=0,1,2,3,4] GROUP_DIR ...

For each group (folders with images/ and classes.txt, whose class count is the true K;
and the built-in demo groups for K = 2 and 3 at the given seeds) it runs the pipeline's
own estimate (`pipeline.estimate_num_classes`, the default config with data.image_size
--size; the estimate runs at min(--size, pipeline.ESTIMATE_SIZE)) and prints
the criterion per K and the pick. BUILD.md ("Estimating K") has the numbers; the earlier
criteria it lists (silhouette, presence) are in this file at commit 1b889c9.
"""
import argparse

from coseg_jax.backbones import weights
from coseg_jax.core import config as defaults
from coseg_jax.core import data
from coseg_jax.core import demo
from coseg_jax.multiclass import pipeline


def main():
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('groups', nargs='*')
  ap.add_argument('--size', type=int, default=384)
  ap.add_argument('--max_classes', type=int, default=5)
  ap.add_argument('--demo_seeds', default='0,1,2,3,4')
  args = ap.parse_args()
  config = defaults.multiclass()
  config.data.image_size, config.max_classes = args.size, args.max_classes
  extractor, extractor_vars = weights.load_backbone(
      weights.resolve_name(config.model.extractor, 'extractor', config.weights), config.weights)
  extractor = pipeline.lite0_input(config, extractor)
  background = pipeline.Background.build(config, extractor, extractor_vars)
  groups = [data.load_group(path) for path in args.groups]
  for k in (2, 3):
    for seed in [int(s) for s in args.demo_seeds.split(',') if s]:
      samples = [data.Sample(name, '', image)
                 for name, image, _ in demo.render_multiclass(k, seed=seed)]
      groups.append(data.Group(f'demo K={k} seed {seed}', '', samples, ('?',) * k))
  hits = 0
  for group in groups:
    k, loss = pipeline.estimate_num_classes(config, group, extractor, extractor_vars, background)
    k_true = len(group.class_names)
    hits += k == k_true
    print(f'{group.name:26s} K={k_true} estimate {k}   loss per K: '
          + ' '.join(f'{kk}: {v:.4f}' for kk, v in loss.items()), flush=True)
  print(f'true K found in {hits} of {len(groups)} groups')


if __name__ == '__main__':
  main()
