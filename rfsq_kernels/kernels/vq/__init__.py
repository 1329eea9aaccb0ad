"""Kernels of vector-quantize-pytorch's quantizers (used by :mod:`rfsq_kernels.vqpytorch`), one file
per family: :mod:`.residual_fsq` (ResidualFSQ) and :mod:`.fsq` (the standalone FSQ); :mod:`.common`
holds what both share. They import only downward (``kernels``' helpers, ``reference``)."""
