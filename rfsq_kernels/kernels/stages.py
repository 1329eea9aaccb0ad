"""``@triton.jit`` helpers shared by both kernel families (design: ``docs/kernel-design.md``).

Every program works on a ``[BLOCK_C, BLOCK_S]`` register tile: all (padded) channels of one
image by a run of flattened spatial positions. Each kernel computes once, at the top, where its
image starts in each tensor, and the helpers take small bundles (tuples) that carry that start,
so they never see the image index or batch strides (``docs/kernel-design.md``, "Arguments",
also says why starts rather than advanced pointers):

* a tensor *view* ``(ptr, start, stride_c, stride_s)`` (``start = img * stride_b``) for
  :func:`load_tile` / :func:`store_tile`;
* ``valid_row = (valid_ptr, img * S)`` for the padding mask, ``index_rows = (idx_ptr, rows,
  mask_s)`` for :func:`store_index`;
* the level constants ``fsq = (half_l, offset, shift, half_w, inv_w)`` from :func:`load_levels`, and
  ``digits = (top, basis)`` from :func:`load_digit_range` (index packing, forward only).

Padded channels load neutral constants (``half_w = 1``, ``basis = 0``) and are never stored. The
forward and the backward replay call the same stage helpers in the same order, so the backward
sees bit-identical rounding decisions.
"""
import triton
import triton.language as tl

from .fpmath import div_small_int, recip_rn, round_half_even, tanh_f32

# Rows of the per-channel constant table built by ``config.level_tables``.
ROW_HALF_L = tl.constexpr(0)
ROW_OFFSET = tl.constexpr(1)
ROW_SHIFT = tl.constexpr(2)
ROW_HALF_W = tl.constexpr(3)
ROW_TOP = tl.constexpr(4)
ROW_INV_W = tl.constexpr(5)


@triton.jit
def widen(v, USE_INT64: tl.constexpr):
    """Promote an index to int64 when some offset of the launch may reach 2**31."""
    if USE_INT64:
        return v.to(tl.int64)
    else:
        return v


# -- the program prologue and tile views (every kernel opens with one of the two prologues) ------


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
    schedules the same instructions differently (bench/NOTES.md, issue 27)."""
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
def load_levels(consts_ptr, offs_c, mask_c, C):
    """``fsq = (half_l, offset, shift, half_w, inv_w)``: per-channel FSQ constants as float32
    ``[BLOCK_C, 1]`` columns (padded channels: ``half_w = 1``, the rest 0); ``inv_w = 1 / half_w``
    rounded to nearest, for :func:`~.fpmath.div_small_int`."""
    half_l = tl.load(consts_ptr + ROW_HALF_L * C + offs_c, mask=mask_c, other=0.0)[:, None]
    offset = tl.load(consts_ptr + ROW_OFFSET * C + offs_c, mask=mask_c, other=0.0)[:, None]
    shift = tl.load(consts_ptr + ROW_SHIFT * C + offs_c, mask=mask_c, other=0.0)[:, None]
    half_w = tl.load(consts_ptr + ROW_HALF_W * C + offs_c, mask=mask_c, other=1.0)[:, None]
    return half_l, offset, shift, half_w, recip_rn(half_w)


@triton.jit
def load_levels_tabled(consts_ptr, offs_c, mask_c, C):
    """:func:`load_levels` with ``inv_w`` read from the table's host-computed ``1 / half_w`` row
    (the same bits as ``recip_rn(half_w)``): no ``div.rn`` subroutine in the program."""
    half_l = tl.load(consts_ptr + ROW_HALF_L * C + offs_c, mask=mask_c, other=0.0)[:, None]
    offset = tl.load(consts_ptr + ROW_OFFSET * C + offs_c, mask=mask_c, other=0.0)[:, None]
    shift = tl.load(consts_ptr + ROW_SHIFT * C + offs_c, mask=mask_c, other=0.0)[:, None]
    half_w = tl.load(consts_ptr + ROW_HALF_W * C + offs_c, mask=mask_c, other=1.0)[:, None]
    inv_w = tl.load(consts_ptr + ROW_INV_W * C + offs_c, mask=mask_c, other=1.0)[:, None]
    return half_l, offset, shift, half_w, inv_w


@triton.jit
def load_digit_range(consts_ptr, basis_ptr, offs_c, mask_c, C):
    """``digits = (top, basis)``: largest digit ``L - 1`` (float32) and mixed-radix place value
    (the index dtype, :func:`.config.level_tables`) per channel, as ``[BLOCK_C, 1]`` columns; only the forward packs indices."""
    top = tl.load(consts_ptr + ROW_TOP * C + offs_c, mask=mask_c, other=0.0)[:, None]
    basis = tl.load(basis_ptr + offs_c, mask=mask_c, other=0)[:, None]
    return top, basis


@triton.jit
def fsq_code(u, fsq, USE_LIBDEVICE: tl.constexpr):
    """FSQ of the conditioned residual ``u``: returns ``(code, t, rounded)``.

    ``bounded = tanh(u + shift) * half_l - offset``; ``code = round(bounded) / half_w`` (the
    straight-through value equals the clean rounded integer; the division is IEEE, see
    :func:`~.fpmath.div_small_int`); ``t`` is kept for the derivative.
    """
    half_l, offset, shift, half_w, inv_w = fsq
    t = tanh_f32(u + shift, USE_LIBDEVICE)
    rounded = round_half_even(t * half_l - offset, USE_LIBDEVICE)
    return div_small_int(rounded, half_w, inv_w, USE_LIBDEVICE), t, rounded


@triton.jit
def fsq_dcode(t, fsq):
    """d code / d u of :func:`fsq_code` with the straight-through round (d round = 1)."""
    half_l, _offset, _shift, _half_w, inv_w = fsq
    return ((1.0 - t * t) * half_l) * inv_w


@triton.jit
def pack_index(rounded, fsq, digits):
    """Mixed-radix index of one stage, ``[BLOCK_S]`` in the index dtype (the basis's: int32
    unless the codebook needs int64), from the rounded values.

    The digit is an explicit integer ``clamp(round + half_w, 0, L-1)`` with NaN -> 0, so NaN/Inf
    input can never produce an out-of-range index: ``tl.maximum`` is IEEE maxNum (``max.f32`` on
    a GPU, ``np.fmax`` in the interpreter), which returns the number when the other operand is NaN.
    """
    _half_l, _offset, _shift, half_w, _inv_w = fsq
    top, basis = digits
    digit = tl.minimum(tl.maximum(rounded + half_w, 0.0), top)
    return tl.sum(digit.to(basis.dtype) * basis, axis=0)


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


@triton.jit
def spatial_lanes(s0, valid_row, S, BLOCK_S: tl.constexpr, HAS_MASK: tl.constexpr, USE_INT64: tl.constexpr):
    """Positions ``s0 .. s0+BLOCK_S`` of the image: ``(offs_s, mask_s, valid)``, where ``mask_s``
    marks those in range and ``valid`` those in range and not padding."""
    offs_s = widen(s0 + tl.arange(0, BLOCK_S), USE_INT64)
    mask_s = offs_s < S
    return offs_s, mask_s, load_valid(valid_row, offs_s, mask_s, HAS_MASK)


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
# per-channel constants are scalars. Same arithmetic, in the same order, as the tile helpers.


@triton.jit
def row_prologue(valid_ptr, S, tiles_per_image, BLOCK_S: tl.constexpr, HAS_MASK: tl.constexpr,
                 USE_INT64: tl.constexpr):
    """Opening of a channel-row kernel (one program per image tile of ``BLOCK_S`` positions):
    ``(img, offs_s, mask_s, valid)`` -- the image (int64 with ``USE_INT64``) and the tile's
    positions (:func:`spatial_lanes`)."""
    pid = tl.program_id(0)
    img = widen(pid // tiles_per_image, USE_INT64)
    offs_s, mask_s, valid = spatial_lanes((pid % tiles_per_image) * BLOCK_S, (valid_ptr, img * S), S, BLOCK_S,
                                          HAS_MASK, USE_INT64)
    return img, offs_s, mask_s, valid


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
def load_channel_levels(consts_ptr, c, C: tl.constexpr):
    """Channel ``c``'s ``fsq = (half_l, offset, shift, half_w, inv_w)`` as float32 scalars
    (:func:`load_levels` for one channel); ``inv_w`` is the table's host-computed ``1 / half_w``
    row (the same bits as ``recip_rn(half_w)``), so no program runs a ``div.rn`` for it."""
    half_l = tl.load(consts_ptr + ROW_HALF_L * C + c)
    offset = tl.load(consts_ptr + ROW_OFFSET * C + c)
    shift = tl.load(consts_ptr + ROW_SHIFT * C + c)
    half_w = tl.load(consts_ptr + ROW_HALF_W * C + c)
    return half_l, offset, shift, half_w, tl.load(consts_ptr + ROW_INV_W * C + c)


@triton.jit
def load_channel_digits(consts_ptr, basis_ptr, c: tl.constexpr, C: tl.constexpr):
    """Channel ``c``'s ``digits = (top, basis)`` as scalars (:func:`load_digit_range` for one channel)."""
    return tl.load(consts_ptr + ROW_TOP * C + c), tl.load(basis_ptr + c)


@triton.jit
def channel_digit(rounded, fsq, digits):
    """One channel's term of the packed index, ``digit * basis`` in the index dtype (the
    basis's), for a row of rounded values: :func:`pack_index` for one channel (same clamp, same
    NaN -> 0); the kernel adds the ``C`` terms in the thread."""
    _half_l, _offset, _shift, half_w, _inv_w = fsq
    top, basis = digits
    digit = tl.minimum(tl.maximum(rounded + half_w, 0.0), top)
    return digit.to(basis.dtype) * basis


@triton.jit
def store_row_index(index_rows, k, index, valid, active_stages, HAS_MASK: tl.constexpr,
                    HAS_ACTIVE_STAGES: tl.constexpr):
    """:func:`store_index` for an index already packed in the thread (``[BLOCK_S]``)."""
    idx_ptr, rows, mask_s = index_rows
    if HAS_MASK or HAS_ACTIVE_STAGES:
        index = tl.where(stage_keep(valid, active_stages, k, HAS_ACTIVE_STAGES), index, -1)
    tl.store(idx_ptr + rows + k, index.to(idx_ptr.dtype.element_ty), mask=mask_s)
