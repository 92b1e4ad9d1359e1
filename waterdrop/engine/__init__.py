"""Training on mmengine: model wrapper, metric, hooks, runner assembly, checkpoints."""
