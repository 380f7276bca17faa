"""Frozen ImageNet backbones (Flax modules), their weight loaders and name maps, and CPU kernels."""
