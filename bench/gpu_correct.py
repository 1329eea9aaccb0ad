"""Correctness step of ``bench/gpu_validate.py``: the fused path against the reference on the device.

Every sub-case runs the fused kernels and the reference on the same device (same inputs, random
parameters from :mod:`rfsq_kernels.testing`) forward and backward with a random incoming gradient,
and compares them with the test suite's own checks (``tests/fused_helpers.py``): indices exactly,
values (bitwise where the arithmetic contract makes them so) and the gradients of ``z`` and every
parameter within the suite's tolerances. Inputs are drawn clear of .5 rounding boundaries by the
float64 oracle (``tests/numpy_rfsq.py``) when a few draws find one ("clear": no flip allowed);
otherwise (many stages, real sizes) a random input is compared in "counted" mode: a position whose
indices differ is a flip, allowed only in a sample whose float64 oracle margin is below
``BOUNDARY_TOL`` (a value that close to a boundary may legitimately round either way), and
counted; flipped positions (layernorm: whole images, since a flip moves the image's statistics)
take the reference's values before the tight comparison, and parameter gradients are then held to
a relative L2 error of 1e-2 (``bench/gate.py``'s criterion).

Order: most informative first, so a time box cuts the least.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import zlib
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

from fused_helpers import assert_close_grads, compare, mask_and_counts, run_both, store_like_kernel, to_layout
from numpy_rfsq import BOUNDARY_TOL, draw_clear_of_boundaries, rfsq_np
from rfsq_kernels import RFSQ
from rfsq_kernels.backend import interpreter_enabled
from rfsq_kernels.fused import rfsq_fused
from rfsq_kernels.kernels import config
from rfsq_kernels.reference import SENTINEL, STRATEGIES, get_strategy, rfsq_forward
from rfsq_kernels.testing import random_strategy_params, randomize_

LEVELS = {1: [7, 2, 16], 2: [8, 8, 8, 4], 4: [4, 4, 4, 4, 4], 8: [8, 5, 3, 4]}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CLEAR_TRIES = 10


@dataclass(frozen=True)
class Spec:
    """One fused-vs-reference comparison."""

    name: str
    shape: Tuple[int, ...]
    levels: Tuple[int, ...]
    stages: int
    strategy: str
    dtype: str = "fp32"
    channels_last: bool = False
    mask: bool = False
    counts: bool = False
    max_block_elems: Optional[int] = None  # lowered: forces the split paths on tiny shapes
    counted: bool = False                 # skip the boundary-clear draw (real sizes)


@contextlib.contextmanager
def _max_block(elems: Optional[int]):
    old = config.MAX_BLOCK_ELEMS
    config.MAX_BLOCK_ELEMS = elems or old
    try:
        yield
    finally:
        config.MAX_BLOCK_ELEMS = old


def _seed(name: str) -> int:
    return zlib.crc32(name.encode()) % 2**31


def _path(spec: Spec, device) -> str:
    """The launch path the forward takes (config decides; reported, not asserted)."""
    c, s = len(spec.levels), int(torch.tensor(spec.shape[2:]).prod())
    sparse = spec.mask or spec.counts
    with _max_block(spec.max_block_elems):
        if get_strategy(spec.strategy).per_image_stats:
            t = config.layernorm_tiles(c, s, sparse=sparse)
            return "single" if t.one_tile else f"split (base tile {t.block_c}x{t.block_s})"
        t = config.elementwise_row_tiles(c, s, sparse)
        return "one tile per image" if t.one_tile else f"split {t.block_c}x{t.block_s}"


def _rel_l2(a: torch.Tensor, e: torch.Tensor) -> float:
    return float((a.float() - e.float()).norm() / e.float().norm().clamp_min(1e-12))


def compare_counted(fused: Dict, ref: Dict, z, levels, stages, strategy, params, mask, active) -> Dict:
    """Compare with .5-boundary flips allowed where the float64 oracle says the sample comes that
    close (see the module docstring); returns ``{flips, flip_samples, min_flip_margin}``."""
    (q, idx, mean, std), (rq, ridx, rmean, rstd) = fused["out"], ref["out"]
    assert idx.shape == ridx.shape and idx.dtype == ridx.dtype, "index shape/dtype"
    flipped = (idx != ridx).any(dim=-1)                        # (B, *spatial)
    n_flip = int(flipped.sum())
    assert n_flip <= max(1, int(1e-3 * flipped.numel())), f"{n_flip} of {flipped.numel()} positions differ"
    samples = flipped.flatten(1).any(dim=1).nonzero().flatten().tolist()
    margins = []
    for b in samples:  # the float64 oracle on the flipped sample only
        sl = slice(b, b + 1)
        _, _, margin = rfsq_np(z[sl].cpu(), levels, stages, strategy, **{k: v.cpu() for k, v in params.items()},
                               mask=None if mask is None else mask[sl].cpu().numpy(),
                               active_stages=None if active is None else active[sl].cpu().numpy())
        margins.append(margin)
        assert margin <= BOUNDARY_TOL, (f"sample {b}: indices differ at {int(flipped[b].sum())} positions but its "
                                        f"float64 margin {margin:.3g} > BOUNDARY_TOL {BOUNDARY_TOL}: not a boundary flip")
    patched = {"out": list(fused["out"]), "grads": dict(fused["grads"])}
    if n_flip:
        if get_strategy(strategy).per_image_stats:
            img = flipped.flatten(1).any(dim=1)
            where = img.view(-1, *([1] * (q.ndim - 1)))
            patched["out"][1] = torch.where(img.view(-1, *([1] * (idx.ndim - 1))), ridx, idx)
            patched["out"][2] = torch.where(img.view(-1, 1, 1), rmean, mean)
            patched["out"][3] = torch.where(img.view(-1, 1, 1), rstd, std)
        else:
            where = flipped.unsqueeze(1)
            patched["out"][1] = torch.where(flipped.unsqueeze(-1), ridx, idx)
        patched["out"][0] = torch.where(where, rq, q)
        patched["grads"]["z"] = torch.where(where, ref["grads"]["z"], fused["grads"]["z"])
    compare(patched, ref, check_grads=False)
    assert_close_grads(patched["grads"]["z"], ref["grads"]["z"], "grad z")
    for k in params:
        if n_flip:
            rel = _rel_l2(fused["grads"][k], ref["grads"][k])
            assert rel <= 1e-2, f"grad {k}: relative L2 error {rel:.3g} > 1e-2 with {n_flip} flips"
        else:
            assert_close_grads(fused["grads"][k], ref["grads"][k], f"grad {k}")
    return {"flips": n_flip, "flip_samples": samples, "min_flip_margin": min(margins) if margins else None}


def check_spec(spec: Spec, device: torch.device) -> Dict:
    """Run one :class:`Spec` on ``device``; raises AssertionError on a disagreement."""
    torch.manual_seed(_seed(spec.name))
    levels, k, strategy, dtype = list(spec.levels), spec.stages, spec.strategy, DTYPES[spec.dtype]
    b, spatial = spec.shape[0], spec.shape[2:]
    params = random_strategy_params(strategy, k, len(levels))
    mask = active = None
    if spec.mask or spec.counts:
        m, a = mask_and_counts(b, spatial, k)
        mask, active = (m if spec.mask else None), (a if spec.counts else None)
    mode = "counted"
    z = None
    if not spec.counted:
        try:
            z = draw_clear_of_boundaries(spec.shape, levels, k, strategy, params, mask=mask, active_stages=active,
                                         dtype=dtype, tries=CLEAR_TRIES)[0]
            mode = "clear"
        except RuntimeError:
            pass
    if z is None:
        z = (1.5 * torch.randn(spec.shape)).to(dtype)
    if mask is not None:  # padding is never read: NaN there would show
        z = z.masked_fill(~mask.unsqueeze(1), float("nan"))
    z = to_layout(z, spec.channels_last).to(device)
    params = {n: v.to(device) for n, v in params.items()}
    mask = None if mask is None else mask.to(device)
    active = None if active is None else active.to(device)
    grad = torch.randn(spec.shape, device=device)
    with _max_block(spec.max_block_elems):
        fused, ref = run_both(functools.partial(rfsq_fused, mask=mask, active_stages=active),
                              functools.partial(rfsq_forward, mask=mask, active_stages=active),
                              z, levels, k, strategy, params, grad=grad)
    info = {"mode": mode, "path": _path(spec, device), "positions": int(z.numel() // z.shape[1]), "flips": 0}
    if mode == "clear":
        compare(fused, ref)
    else:
        info.update(compare_counted(fused, ref, z, levels, k, strategy, params, mask, active))
    q, idx = fused["out"][0], fused["out"][1]
    assert q.stride() == z.stride(), f"quantized strides {q.stride()} != input strides {z.stride()}"
    if mask is not None:
        assert bool((idx[~mask] == SENTINEL).all()), "masked positions must have index -1"
        assert torch.isfinite(fused["grads"]["z"]).all(), "non-finite grad z (NaN padding leaked)"
    return info


def check_encode_decode(strategy: str, dtype: str, sparse: bool, channels_last: bool, device) -> Dict:
    """``decode(encode(z))`` equals ``forward(z)[0]`` bitwise on the device, and again on the CPU
    from the indices and side moved there (a codec decodes elsewhere)."""
    torch.manual_seed(_seed(f"codec-{strategy}-{dtype}-{sparse}"))
    levels, k = [8, 5, 3, 4], 3
    m = randomize_(RFSQ(stages=k, strategy=strategy, levels=levels, backend="triton")).to(device)
    z = to_layout((1.5 * torch.randn(3, 4, 6, 7)).to(DTYPES[dtype]), channels_last).to(device)
    mask = stages = None
    if sparse:
        mask = (torch.rand(3, 6, 7) > 0.3).to(device)
        stages = torch.tensor([k, 1, 2], device=device)
    with torch.no_grad():
        q, idx = m(z, mask=mask, stages=stages)
        idx2, side = m.encode(z, mask=mask, stages=stages)
        assert torch.equal(idx, idx2), "encode's indices differ from forward's"
        # decode sums in float32; the kernel stores that sum in z's dtype (the interpreter truncates bf16)
        dec = store_like_kernel(m.decode(idx2, side), z.dtype, interpreter_enabled())
        assert torch.equal(dec, q), f"decode(encode(z)) != forward: {int((dec != q).sum())} of {q.numel()} differ"
        if device.type == "cuda":
            assert torch.equal(m.decode(idx2, side, dtype=z.dtype), q), "decode(dtype=z.dtype) != forward"
        cpu = copy.deepcopy(m).cpu()
        dec_cpu = store_like_kernel(cpu.decode(idx2.cpu(), side.cpu()), z.dtype, interpreter_enabled())
        assert torch.equal(dec_cpu, q.cpu()), f"CPU decode != device forward: {int((dec_cpu != q.cpu()).sum())} differ"
    return {"values": q.numel(), "indices_on": str(idx2.device), "decoded_on": ["device", "cpu"]}


def check_module_dropout(strategy: str, device) -> Dict:
    """``quantize_dropout`` in training through the fused module: the kept stages per sample (read
    off the indices) give the reference's result."""
    torch.manual_seed(_seed(f"dropout-{strategy}"))
    m = randomize_(RFSQ(stages=4, strategy=strategy, backend="triton", quantize_dropout=True)).to(device).train()
    ref = RFSQ(stages=4, strategy=strategy, backend="reference").to(device)
    ref.load_state_dict(m.state_dict())
    z = torch.randn(6, 5, 16, 9, device=device)
    mask = torch.ones(6, 16, 9, dtype=torch.bool, device=device)
    mask[1, 9:] = False
    q, idx = m(z, mask=mask)
    kept = (idx[:, 0, 0] != SENTINEL).sum(-1)
    rq, ridx = ref(z, mask=mask, stages=kept)
    flips = int((idx != ridx).any(-1).sum())
    assert flips <= 1, f"{flips} positions differ from the reference with the same kept stages"
    ok = ~(idx != ridx).any(-1).unsqueeze(1)
    torch.testing.assert_close(q * ok, rq * ok, rtol=1e-5, atol=1e-5)
    return {"kept_stages": kept.tolist(), "flips": flips}


def check_vqpytorch(layout: str, device) -> Dict:
    """The ``rfsq_kernels.vqpytorch.ResidualFSQ`` drop-in against ``vector_quantize_pytorch`` on the
    device: digits, values and input gradients equal away from rounding boundaries (the two tanh
    may differ by an ulp: ``tests/dropins/test_vqpytorch_fused.py``'s boundary positions)."""
    try:
        import vector_quantize_pytorch as vq
    except Exception as exc:
        return {"status": "skipped", "reason": f"vector_quantize_pytorch not importable: {type(exc).__name__}: {exc}"}
    from rfsq_kernels.vqpytorch import ResidualFSQ
    from vq_client_helpers import tanh_boundary_positions

    torch.manual_seed(_seed(f"vq-{layout}"))
    levels, k = [3, 4, 5, 6, 7, 8, 16], 4
    cf = layout != "bnc"
    shape = {"bnc": (2, 400, 7), "cf4": (2, 7, 16, 20)}[layout]
    lib = vq.ResidualFSQ(levels=levels, num_quantizers=k, dim=7, is_channel_first=cf).to(device)
    ours = ResidualFSQ(levels=levels, num_quantizers=k, is_channel_first=cf, backend="triton").to(device)
    x, g = torch.randn(shape) * 1.5, torch.randn(shape)
    outs = []
    for mod in (lib, ours):
        xx = x.to(device).requires_grad_()
        q, idx = mod(xx)
        (q * g.to(device)).sum().backward()
        outs.append([t.detach().cpu() for t in (q, idx, xx.grad)])
    last = (lambda t: t.movedim(1, -1)) if cf else (lambda t: t)
    (q1, i1, d1), (q2, i2, d2) = ([last(t) for t in o] for o in outs)
    clear = ~tanh_boundary_positions(last(x), levels, k)
    assert torch.equal(i1[clear], i2[clear]), f"{int((i1[clear] != i2[clear]).sum())} digits differ off boundaries"
    assert torch.equal(q1[clear], q2[clear]), "values differ off boundaries"
    torch.testing.assert_close(d2[clear], d1[clear], rtol=4e-6, atol=4 * 2.0 ** -23 * float(d1.abs().max()))
    return {"library": getattr(vq, "__version__", "?"), "clear_fraction": round(float(clear.float().mean()), 4),
            "boundary_differences": int((i1 != i2).any(-1).sum())}


def check_int64_offsets(strategy: str, device) -> Dict:
    """A batch whose element offsets pass 2**31 (the launches' 64-bit-offset path; forward): the
    fused indices and values of the last positions of the second image equal the reference's on
    that slice (none/scale: positions are independent, so the slice is a valid reference input)."""
    if device.type != "cuda":
        return {"status": "skipped", "reason": "needs a GPU (2 x 4 x 2**28 float32 = 8.6 GB)"}
    free = torch.cuda.mem_get_info(device)[0]
    if free < 40 * 2**30:
        return {"status": "skipped", "reason": f"needs 40 GiB free, {free / 2**30:.0f} GiB free"}
    torch.manual_seed(_seed(f"int64-{strategy}"))
    levels, k, tail = [8, 5, 3, 4], 2, 2**20
    params = {n: v.to(device) for n, v in random_strategy_params(strategy, k, len(levels)).items()}
    z = torch.randn(2, 4, 2**28, device=device) * 1.5
    with torch.no_grad():
        q, idx, _, _ = rfsq_fused(z, levels, k, strategy, **params)
        part = z[1:, :, -tail:].contiguous()
        rq, ridx, _, _ = rfsq_forward(part, levels, k, strategy, **params)
        fq, fidx = q[1:, :, -tail:], idx[1:, -tail:]
        flips = int((fidx != ridx).any(-1).sum())
        assert flips <= 2, f"{flips} of {tail} positions differ beyond the 2**31 offset"
        keep = ~(fidx != ridx).any(-1).unsqueeze(1)
        assert torch.equal(fq * keep, rq * keep), "values differ beyond the 2**31 offset"
    del z, q, idx
    torch.cuda.empty_cache()
    return {"elements": 2 * 4 * 2**28, "compared_positions": tail, "flips": flips}


def _grid(dry: bool) -> List[Spec]:
    """Every strategy x K in {1, 2, 4, 8} x fp32/bf16/fp16 on odd shapes, rank and layout rotating
    (dry run: one dtype per (strategy, K), rotating, so each dtype still runs)."""
    out, i = [], 0
    for k in (2, 4, 1, 8):
        for dname in ("fp32", "bf16", "fp16"):
            for s in STRATEGIES:
                i += 1
                if dry and dname != ("fp32", "bf16", "fp16")[(i + k) % 3]:
                    continue
                c = len(LEVELS[k])
                rank = 3 + i % 3
                spatial = {3: (1073,), 4: (37, 29), 5: (5, 13, 17)}[rank] if not dry else \
                    {3: (37,), 4: (5, 7), 5: (3, 4, 5)}[rank]
                out.append(Spec(f"{s}-K{k}-{dname}-rank{rank}{'-cl' if i % 2 else ''}", (3 if not dry else 2, c, *spatial),
                                tuple(LEVELS[k]), k, s, dname, channels_last=bool(i % 2)))
    return out


def _paths(dry: bool) -> List[Spec]:
    """One tile and several tiles per image (layernorm: the split path; none, scale: one program
    per tile), dense and with a mask + per-sample counts; on the device at natural sizes, dry:
    MAX_BLOCK_ELEMS=64 as the tests do."""
    out = []
    for sparse in (False, True):
        for s in STRATEGIES:
            tag = "-mask+counts" if sparse else ""
            small = (5, 4, 9, 11) if not dry else (5, 4, 3, 5)
            big, lower = ((5, 4, 45, 61), None) if not dry else ((5, 4, 5, 9), 64)
            out.append(Spec(f"{s}-path-single{tag}", small, (8, 5, 3, 4), 3, s, mask=sparse, counts=sparse))
            out.append(Spec(f"{s}-path-split{tag}", big, (8, 5, 3, 4), 3, s, mask=sparse, counts=sparse,
                            max_block_elems=lower))
    return out


def _extras(dry: bool) -> List[Spec]:
    lower = 64 if dry else None
    big = (3, 4, 5, 7) if dry else (3, 4, 45, 61)
    out = [Spec("layernorm-split-bf16-cl", big, (8, 5, 3, 4), 2, "layernorm", "bf16", channels_last=True,
                max_block_elems=lower),
           Spec("layernorm-split-fp16-mask", big, (8, 5, 3, 4), 2, "layernorm", "fp16", mask=True,
                max_block_elems=lower)]
    for s in STRATEGIES:
        out.append(Spec(f"{s}-rank3-bf16-cl-mask", (3, 3, 37), (7, 2, 16), 2, s, "bf16", channels_last=True, mask=True))
        out.append(Spec(f"{s}-int64-index", (2, 8, 3, 5), (16,) * 8, 2, s))
        out.append(Spec(f"{s}-counts-only-K4", (4, 5, 6, 5), (4,) * 5, 4, s, counts=True))
        out.append(Spec(f"{s}-counted-K8-mask", (3, 4, 6, 7), (8, 5, 3, 4), 8, s, mask=True, counted=True))
    return out


def _real_sizes() -> List[Spec]:
    """Benchmark-sized inputs (counted mode): many programs, grids beyond the SM count."""
    out = [Spec(f"{s}-training-128x5x32x32-K4", (128, 5, 32, 32), (4,) * 5, 4, s, counted=True) for s in STRATEGIES]
    out.append(Spec("layernorm-large-64x8x128x128-K4", (64, 8, 128, 128), (8, 8, 8, 8, 4, 4, 4, 4), 4, "layernorm",
                    counted=True))
    out.append(Spec("layernorm-training-bf16-cl-K2", (128, 4, 32, 32), (8, 8, 8, 4), 2, "layernorm", "bf16",
                    channels_last=True, counted=True))
    return out


def subcases(ctx) -> List[Tuple[str, Callable[[], Optional[Dict]]]]:
    """The step's sub-cases, most informative first."""
    dev, dry = ctx.device, ctx.dry
    run = lambda spec: (spec.name, functools.partial(check_spec, spec, dev))  # noqa: E731
    grid = _grid(dry)
    first = [g for g in grid if g.stages == 2 and g.dtype == "fp32"] or grid[:3]
    out = [run(g) for g in first] + [run(p) for p in _paths(dry)]
    for s in STRATEGIES:
        out.append((f"codec-{s}-fp32", functools.partial(check_encode_decode, s, "fp32", False, False, dev)))
        out.append((f"codec-{s}-bf16-mask+counts-cl", functools.partial(check_encode_decode, s, "bf16", True, True, dev)))
    if not dry:
        out += [run(r) for r in _real_sizes()]
    out += [(f"module-dropout-{s}", functools.partial(check_module_dropout, s, dev)) for s in ("layernorm", "scale")]
    out += [(f"vqpytorch-vs-library-{lay}", functools.partial(check_vqpytorch, lay, dev)) for lay in ("bnc", "cf4")]
    out += [run(g) for g in grid if g not in first]
    out += [run(e) for e in _extras(dry)]
    out.append(("codec-layernorm-fp16", functools.partial(check_encode_decode, "layernorm", "fp16", True, False, dev)))
    out += [(f"{s}-int64-offsets-fwd", functools.partial(check_int64_offsets, s, dev)) for s in ("none", "scale")]
    return out
