"""The fused ResidualFSQ kernels (Triton interpreter on CPU) against an oracle that is the
reference stage math fed with the interpreter's own tanh: bitwise, values, indices and gradients.
And against vector-quantize-pytorch directly: equal except through tanh (the interpreter's
fallback is not torch's tanh): digits equal away from rounding boundaries, gradients within a
few ulp. Few, large programs keep the interpreter quick."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from rfsq_kernels.backend import interpreter_enabled
from rfsq_kernels.vqpytorch import GroupedResidualFSQ, ResidualFSQ
from rfsq_kernels.vqpytorch import reference as ref
from rfsq_kernels.vqpytorch.fused import residual_fsq_fused
from vq_client_helpers import tanh_boundary_positions

pytestmark = pytest.mark.skipif(not interpreter_enabled() and not torch.cuda.is_available(),
                                reason="needs TRITON_INTERPRET=1 (tests/conftest.py sets it) or a GPU")
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _interp_tanh(z: torch.Tensor) -> torch.Tensor:
    """The interpreter's tanh (rfsq_kernels/kernels/fpmath.py), in NumPy float32 like the interpreter."""
    a = z.detach().cpu().numpy().astype(np.float32)
    e = np.exp(np.float32(-2.0) * np.abs(a))
    t = (np.float32(1.0) - e) / (np.float32(1.0) + e)
    return torch.from_numpy(np.where(a < 0, -t, t).astype(np.float32))


def oracle(x, levels, scales, clamp, g, num_active=None):
    """``(quantized, indices, dx)`` the kernels must produce under the interpreter, bit for bit."""
    c = clamp.float()
    t = _interp_tanh(x.float() / c)
    y = (t * c).requires_grad_()
    q, idx = ref.residual_fsq_core(y, levels, scales, None, num_active)
    (q * g).sum().backward()
    one_minus = (1.0 - t.double() * t.double()).float()
    dx = ((y.grad * c) * one_minus) / c
    return q.to(x.dtype), idx, dx.to(x.dtype)


def _fused(x, levels, scales, clamp, g, num_active=None, mask=None):
    x = x.detach().clone().requires_grad_()
    q, idx = residual_fsq_fused(x, levels, scales, clamp, num_active, mask)
    (q.float() * g).sum().backward()
    return q, idx, x.grad


def _assert_equal(actual, expected, name, bf16_step=False):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, name
    if bf16_step:  # the interpreter truncates bf16 stores: one bf16 step
        a, e = actual.float(), expected.float()
        step = torch.exp2(torch.floor(torch.log2(e.abs().clamp_min(2.0 ** -126))) - 7)
        assert bool(((a - e).abs() <= step).all()), f"{name}: more than one bf16 step off"
    else:
        assert torch.equal(actual, expected), f"{name}: {int((actual != expected).sum())} elements differ"


CASES = [  # (levels, K, shape (B, N, C) or channel-first, dtype)
    ([3, 4, 5, 6, 7, 8, 16], 1, (2, 300, 7), torch.float32),
    ([8, 5, 5, 5], 2, (3, 1000, 4), torch.float32),
    ([16, 7, 6, 4, 3], 4, (2, 513, 5), torch.bfloat16),
    ([4] * 8, 8, (2, 700, 8), torch.float32),
]


@pytest.mark.parametrize("levels,K,shape,dtype", CASES)
def test_fused_bitwise_against_oracle(levels, K, shape, dtype, seed):
    scales = ref.stage_scales(levels, K)
    clamp = ref.default_soft_clamp(levels)
    x = (torch.randn(shape) * 1.5).to(dtype)
    x[0, :3] = torch.tensor([float("inf"), -float("inf"), 0.0]).to(dtype)[:, None]
    g = torch.randn(shape).to(dtype).float()
    q, idx, dx = _fused(x, levels, scales, clamp, g)
    rq, ridx, rdx = oracle(x, levels, scales, clamp, g)
    assert torch.equal(idx, ridx)
    _assert_equal(q, rq, "quantized", dtype == torch.bfloat16)
    _assert_equal(dx, rdx, "grad x", dtype == torch.bfloat16)


def test_fused_dropout_and_mask(seed):
    levels, K = [8, 5, 5, 5], 4
    scales, clamp = ref.stage_scales(levels, K), ref.default_soft_clamp(levels)
    x, g = torch.randn(2, 600, 4) * 1.5, torch.randn(2, 600, 4)
    for n in (1, 3):
        q, idx, dx = _fused(x, levels, scales, clamp, g, num_active=n)
        rq, ridx, rdx = oracle(x, levels, scales, clamp, g, num_active=n)
        assert idx.dtype == torch.int64 and torch.equal(idx, ridx) and bool((idx[..., n:] == -1).all())
        assert torch.equal(q, rq) and torch.equal(dx, rdx)
    mask = torch.rand(2, 600) > 0.3
    q, idx, dx = _fused(x, levels, scales, clamp, g, mask=mask)
    rq, ridx, rdx = oracle(x, levels, scales, clamp, g)
    assert torch.equal(q[mask], rq[mask]) and torch.equal(idx[mask], ridx[mask]) and torch.equal(dx[mask], rdx[mask])
    assert bool((q[~mask] == 0).all()) and bool((idx[~mask] == -1).all()) and bool((dx[~mask] == 0).all())


@pytest.mark.parametrize("layout", ["bnc", "cf3", "cf4", "cf5"])
def test_fused_module_against_library(layout, seed):
    vq = pytest.importorskip("vector_quantize_pytorch", reason="vector-quantize-pytorch is not installed")
    levels, K = [3, 4, 5, 6, 7, 8, 16], 4
    cf = layout != "bnc"
    shape = {"bnc": (2, 400, 7), "cf3": (2, 7, 300), "cf4": (2, 7, 16, 20), "cf5": (2, 7, 4, 8, 9)}[layout]
    lib = vq.ResidualFSQ(levels=levels, num_quantizers=K, dim=7, is_channel_first=cf)
    ours = ResidualFSQ(levels=levels, num_quantizers=K, is_channel_first=cf, backend="triton")
    x, g = torch.randn(shape) * 1.5, torch.randn(shape)
    outs = []
    for m in (lib, ours):
        xx = x.clone().requires_grad_()
        q, idx = m(xx)
        (q * g).sum().backward()
        outs.append((q, idx, xx.grad))
    (q1, i1, d1), (q2, i2, d2) = outs
    x_last = x.movedim(1, -1) if cf else x
    i1l, i2l = (i1.movedim(1, -1), i2.movedim(1, -1)) if cf else (i1, i2)
    clear = ~tanh_boundary_positions(x_last, levels, K)
    assert float(clear.float().mean()) > 0.8
    assert torch.equal(i1l[clear], i2l[clear])
    q1l, q2l = (q1.movedim(1, -1), q2.movedim(1, -1)) if cf else (q1, q2)
    assert torch.equal(q1l[clear], q2l[clear])
    d1l, d2l = (d1.movedim(1, -1), d2.movedim(1, -1)) if cf else (d1, d2)
    # tanh only: a one-ulp difference of t moves 1 - t*t by ~2 ulp(1), whatever its size
    torch.testing.assert_close(d2l[clear], d1l[clear], rtol=4e-7, atol=4 * 2.0 ** -23 * float(d1.abs().max()))


def test_fused_grouped_and_projections(seed):
    vq = pytest.importorskip("vector_quantize_pytorch", reason="vector-quantize-pytorch is not installed")
    for groups in (2, 4):
        kw = dict(dim=32, groups=groups, levels=[8, 5, 5, 5], num_quantizers=2)
        lib, ours = vq.GroupedResidualFSQ(**kw).eval(), GroupedResidualFSQ(backend="triton", **kw).eval()
        ours.load_state_dict(lib.state_dict())
        x = torch.randn(2, 300, 32)
        (q1, i1), (q2, i2) = lib(x), ours(x)
        assert i2.shape == i1.shape == (groups, 2, 300, 2)
        assert float((i1 == i2).float().mean()) > 0.99
        torch.testing.assert_close(q2, q1, rtol=0, atol=0.05)
        assert torch.equal(ours.get_output_from_indices(i2), q2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_fsq_bitwise_against_oracle(dtype, seed):
    from rfsq_kernels.kernels.vq.fsq import constant_table
    from rfsq_kernels.vqpytorch import FSQ

    levels = [3, 4, 5, 6, 7, 8, 16]
    consts, _ = constant_table(levels, "cpu")
    half_l, offset, shift, half_w = consts[0], consts[1], consts[2], consts[3]
    fsq = FSQ(levels=levels, backend="triton")
    shape = (2, 7, 20, 30)  # channel-first image: the library moves channels last
    x = (torch.randn(shape) * 1.5).to(dtype)
    g = torch.randn(shape).to(dtype).float()
    xx = x.clone().requires_grad_()
    q, idx = fsq(xx)
    (q.float() * g).sum().backward()
    z = x.float().movedim(1, -1)
    t = _interp_tanh(z + shift)
    rounded = (t * half_l - offset).round()
    rq = (rounded / half_w).movedim(-1, 1).to(dtype)
    ridx = ref.pack_digits(rounded + half_w, levels)
    gl = g.movedim(1, -1)
    rdx = (((gl / half_w) * half_l) * (1.0 - t.double() * t.double()).float()).movedim(-1, 1).to(dtype)
    assert torch.equal(idx, ridx)
    _assert_equal(q, rq, "codes", dtype == torch.bfloat16)
    _assert_equal(xx.grad, rdx, "grad z", dtype == torch.bfloat16)
    vq = pytest.importorskip("vector_quantize_pytorch", reason="vector-quantize-pytorch is not installed")
    q1, i1 = vq.FSQ(levels=levels)(x)
    assert float((i1 == idx).float().mean()) > 0.99


def test_custom_ops_opcheck(seed):
    """The fused ops' fake (meta) implementations, schemas and autograd registration agree with
    the real ones (torch.compile treats each as one opaque node)."""
    levels = [8, 5, 5, 5]
    x = torch.randn(2, 16, 4, requires_grad=True)
    scales, clamp = ref.stage_scales(levels, 3), ref.default_soft_clamp(levels)
    active = torch.full((2,), 2, dtype=torch.int32)
    torch.library.opcheck(torch.ops.rfsq_kernels.vq_rfsq_forward.default, (x, scales, clamp, None, active, levels))
    torch.library.opcheck(torch.ops.rfsq_kernels.vq_fsq_forward.default, (x, levels))


class _NoLaunch:
    """Stands in for a kernel: ``kernel[grid](...)`` does nothing (the host path alone is tested)."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def test_launch_host_path_reads_nothing_back_after_the_first_call(monkeypatch):
    """Issue 29 item 4: the constant tables are cached by the clamp tensor's identity and version,
    not its values, so a launch with a known configuration converts no tensor to Python (no
    device-to-host copy, no sync); an in-place change of the buffer rebuilds the table."""
    from rfsq_kernels.kernels.vq import fsq, residual_fsq

    for module, name in ((residual_fsq, "_fwd_vq_rfsq_kernel"), (residual_fsq, "_bwd_vq_rfsq_kernel"),
                         (fsq, "_fwd_vq_fsq_kernel"), (fsq, "_bwd_vq_fsq_kernel")):
        monkeypatch.setattr(module, name, _NoLaunch())
    levels = [8, 5, 5, 5]
    scales, clamp = ref.stage_scales(levels, 3), ref.default_soft_clamp(levels)
    x = torch.randn(2, 6, 4)
    active, mask = torch.full((2,), 2, dtype=torch.int32), torch.ones(2, 6, dtype=torch.bool)

    def launches():
        residual_fsq.forward(x, levels, scales, clamp, mask, active)
        residual_fsq.backward(x, x, levels, scales, clamp, mask, active)
        fsq.forward(x, levels)
        fsq.backward(x, x, levels)

    launches()  # first call with this configuration: builds the tables
    first = residual_fsq.constant_table(levels, clamp, x.device)[0]

    def no_conversion(*args, **kwargs):
        raise AssertionError("a tensor was converted to Python on the cached launch path")

    with monkeypatch.context() as m:
        for attr in ("tolist", "item", "__int__", "__float__", "__bool__", "__index__", "numpy", "cpu"):
            m.setattr(torch.Tensor, attr, no_conversion)
        launches()
        assert residual_fsq.constant_table(levels, clamp, x.device)[0] is first
    clamp.mul_(2)  # in place (e.g. load_state_dict): the version counter moves, the table is rebuilt
    rebuilt = residual_fsq.constant_table(levels, clamp, x.device)[0]
    assert rebuilt is not first and torch.equal(rebuilt[0], clamp) and torch.equal(rebuilt[1:], first[1:])


# -- autodiff beyond reverse mode (the guards of rfsq_kernels.autodiff, as for the RFSQ ops) ------
def _vq_pairs(seed):
    """(fused, reference) module pairs of both vq families, and an input/tangent pair."""
    from rfsq_kernels.vqpytorch import FSQ

    g = torch.Generator().manual_seed(seed)
    rfsq = [ResidualFSQ(levels=[8, 5, 5, 5], num_quantizers=2, backend=b).eval() for b in ("triton", "reference")]
    fsq = [FSQ(levels=[8, 5, 5, 5], backend=b).eval() for b in ("triton", "reference")]
    x, t = torch.randn(2, 6, 4, generator=g), torch.randn(2, 6, 4, generator=g)
    return (rfsq, fsq), x, t


def test_vq_jvp_forward_ad_and_vmap_give_the_reference(seed):
    import torch.autograd.forward_ad as fwAD

    pairs, x, t = _vq_pairs(seed)
    for fused, reference in pairs:
        want_out, want = torch.func.jvp(lambda v: reference(v)[0], (x,), (t,))
        out, got = torch.func.jvp(lambda v: fused(v)[0], (x,), (t,))
        assert want.abs().sum() > 0 and torch.equal(out, want_out) and torch.equal(got, want)
        with fwAD.dual_level():
            tangent = fwAD.unpack_dual(fused(fwAD.make_dual(x, t))[0]).tangent
        assert tangent is not None and torch.equal(tangent, want)
        xs = torch.stack([x, -x])
        got_q, got_i = torch.vmap(fused)(xs)
        want_q, want_i = zip(*(reference(v) for v in xs))
        assert torch.equal(got_q, torch.stack(want_q)) and torch.equal(got_i, torch.stack(want_i))


def test_vq_double_backward_is_one_clear_error(seed):
    pairs, x, _ = _vq_pairs(seed)
    for fused, _reference in pairs:
        xx = x.clone().requires_grad_()
        (g,) = torch.autograd.grad(fused(xx)[0].square().sum(), xx, create_graph=True)  # first order works
        with pytest.raises(RuntimeError, match=r"double backward .* fused (ResidualFSQ|FSQ) kernels is not "
                                               r"implemented; use backend='reference'"):
            g.sum().backward()


def test_vq_reference_route_keeps_the_fused_mask_contract(seed):
    """Under a transform, residual_fsq_fused's mask still zeroes masked positions with -1 indices."""
    import torch.autograd.forward_ad as fwAD

    levels = [8, 5, 5, 5]
    scales, clamp = ref.stage_scales(levels, 2), ref.default_soft_clamp(levels)
    x, mask = torch.randn(2, 6, 4), torch.rand(2, 6) > 0.5
    with fwAD.dual_level():
        q, idx = residual_fsq_fused(fwAD.make_dual(x, torch.ones_like(x)), levels, scales, clamp, mask=mask)
        q = fwAD.unpack_dual(q).primal
    rq, ridx = ref.residual_fsq_core(x, levels, scales, clamp)
    assert torch.equal(q[mask], rq[mask]) and torch.equal(idx[mask], ridx[mask])
    assert bool((q[~mask] == 0).all()) and bool((idx[~mask] == -1).all())
