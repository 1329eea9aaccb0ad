"""rfsq-kernels: fused Triton kernels for Robust Residual Finite Scalar Quantization.

``from rfsq_kernels import RFSQ`` gives a drop-in ``nn.Module``; ``rfsq_kernels.reference`` holds
the pure-PyTorch ground truth (also of the FSQ, LFQ and VQ-EMA baselines); ``from_official``
loads a model trained with the paper's official code.
"""
from .modules import FSQ, RFSQ
from .official import from_official
from .reference import LFQ, VQEMA

__all__ = ["RFSQ", "FSQ", "LFQ", "VQEMA", "from_official"]
__version__ = "0.1.0"
