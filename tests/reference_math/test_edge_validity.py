"""No silent wrong results at the edges (issue 18, items 1-5): levels whose codes cannot be exact,
float32 constants, forward-mode AD and double backward through the fused path, corrupted side
information, dtype and rank consistency with ``dim=`` projections."""
from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD

import rfsq_kernels.fused  # noqa: F401  (imports triton under conftest's TRITON_INTERPRET, like the fused tests)
from rfsq_kernels import FSQ, RFSQ
from rfsq_kernels.fused import rfsq_fused
from rfsq_kernels.reference import STRATEGIES, fsq_quantize, rfsq_decode_stages, rfsq_forward
from rfsq_kernels.testing import randomize_


# -- 1. levels ------------------------------------------------------------------------------------
@pytest.mark.parametrize("levels,match", [
    ([2**32, 2**32], r"levels\[0\]=4294967296: every level count must be <= 2\*\*24 .*float32"),
    ([2**24 + 1], r"levels\[0\]=16777217: every level count must be <= 2\*\*24"),
    ([2] * 70, r"prod\(levels\) = 2\*\*70.0 codes, more than the 2\*\*63 that int64 indices"),
    ([2**24, 2**24, 2**16], r"more than the 2\*\*63"),
], ids=["2^32x2", "2^24+1", "2x70", "prod-2^64"])
def test_levels_whose_codes_cannot_be_exact_are_refused_everywhere(levels, match):
    z = torch.zeros(1, len(levels), 2)
    for build in (lambda: RFSQ(stages=1, levels=levels), lambda: FSQ(levels),
                  lambda: rfsq_forward(z, levels, 1, "none"), lambda: fsq_quantize(z, levels),
                  lambda: rfsq_decode_stages(torch.zeros(1, 2, 1, dtype=torch.int64), levels, "none"),
                  lambda: rfsq_fused(z, levels, 1, "none")):
        with pytest.raises(ValueError, match=match):
            build()


@pytest.mark.parametrize("levels", [[2] * 63, [2**24, 2**24, 2**15], [2**24]], ids=["2x63", "prod-2^63", "2^24"])
def test_levels_at_the_limits_round_trip_exactly(seed, levels):
    torch.manual_seed(seed)
    m = RFSQ(stages=2, strategy="layernorm", levels=levels)
    z = torch.randn(2, len(levels), 3, 5) * 2
    quantized, indices = m(z)
    idx, side = m.encode(z)
    assert indices.min() >= 0 and torch.equal(idx, indices)
    assert torch.equal(m.decode(idx, side), quantized)


# -- 2. float32 constants ---------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,match", [
    ({"eps": 1e-50}, r"eps=1e-50 must lie in \[1.1754944e-38, 3.4028235e\+38\] \(the layernorm variance epsilon\).*0.0"),
    ({"eps": 1e39}, r"eps=1e\+39 must lie in .*inf"),
    ({"eps": 1e-40}, r"eps=1e-40 must lie in .*subnormal"),
    ({"initial_scale": 1e-50}, r"initial_scale=1e-50 must lie in \[1e-18, 3.4028235e\+38\]"),
    ({"initial_scale": 1e39}, r"initial_scale=1e\+39 must lie in .*inf"),
    ({"initial_scale": 0.0}, r"initial_scale must be a finite number > 0"),
])
def test_constants_outside_float32_are_refused_with_the_range(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RFSQ(stages=2, strategy="scale", **kwargs)
    if "eps" in kwargs:
        z = torch.zeros(1, 4, 2)
        for call in (lambda: rfsq_forward(z, [8, 8, 8, 4], 1, "none", **kwargs),
                     lambda: rfsq_fused(z, [8, 8, 8, 4], 1, "none", **kwargs)):
            with pytest.raises(ValueError, match=match):
                call()


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("initial_scale", [1e-18, 1e-12, 1e30, 3.4e38])
def test_initial_scale_at_the_ends_of_its_range_stays_finite(seed, backend, initial_scale):
    torch.manual_seed(seed)
    m = RFSQ(stages=2, strategy="scale", initial_scale=initial_scale, backend=backend)
    a = torch.nn.functional.softplus(m.scale_param)
    assert (a >= torch.finfo(torch.float32).tiny).all() and torch.isfinite(a).all()
    z = (torch.randn(2, 4, 3, 5) * 3).requires_grad_()
    quantized, _ = m(z)
    quantized.square().sum().backward()
    assert torch.isfinite(quantized).all() and torch.isfinite(z.grad).all() and torch.isfinite(m.scale_param.grad).all()


# -- 3. forward-mode AD, torch.func, double backward -----------------------------------------------
def _pair(strategy, seed):
    g = torch.Generator().manual_seed(seed)
    fused = randomize_(RFSQ(stages=2, strategy=strategy, backend="triton"), generator=g)
    ref = RFSQ(stages=2, strategy=strategy, backend="reference")
    ref.load_state_dict(fused.state_dict())
    z, t = torch.randn(2, 4, 4, 5, generator=g), torch.randn(2, 4, 4, 5, generator=g)
    return fused, ref, z, t


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_func_jvp_and_forward_ad_give_the_reference_tangent(seed, strategy):
    fused, ref, z, t = _pair(strategy, seed)
    want_out, want = torch.func.jvp(lambda x: ref(x)[0], (z,), (t,))
    out, got = torch.func.jvp(lambda x: fused(x)[0], (z,), (t,))
    assert want.abs().sum() > 0 and torch.equal(out, want_out) and torch.equal(got, want)
    with fwAD.dual_level():
        tangent = fwAD.unpack_dual(fused(fwAD.make_dual(z, t))[0]).tangent
    assert tangent is not None and torch.equal(tangent, want)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_func_grad_gives_the_reference_gradient(seed, strategy):
    fused, ref, z, _ = _pair(strategy, seed)
    want = torch.func.grad(lambda x: ref(x)[0].square().sum())(z)
    got = torch.func.grad(lambda x: fused(x)[0].square().sum())(z)
    assert want.abs().sum() > 0 and torch.equal(got, want)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_vmap_over_the_fused_path_equals_a_loop(seed, strategy):
    fused, ref, z, _ = _pair(strategy, seed)
    zs = torch.stack([z, -z])
    assert torch.equal(torch.vmap(lambda x: fused(x)[0])(zs), torch.stack([ref(x)[0] for x in zs]))


def test_double_backward_through_the_fused_path_is_one_clear_error(seed):
    fused, ref, z, _ = _pair("layernorm", seed)
    z = z.requires_grad_()
    (g,) = torch.autograd.grad(fused(z)[0].square().sum(), z, create_graph=True)  # first order still works
    (g_ref,) = torch.autograd.grad(ref(z)[0].square().sum(), z, create_graph=True)
    torch.testing.assert_close(g, g_ref)
    with pytest.raises(RuntimeError, match=r"double backward .* fused RFSQ kernels is not implemented; use "
                                           r"backend='reference'"):
        g.sum().backward()
    g_ref.sum().backward()  # the named workaround does it
    assert z.grad is not None


# -- 4. side information ---------------------------------------------------------------------------
@pytest.mark.parametrize("value,match", [(float("nan"), "non-finite std"), (0.0, r"std <= 0"), (-1.0, r"std <= 0"),
                                         (float("inf"), "non-finite std")])
def test_decode_rejects_corrupted_std(seed, value, match):
    torch.manual_seed(seed)
    m = RFSQ(stages=2, strategy="layernorm")
    idx, side = m.encode(torch.randn(2, 4, 3, 5))
    bad = side.clone()
    bad[1, 1, 1, 2] = value
    for call in (lambda: m.decode(idx, bad), lambda: m.decode_stages(idx, bad),
                 lambda: m.get_codes_from_indices(idx, bad)):
        with pytest.raises(ValueError, match=match):
            call()
    bad = side.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite mean"):
        m.decode(idx, bad)


# -- 5. dtype and rank -----------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("channel_first", [True, False])
def test_projections_take_bf16_like_the_plain_module(seed, backend, channel_first):
    torch.manual_seed(seed)
    m = RFSQ(stages=2, strategy="layernorm", dim=16, backend=backend, channel_first=channel_first)
    shape = (2, 16, 4, 4) if channel_first else (2, 4, 4, 16)
    z = torch.randn(shape).bfloat16().requires_grad_()
    quantized, _ = m(z)
    quantized.float().sum().backward()
    assert quantized.dtype == torch.bfloat16 and quantized.shape == z.shape and z.grad.dtype == torch.bfloat16
    idx, side = m.encode(z)
    decoded = m.decode(idx, side, dtype=torch.bfloat16)
    assert decoded.dtype == torch.bfloat16 and torch.equal(decoded, quantized.detach())


def test_ranks_are_the_same_for_encoders_and_decoders():
    m = RFSQ(stages=2, strategy="none")
    for z in (torch.randn(2, 4, 2, 2, 2, 2), torch.randn(2, 4, 1, 1, 1, 1, 1)):
        for call in (lambda: m(z), lambda: m.encode(z), lambda: m.quantize(z), lambda: FSQ([8, 8, 8, 4])(z)):
            with pytest.raises(ValueError, match=r"1 to 3 spatial dims"):
                call()
    with pytest.raises(ValueError, match=r"1 to 3 spatial dims"):
        m.decode(torch.zeros(2, 2, 2, 2, 2, 2, dtype=torch.int32))
    for z in (torch.randn(3, 4), torch.randn(3, 4, 5), torch.randn(3, 4, 5, 2), torch.randn(3, 4, 5, 2, 2)):
        q, idx = m(z)
        assert torch.equal(m.decode(idx), q)
