"""``@triton.jit`` tile I/O shared by every kernel family (design: ``docs/kernel-design.md``).

Every program works on a ``[BLOCK_C, BLOCK_S]`` register tile: all (padded) channels of one
image by a run of flattened spatial positions (or, in the channel-row kernels, ``C`` rows of
``BLOCK_S`` positions). This file holds where a program's data is and how it gets there:

* the program prologues, one per program shape (:func:`tile_prologue`: one program per (image,
  tile); :func:`image_prologue`: per image; :func:`row_prologue`: per (image, tile) of the channel-row kernels), which compute once, at
  the top, where the image starts in each tensor, and the lanes (:func:`channel_lanes`,
  :func:`spatial_lanes`);
* tensor *views* ``(ptr, start, stride_c, stride_s)`` (``start = img * stride_b``,
  :func:`tile_view`) for :func:`load_tile` / :func:`store_tile` and :func:`load_row` /
  :func:`store_row`; the helpers take such small bundles, so they never see the image index or
  batch strides (``docs/kernel-design.md``, "Arguments", also says why starts rather than
  advanced pointers);
* ``valid_row = (valid_ptr, img * S)`` for the padding mask (:func:`load_valid`), per-sample
  stage counts (:func:`load_active_stages`, :func:`stage_keep`, :func:`keep_only`);
* ``index_rows = (idx_ptr, rows, mask_s)`` for the packed-index stores (:func:`store_index`,
  :func:`store_row_index`).

What a stage computes on the tiles (level constants, FSQ, index packing): :mod:`.fsq_math`.
"""
import triton
import triton.language as tl

from .fsq_math import pack_index


@triton.jit
def widen(v, USE_INT64: tl.constexpr):
    """Promote an index to int64 when some offset of the launch may reach 2**31."""
    if USE_INT64:
        return v.to(tl.int64)
    else:
        return v


# -- the program prologues and tile views (every kernel opens with one of the prologues) ---------


@triton.jit
def channel_lanes(C, BLOCK_C: tl.constexpr, USE_INT64: tl.constexpr):
    """``(offs_c, mask_c)``: the program's ``BLOCK_C`` channel lanes and those below ``C``."""
    offs_c = widen(tl.arange(0, BLOCK_C), USE_INT64)
    return offs_c, offs_c < C


@triton.jit
def tile_view(ptr, img, stride_b, stride_c, stride_s):
    """The view ``(ptr, start, stride_c, stride_s)`` of image ``img`` of a ``(B, C, S)`` tensor
    (``start = img * stride_b``), for :func:`load_tile` / :func:`store_tile`."""
    return ptr, img * stride_b, stride_c, stride_s


@triton.jit
def image_views(img, tensors):
    """:func:`tile_view` of image ``img`` of each ``(ptr, stride_b, stride_c, stride_s)`` in
    ``tensors``, as a tuple in the same order."""
    views = ()
    for i in tl.static_range(len(tensors)):
        ptr, stride_b, stride_c, stride_s = tensors[i]
        views = views + (tile_view(ptr, img, stride_b, stride_c, stride_s),)
    return views


@triton.jit
def tile_prologue(tensors, valid_ptr, C, S, tiles_per_image, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
                  HAS_MASK: tl.constexpr, USE_INT64: tl.constexpr):
    """Opening of a kernel with one program per (image, tile of ``BLOCK_S`` positions):
    ``(img, views, offs_c, mask_c, offs_s, mask_s, valid)`` -- the image (int64 with
    ``USE_INT64``), the views of ``tensors`` (:func:`image_views`: where the image starts in each
    tensor, computed once), the channel lanes (:func:`channel_lanes`) and the tile's positions
    (:func:`spatial_lanes`; ``valid_ptr``: the ``(B, S)`` padding mask, or None without
    ``HAS_MASK``). The order of these computations is the one ptxas was tuned on: another order
    schedules the same instructions differently (bench/NOTES.md, "Structure 2026-12-02")."""
    pid = tl.program_id(0)
    img = widen(pid // tiles_per_image, USE_INT64)
    valid_row = (valid_ptr, img * S)
    views = image_views(img, tensors)
    offs_s, mask_s, valid = spatial_lanes((pid % tiles_per_image) * BLOCK_S, valid_row, S, BLOCK_S, HAS_MASK,
                                          USE_INT64)
    offs_c, mask_c = channel_lanes(C, BLOCK_C, USE_INT64)
    return img, views, offs_c, mask_c, offs_s, mask_s, valid


@triton.jit
def image_prologue(tensors, valid_ptr, C, S, K, BLOCK_C: tl.constexpr, USE_INT64: tl.constexpr):
    """Opening of a kernel with one program per image (it walks the positions itself, with
    :func:`spatial_lanes` on ``valid_row``): ``(img, views, valid_row, stage_start, offs_c,
    mask_c)`` as for :func:`tile_prologue`, and ``stage_start = img * K * C``, where the image's
    rows of ``(B, K, C)`` per-stage tables (statistics, gradient partials) start."""
    img = widen(tl.program_id(0), USE_INT64)
    valid_row = (valid_ptr, img * S)
    views = image_views(img, tensors)
    stage_start = img * K * C
    offs_c, mask_c = channel_lanes(C, BLOCK_C, USE_INT64)
    return img, views, valid_row, stage_start, offs_c, mask_c


@triton.jit
def spatial_lanes(s0, valid_row, S, BLOCK_S: tl.constexpr, HAS_MASK: tl.constexpr, USE_INT64: tl.constexpr):
    """Positions ``s0 .. s0+BLOCK_S`` of the image: ``(offs_s, mask_s, valid)``, where ``mask_s``
    marks those in range and ``valid`` those in range and not padding."""
    offs_s = widen(s0 + tl.arange(0, BLOCK_S), USE_INT64)
    mask_s = offs_s < S
    return offs_s, mask_s, load_valid(valid_row, offs_s, mask_s, HAS_MASK)


@triton.jit
def load_tile(view, offs_c, offs_s, mask):
    """A ``[BLOCK_C, BLOCK_S]`` tile of ``view = (ptr, start, stride_c, stride_s)`` (one image
    starting at ``ptr + start``) as float32; masked lanes read 0."""
    ptr, start, stride_c, stride_s = view
    offs = start + offs_c[:, None] * stride_c + offs_s[None, :] * stride_s
    return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def store_tile(view, val, offs_c, offs_s, mask):
    """Store a float32 tile into ``view = (ptr, start, stride_c, stride_s)`` in the pointer's
    element type (bf16/fp16/fp32/fp64)."""
    ptr, start, stride_c, stride_s = view
    offs = start + offs_c[:, None] * stride_c + offs_s[None, :] * stride_s
    tl.store(ptr + offs, val.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def masked_row_sum(v, mask):
    """Per-channel sum over the tile's valid positions: ``[BLOCK_C, BLOCK_S] -> [BLOCK_C]``."""
    return tl.sum(tl.where(mask, v, 0.0), axis=1)


@triton.jit
def store_index(index_rows, k, rounded, fsq, digits, valid, active_stages, HAS_MASK: tl.constexpr,
                HAS_ACTIVE_STAGES: tl.constexpr):
    """Write stage ``k``'s packed index for the tile's positions; positions the stage skips
    (padding, dropped stage) get -1.

    ``index_rows = (idx_ptr, rows, mask_s)``: the base of the whole ``(B, S, K)`` index tensor,
    ``rows = (img * S + offs_s) * K`` and the in-range positions."""
    idx_ptr, rows, mask_s = index_rows
    index = pack_index(rounded, fsq, digits)
    if HAS_MASK or HAS_ACTIVE_STAGES:
        index = tl.where(stage_keep(valid, active_stages, k, HAS_ACTIVE_STAGES), index, -1)
    tl.store(idx_ptr + rows + k, index.to(idx_ptr.dtype.element_ty), mask=mask_s)


# -- masks (padded positions) and per-sample stage counts (quantize dropout) -------------------
# Both are constexpr-gated (HAS_MASK, HAS_ACTIVE_STAGES, which every kernel derives from its
# ``valid_ptr`` / ``active_stages_ptr`` with ``@triton.heuristics``): without them the compiled code
# is unchanged and their pointers are None. ``active_stages`` inside a kernel is the image's count.


@triton.jit
def load_valid(valid_row, offs_s, mask_s, HAS_MASK: tl.constexpr):
    """``[BLOCK_S]`` bool: position in range and, with ``HAS_MASK``, not padding. ``valid_row =
    (valid_ptr, img * S)``: the ``(B, S)`` uint8 mask (None without ``HAS_MASK``) and where the
    image's row starts."""
    if HAS_MASK:
        valid_ptr, start = valid_row
        m = tl.load(valid_ptr + start + offs_s, mask=mask_s, other=0)
        return mask_s & (m != 0)
    else:
        return mask_s


@triton.jit
def load_active_stages(active_stages_ptr, img, K, HAS_ACTIVE_STAGES: tl.constexpr):
    """Number of stages image ``img`` runs (``active_stages_ptr``: ``(B,)`` int32), or K without."""
    if HAS_ACTIVE_STAGES:
        return tl.load(active_stages_ptr + img)
    else:
        return K


@triton.jit
def stage_keep(valid, active_stages, k, HAS_ACTIVE_STAGES: tl.constexpr):
    """Positions that stage ``k`` quantizes: ``valid`` (any shape) and ``k < active_stages``."""
    if HAS_ACTIVE_STAGES:
        return valid & (k < active_stages)
    else:
        return valid


@triton.jit
def keep_only(q, valid, active_stages, k, HAS_MASK: tl.constexpr, HAS_ACTIVE_STAGES: tl.constexpr):
    """``q`` with the positions stage ``k`` skips set to 0 (a no-op without mask/stage counts);
    ``valid`` broadcasts against ``q`` (a ``[1, BLOCK_S]`` row or the tile's mask)."""
    if HAS_MASK or HAS_ACTIVE_STAGES:
        return tl.where(stage_keep(valid, active_stages, k, HAS_ACTIVE_STAGES), q, 0.0)
    else:
        return q


# -- channel rows: every channel of a position in one thread (the elementwise kernels) ----------
# A program holds ``C`` rows, one 1-D ``[BLOCK_S]`` vector per channel (unrolled over the exact
# ``C``, a constexpr), so each thread owns every channel of its positions: the index packing and
# any per-position channel sum are thread-local, and no lane runs for a padded channel. The
# per-channel constants are scalars (:mod:`.fsq_math`). Same arithmetic, in the same order, as
# the tile helpers.


@triton.jit
def row_prologue(tensors, valid_ptr, S, tiles_per_image, BLOCK_S: tl.constexpr, HAS_MASK: tl.constexpr,
                 USE_INT64: tl.constexpr):
    """Opening of a channel-row kernel (one program per image tile of ``BLOCK_S`` positions, like
    :func:`tile_prologue`, but no channel lanes): ``(img, views, offs_s, mask_s, valid)`` -- the
    image (int64 with ``USE_INT64``), the views of ``tensors`` (:func:`image_views`) and the
    tile's positions (:func:`spatial_lanes`). The views come after the positions here, the order
    these kernels were tuned on (see :func:`tile_prologue`)."""
    pid = tl.program_id(0)
    img = widen(pid // tiles_per_image, USE_INT64)
    offs_s, mask_s, valid = spatial_lanes((pid % tiles_per_image) * BLOCK_S, (valid_ptr, img * S), S, BLOCK_S,
                                          HAS_MASK, USE_INT64)
    views = image_views(img, tensors)
    return img, views, offs_s, mask_s, valid


@triton.jit
def _row_offsets(view, c, offs_s):
    ptr, start, stride_c, stride_s = view
    # offs_s is int64 under USE_INT64 (so is start); c * stride_c is taken in offs_s's type.
    chan = tl.full([], c, offs_s.dtype)
    return ptr, start + chan * stride_c + offs_s * stride_s


@triton.jit
def load_row(view, c, offs_s, mask):
    """Channel ``c``'s ``[BLOCK_S]`` row of ``view = (ptr, start, stride_c, stride_s)`` as float32;
    masked lanes read 0."""
    ptr, offs = _row_offsets(view, c, offs_s)
    return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def store_row(view, val, c, offs_s, mask):
    """Store channel ``c``'s float32 row into ``view`` in the pointer's element type."""
    ptr, offs = _row_offsets(view, c, offs_s)
    tl.store(ptr + offs, val.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def store_row_index(index_rows, k, index, valid, active_stages, HAS_MASK: tl.constexpr,
                    HAS_ACTIVE_STAGES: tl.constexpr):
    """:func:`store_index` for an index already packed in the thread (``[BLOCK_S]``)."""
    idx_ptr, rows, mask_s = index_rows
    if HAS_MASK or HAS_ACTIVE_STAGES:
        index = tl.where(stage_keep(valid, active_stages, k, HAS_ACTIVE_STAGES), index, -1)
    tl.store(idx_ptr + rows + k, index.to(idx_ptr.dtype.element_ty), mask=mask_s)
