"""Shared core: config defaults, data loading, the trainer, file output, errors, reports, demo data."""
