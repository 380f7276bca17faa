"""coseg_jax: unsupervised multi-class and instance co-segmentation in JAX/Flax."""
