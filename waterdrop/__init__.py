"""waterdrop: many image-quality and moderation tasks on one shared model, shipped as one ONNX file.

Importing this package loads no torch: ``waterdrop.runtime`` serves exported models with
onnxruntime, numpy and OpenCV alone. Training code lives in the sub-packages.

Importing it does tune glibc's malloc for large tensors (``waterdrop.allocator``;
``WATERDROP_MALLOC=system`` keeps the defaults).
"""

from waterdrop import allocator

__version__ = "0.1.0"

allocator.configure()
