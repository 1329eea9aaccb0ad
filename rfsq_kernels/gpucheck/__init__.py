"""Compile the fused kernels for real NVIDIA targets on a machine without a GPU.

:mod:`.driver` installs a stand-in Triton driver, so the project's own launchers
(``rfsq_forward_launch`` / ``rfsq_backward_launch``) run on ``meta`` tensors: every kernel they
launch is compiled by Triton's real compiler for the chosen target, and the launch is recorded
instead of run. :mod:`.sweep` drives the launchers over the whole specialization grid,
:mod:`.binary` inspects what came out (registers, spills, PTX loads), and ``python -m
rfsq_kernels.gpucheck`` runs the check (used by ``tests/tools/test_gpu_compile.py``).

Import this package in a process where ``TRITON_INTERPRET`` is unset: under the interpreter,
``@triton.jit`` functions cannot be compiled.
"""
