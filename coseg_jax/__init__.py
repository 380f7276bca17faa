"""coseg_jax: unsupervised multi-class and instance co-segmentation in JAX/Flax.

  import coseg_jax
  result = coseg_jax.cosegment(images, num_classes=2)   # multi-class (coseg_jax.api)
  found = coseg_jax.instances(images)                   # DeepCO3

The API module (and with it jax) loads on first use of these names, so `import
coseg_jax` stays light (bin/run.py reports flag errors before jax loads).
"""

_API = ('cosegment', 'instances', 'Cosegmentation')


def __getattr__(name):
  if name in _API:
    from coseg_jax import api
    return getattr(api, name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def __dir__():
  return sorted(list(globals()) + list(_API))
