"""Exact, fused drop-ins for vector-quantize-pytorch's ``ResidualFSQ``, ``FSQ`` and
``GroupedResidualFSQ`` (the library's math of versions 1.26.0 - 1.32.0).

``from rfsq_kernels.vqpytorch import ResidualFSQ`` replaces
``from vector_quantize_pytorch import ResidualFSQ``: same arguments, ``state_dict`` and outputs
(``docs/migrating-from-vector-quantize-pytorch.md``), fused Triton kernels on CUDA. When the library is installed, its helpers (``Sequential``)
recognise these classes as quantizers (:mod:`.registry`).
"""
from .convert import from_vqpytorch
from .fsq import FSQ
from .registry import install as _install
from .residual_fsq import GroupedResidualFSQ, ResidualFSQ

# vector-quantize-pytorch's Sequential recognises its quantizers by isinstance: add ours.
_install((FSQ, ResidualFSQ, GroupedResidualFSQ))

#: Versions of vector-quantize-pytorch whose ResidualFSQ / FSQ math these modules reproduce.
MATCHES_VERSIONS = ">=1.26.0,<=1.32.0"

__all__ = ["FSQ", "GroupedResidualFSQ", "MATCHES_VERSIONS", "ResidualFSQ", "from_vqpytorch"]
