"""Packaging for rfsq-kernels.

The pure-PyTorch ground truth lives in the top-level ``reference/`` folder and is
installed as the subpackage ``rfsq_kernels.reference`` (no generic top-level
``reference`` module is installed).
"""
from setuptools import setup

setup(
    name="rfsq-kernels",
    version="0.1.0",
    description="Fused Triton kernels for Robust Residual Finite Scalar Quantization (RFSQ)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=["rfsq_kernels", "rfsq_kernels.kernels", "rfsq_kernels.kernels.vq", "rfsq_kernels.gpucheck",
              "rfsq_kernels.reference", "rfsq_kernels.reference.strategies", "rfsq_kernels.vqpytorch"],
    package_dir={"rfsq_kernels.reference": "reference"},
    install_requires=["torch>=2.4", "numpy"],
    extras_require={
        # triton ships with CUDA builds of torch on Linux; named here for other installs.
        "triton": ["triton>=3.0"],
        "train": ["torchvision", "lpips>=0.1.4", "tqdm", "matplotlib", "scikit-image", "safetensors", "constriction>=0.4", "scipy"],
        "test": ["pytest>=7", "pytest-benchmark>=4", "vector-quantize-pytorch>=1.26.0,<=1.32.0"],
        "bench": ["pytest-benchmark>=4", "matplotlib", "vector-quantize-pytorch"],
    },
    license="MIT",
)
