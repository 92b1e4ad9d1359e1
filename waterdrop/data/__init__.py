"""Datasets, transforms, the multi-task batch sampler and the built-in demo data."""
