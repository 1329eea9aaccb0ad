"""Host-side launch policy: tile sizes and paths, the switches, the per-level constant tables.

Every program works on all channels of an image by a run of flattened spatial positions: a 2-D
register tile ``[BLOCK_C, BLOCK_S]`` (``BLOCK_C = next_pow2(C)``; layernorm and the
vector-quantize-pytorch kernels) or ``C`` channel rows of ``BLOCK_S`` positions, every channel of a
position in one thread (the elementwise family). :func:`layernorm_tiles`, :func:`elementwise_tiles`
and :func:`elementwise_row_tiles` decide the tile, ``num_warps`` and the path; the launchers use nothing
else, and the offline compile check (:mod:`rfsq_kernels.gpucheck`) reaches every decision through
the launchers. Why these sizes (each found by that check, which fails on any register spill):
``docs/kernel-design.md``, "Why these tile sizes".

``MAX_BLOCK_ELEMS`` is the knob that tests lower to force the split layernorm path and several
tiles per image in the other families: it also caps the chunk, so ``MAX_BLOCK_ELEMS = 64`` gives
64-element chunks. Strides, output allocation and 64-bit offsets: :mod:`.layouts`.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch

from ..backend import interpreter_enabled
from ..reference.codebook import fsq_constants, index_basis, index_dtype

#: Largest padded image (``BLOCK_C * next_pow2(S)``) that the layernorm kernels keep in one tile.
MAX_BLOCK_ELEMS = 8192
#: Base tile (a chunk) of the split layernorm paths and tile of the vector-quantize-pytorch kernels (capped by
#: MAX_BLOCK_ELEMS).
CHUNK_ELEMS = 2048
#: Elements per thread of a full chunk (8 warps at 2048) and of the one-tile layernorm path.
CHUNK_ELEMS_PER_THREAD = 8
ONE_TILE_ELEMS_PER_THREAD = 4
#: Every launch (:func:`.launch_settings.launch`) passes ``enable_fp_fusion=FP_FUSION``: no multiply-add is contracted into an FMA,
#: so each float32 operation rounds on its own, like the reference's PyTorch ops
#: (docs/semantics.md, "Arithmetic contract"). A Triton compile option since 2.2, so a launch
#: keyword on triton 3.6-3.8; the interpreter ignores it (it never fuses).
FP_FUSION = False
ONE_TILE_WARPS = {"forward": (4, 16), "backward": (4, 32)}
#: Targets (compute capability >= this) whose ptxas spills the layernorm kernels at the sm_80/90
#: tiles (sm_100: 8-32 B at a single 8x1024 tile): they keep half of
#: MAX_BLOCK_ELEMS in one tile and use the sparse chunks (half the chunk, 4 elements per thread).
SMALL_ONE_TILE_ARCH = 100
#: Elements per thread of a full chunk when a mask or per-sample stage counts are passed.
SPARSE_ELEMS_PER_THREAD = 4

#: Every launcher's constant tables, built once per key (:func:`cached`).
_TABLES: Dict[Tuple, Tuple] = {}


@dataclass(frozen=True)
class Tiles:
    """One launch's tile: ``[block_c, block_s]`` per program, ``num_warps``, whether one
    tile covers the whole image (layernorm: the single-tile path; none/scale: one program per
    image) and the register cap (``maxnreg``, None: ptxas decides)."""

    block_c: int
    block_s: int
    num_warps: int
    one_tile: bool
    maxnreg: Optional[int] = None


def next_pow2(n: int) -> int:
    """Smallest power of two >= max(n, 1)."""
    return 1 << max(int(n) - 1, 0).bit_length()


def _warps(elems: int, per_thread: int, least: int, most: int) -> int:
    return min(max(elems // (32 * per_thread), least), most)


def _chunk_tiles(block_c: int, spatial: int, sparse: bool = False) -> Tiles:
    chunk, per_thread = min(CHUNK_ELEMS, MAX_BLOCK_ELEMS), CHUNK_ELEMS_PER_THREAD
    if sparse:
        chunk, per_thread = max(chunk // 2, 2), SPARSE_ELEMS_PER_THREAD
    block_s = max(min(next_pow2(spatial), chunk // block_c), 2)
    return Tiles(block_c, block_s, _warps(block_c * block_s, per_thread, 1, 8),
                 block_s >= spatial)


def layernorm_tiles(channels: int, spatial: int, direction: str = "forward",
                    int64: bool = False, sparse: bool = False, arch: Optional[int] = None) -> Tiles:
    """Tile of the layernorm ``direction`` (``forward``/``backward``) kernel for ``channels`` x
    ``spatial``; ``int64``: the launch uses 64-bit offsets; ``sparse``: a mask or per-sample
    stage counts are passed; ``arch``: the compute capability compiled for (None: interpreter).
    One tile up to ``MAX_BLOCK_ELEMS`` padded elements (half of it for a 64-bit-offset forward,
    for a sparse backward and on ``SMALL_ONE_TILE_ARCH`` and later); otherwise the chunk that the
    split kernels cut their own tiles from (``split_block_s`` of :mod:`.layernorm_split` and
    :mod:`.layernorm_split_backward`; register cap :data:`SPLIT_LAYERNORM_MAXNREG`; half chunks
    for the backward). The backward never keeps more than :data:`LAYERNORM_ROW_MAX_CHANNELS`
    channels in one tile (it runs in channel rows, :func:`layernorm_row_tiles`)."""
    block_c, block_s = next_pow2(channels), next_pow2(spatial)
    single_max = MAX_BLOCK_ELEMS // 2 if int64 and direction == "forward" else MAX_BLOCK_ELEMS
    if arch is not None and arch >= SMALL_ONE_TILE_ARCH:
        single_max = min(single_max, MAX_BLOCK_ELEMS // 2)
    sparse = sparse and direction == "backward"
    if sparse:
        single_max //= 2
    # The single-tile backward holds every channel in each thread (channel rows): above
    # LAYERNORM_ROW_MAX_CHANNELS it takes the split kernels, whatever the image's size.
    rows_fit = direction == "forward" or channels <= LAYERNORM_ROW_MAX_CHANNELS
    if block_c * block_s <= single_max and rows_fit:
        warps = _warps(block_c * block_s, ONE_TILE_ELEMS_PER_THREAD, *ONE_TILE_WARPS[direction])
        return Tiles(block_c, max(block_s, 2), warps, True)
    # The backward also holds its residual rebuild's digit columns: it takes the half chunk, like a
    # sparse one.
    half = sparse or direction == "backward"
    return replace(_chunk_tiles(block_c, spatial, half), one_tile=False,
                   maxnreg=SPLIT_LAYERNORM_MAXNREG)


#: Positions per thread of the single-tile layernorm backward in channel rows
#: (:func:`layernorm_row_tiles`), at most, and the elements (channels x positions) a thread holds
#: at most: 4 positions of C=5 at 8 warps ran 427 executed instructions per element at
#: 128x5x32x32, K=4 (sm_90 model), against 565 at 2 positions and 16 warps (each thread's share of
#: the per-channel reductions and scalar loads shrinks with its positions; bench/NOTES.md).
LAYERNORM_ROW_POSITIONS_PER_THREAD = 4
LAYERNORM_ROW_ELEMS_PER_THREAD = 20
#: Channels the single-tile layernorm backward holds per thread at most; wider images take the split
#: backward. At C=16 on a 3x5 image (16 elements per thread at 1 warp, 255 registers) ptxas spilled
#: 8 B on sm_80 with 64-bit offsets and 32 B on sm_100 (bench/NOTES.md); C <= 8 did not spill.
LAYERNORM_ROW_MAX_CHANNELS = 8


def layernorm_row_tiles(channels: int, spatial: int, tiles: Tiles) -> Tiles:
    """Tile of the single-tile layernorm backward (channel rows, ``layernorm._bwd_layernorm_kernel``)
    for an image that ``tiles`` (:func:`layernorm_tiles`) keeps in one tile: every channel
    (exact, ``block_c = C``) in every thread, the image's positions along the threads and warps --
    up to :data:`LAYERNORM_ROW_POSITIONS_PER_THREAD` per thread, fewer when ``C`` times that
    exceeds :data:`LAYERNORM_ROW_ELEMS_PER_THREAD` --, the warps of ``tiles`` at most."""
    per_thread = max(1, min(LAYERNORM_ROW_POSITIONS_PER_THREAD, LAYERNORM_ROW_ELEMS_PER_THREAD // max(channels, 1)))
    per_thread = 1 << (per_thread.bit_length() - 1)
    block_s = max(next_pow2(spatial), 2)
    warps = min(max(block_s // (32 * per_thread), 1), tiles.num_warps)
    # The register cap stated as the hardware's (65536 per SM over the program's threads, at most
    # 255): left to itself ptxas stopped a C=2 program of 8 warps at 64 registers and spilled.
    return Tiles(channels, block_s, warps, True, maxnreg=min(255, 65536 // (32 * warps)))


#: Register cap (Triton's ``maxnreg``) of the split layernorm launches (``Tiles.maxnreg``).
#: Without one, ptxas settles on 80 registers and spills around the calls of ``div.rn`` /
#: ``sqrt.rn``'s slow-path subroutine; with it they use ~96 and do not spill (bench/NOTES.md).
#: 8 warps could hold 255.
SPLIT_LAYERNORM_MAXNREG = 128


#: Programs the split path aims for over a whole launch: two per SM of a 132-SM H100.
SPLIT_MIN_PROGRAMS = 2 * 132
#: Tests force a number of programs per image (some slices then may be empty); None: the plan.
SPLIT_PROGRAMS_PER_IMAGE: Optional[int] = None


@dataclass(frozen=True)
class SplitPlan:
    """How the split layernorm path cuts an image: ``parts`` programs of ``slice_len`` positions
    (a multiple of the tile's ``block_s``; the last slices may be short or empty)."""

    parts: int
    slice_len: int


def layernorm_split_plan(batch: int, spatial: int, tiles: Tiles) -> SplitPlan:
    """Programs per image for the split path: the fewest that give the launch
    :data:`SPLIT_MIN_PROGRAMS` programs (fewer partials to merge), at most one per tile;
    :data:`SPLIT_PROGRAMS_PER_IMAGE` overrides (tests)."""
    tiles_per_image = -(-spatial // tiles.block_s)
    want = SPLIT_PROGRAMS_PER_IMAGE or min(tiles_per_image, -(-SPLIT_MIN_PROGRAMS // max(batch, 1)))
    if SPLIT_PROGRAMS_PER_IMAGE:
        return SplitPlan(want, max(-(-tiles_per_image // want), 1) * tiles.block_s)
    per_slice = max(tiles_per_image // want, 1)  # rounded down: at least ``want`` programs
    return SplitPlan(-(-tiles_per_image // per_slice), per_slice * tiles.block_s)


def elementwise_tiles(channels: int, spatial: int, sparse: bool = False) -> Tiles:
    """``[next_pow2(C), BLOCK_S]`` tile of the vector-quantize-pytorch kernels (``kernels/vq``) for
    ``channels`` x ``spatial``: at most ``CHUNK_ELEMS`` elements (half of it, at 4 per thread, when
    ``sparse``)."""
    return _chunk_tiles(next_pow2(channels), spatial, sparse)


#: Positions per thread of the channel-row elementwise kernels (:func:`elementwise_row_tiles`), at
#: most, and the elements (channels x positions) a thread holds at most, by direction: the
#: forward carries two rows per channel through its stage loop (residual and sum), the backward
#: one row at a time (sm_90, bench/NOTES.md "Channels inside a thread").
ROW_POSITIONS_PER_THREAD = 4
ROW_ELEMS_PER_THREAD = {"forward": 16, "backward": 32}
ROW_WARPS = 4
#: Register cap (``maxnreg``) of the channel-row forward: the hardware's 255, i.e. no lower cap.
#: Left to itself ptxas may stop at 128 registers for a forward whose channel constants and rows
#: need a few more, and spill; with the cap stated it allocates what the kernel needs (bench/NOTES.md).
ROW_FORWARD_MAXNREG = 255


def elementwise_row_tiles(channels: int, spatial: int, sparse: bool = False, direction: str = "forward") -> Tiles:
    """Tile of the channel-row none/scale kernels: every one of the ``channels`` (exact,
    ``block_c = C``) in every thread, ``block_s`` positions along the threads and warps -- up to
    :data:`ROW_POSITIONS_PER_THREAD` positions per thread, fewer when ``C`` times that exceeds
    :data:`ROW_ELEMS_PER_THREAD` of ``direction``; ``sparse`` (mask or stage counts) does not
    change it. ``MAX_BLOCK_ELEMS`` caps the tile (tests lower it to force several tiles per image).
    The forward states its register cap (:data:`ROW_FORWARD_MAXNREG`)."""
    per_thread = max(1, min(ROW_POSITIONS_PER_THREAD, ROW_ELEMS_PER_THREAD[direction] // max(channels, 1)))
    per_thread = 1 << (per_thread.bit_length() - 1)
    cap = max(next_pow2(MAX_BLOCK_ELEMS // max(channels, 1)) // 2, 2)
    block_s = max(min(next_pow2(spatial), per_thread * 32 * ROW_WARPS, cap), 2)
    warps = min(max(block_s // (32 * per_thread), 1), ROW_WARPS)
    return Tiles(channels, block_s, warps, block_s >= spatial,
                 maxnreg=ROW_FORWARD_MAXNREG if direction == "forward" else None)


def use_libdevice(t: torch.Tensor) -> bool:
    """libdevice (exact tanh, ties-to-even rint) when Triton's real compiler builds the kernel:
    CUDA tensors, and ``meta`` tensors (the offline compile check, :mod:`rfsq_kernels.gpucheck`);
    exp/floor fallbacks under the interpreter (CPU tensors)."""
    return t.device.type in ("cuda", "meta") and not interpreter_enabled()


def target_arch(t: torch.Tensor) -> Optional[int]:
    """Compute capability Triton compiles ``t``'s launch for (a CUDA device, or the offline
    check's target for ``meta`` tensors); None under the interpreter."""
    if not use_libdevice(t):
        return None
    import triton
    arch = triton.runtime.driver.active.get_current_target().arch
    return arch if isinstance(arch, int) else None


def level_tables(levels: Sequence[int], device: torch.device, fsq_shift: str = "atanh"
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Cached ``(consts, basis)``: float32 ``(6, C)`` rows half_l, offset, shift, half_w, L-1
    (float64 values rounded to float32, exactly as the reference builds them), 1/half_w (float32
    division, correctly rounded: the bits of the kernels' ``recip_rn(half_w)``, so the row kernels
    load it instead of dividing once per program; new rows go last, so the kernels reading the
    first five see the same offsets) and ``(C,)``
    mixed-radix place values in the index dtype (int32 below 2**31 codes: 32-bit index math).
    ``fsq_shift`` picks the shift row (``'atanh'``, or the official code's ``'tan'``): the kernels
    read the shift from this table, so they compute either. Built once per (levels, device, shift),
    so later calls (and CUDA-graph capture) do no host-to-device copies."""
    def build() -> Tuple[torch.Tensor, torch.Tensor]:
        half_l, offset, shift, half_w = fsq_constants(levels, fsq_shift)
        rows = [half_l, offset, shift, [float(v) for v in half_w], [float(v - 1) for v in levels]]
        consts = torch.tensor(rows, dtype=torch.float32)
        consts = torch.cat([consts, 1.0 / consts[3:4]]).to(device)
        return consts, torch.tensor(index_basis(levels), dtype=index_dtype(levels), device=device)
    return cached(("levels", tuple(levels), torch.device(device), fsq_shift), build)


def cached(key: Tuple, build: Callable[[], Tuple], fresh: Callable[[Tuple], bool] = lambda hit: True) -> Tuple:
    """The constant tables cached under ``key`` (hashable, device included), built by
    ``build()`` on the first call and whenever ``fresh(hit)`` is false. A hit costs a dict lookup:
    no host-device copy, so later launches (and CUDA-graph capture) copy nothing."""
    hit = _TABLES.get(key)
    if hit is None or not fresh(hit):
        hit = _TABLES[key] = build()
    return hit
