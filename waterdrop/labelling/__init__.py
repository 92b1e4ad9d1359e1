"""Labelling tools' formats: the Label Studio round trip of a task (``label_studio``). Torch-free."""
