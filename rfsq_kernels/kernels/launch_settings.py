"""The one place a kernel is started: :func:`launch` derives every setting that is not a launch
site's own decision, so no site recomputes them (every family's launchers call it).

A site decides the grid, the arguments, the tile (:class:`.config.Tiles`, from the tile policy) and
its kernel's own constexprs (the strategy's stage functions, a split launch's ``PHASE``, ``K`` when unrolled).
:func:`launch` adds:

* ``BLOCK_C``, ``BLOCK_S``, ``num_warps`` and ``maxnreg`` from the tile;
* ``USE_INT64``: some element offset of the launch's tensors may reach 2**31
  (:func:`.layouts.needs_int64`);
* ``USE_LIBDEVICE``: Triton's real compiler builds the kernel (:func:`.config.use_libdevice`);
* ``enable_fp_fusion=False`` (:data:`.config.FP_FUSION`): each float32 operation rounds on its own,
  like the reference's PyTorch ops (docs/semantics.md, "Arithmetic contract").
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from . import config, layouts


def launch(kernel, grid: Tuple[int, ...], args: Sequence, *, tiles: config.Tiles,
           tensors: Sequence[Optional[torch.Tensor]], **constexprs) -> None:
    """Run ``kernel[grid](*args, **constexprs)`` with the derived settings above.

    ``tensors``: every tensor the kernel indexes with element offsets (None: absent), the input
    first (its device decides ``USE_LIBDEVICE``). A heuristic-derived flag (``HAS_MASK``,
    ``HAS_ACTIVE_STAGES``) is never passed: ``@triton.heuristics`` sets it from the pointers.
    """
    kernel[grid](*args, **constexprs, BLOCK_C=tiles.block_c, BLOCK_S=tiles.block_s,
                 USE_INT64=layouts.needs_int64(*tensors), USE_LIBDEVICE=config.use_libdevice(tensors[0]),
                 num_warps=tiles.num_warps, maxnreg=tiles.maxnreg, enable_fp_fusion=config.FP_FUSION)
