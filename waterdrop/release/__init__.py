"""Releasing a model version: a candidate compared with the model in production task by task,
the gate, and the versioned model repository."""
