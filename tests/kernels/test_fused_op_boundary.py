"""The boundary of the fused custom ops (issue 25, items 2 and 11): every tensor a kernel reads is
checked (dtype, device, shape) or made contiguous there, whoever calls it; inputs made under
``torch.inference_mode()`` train on the fused path (CPU: Triton interpreter)."""
import pytest
import torch
from torch.nn.utils import parametrize

from fused_helpers import assert_close_grads, assert_close_values, draw_input
from rfsq_kernels import RFSQ
from rfsq_kernels.fused import rfsq_fused
from rfsq_kernels.reference import get_strategy, rfsq_forward
from rfsq_kernels.testing import random_strategy_params

LEVELS, STAGES = [8, 5, 4], 3


def _views(strategy, kind):
    """Leaves and the strided parameter views built from them (expanded: one row shared by every
    stage; transposed: a (C, K) leaf seen as (K, C))."""
    dense = random_strategy_params(strategy, STAGES, len(LEVELS))
    leaves, views = {}, {}
    for name, p in dense.items():
        if kind == "expanded":
            leaf = p[:1].clone().requires_grad_()
            views[name] = lambda leaf=leaf, shape=p.shape: leaf.expand(shape)
        else:
            # (contiguous(), not clone(): clone keeps the transposed strides, and leaf.t() would be dense)
            leaf = p.t().contiguous().requires_grad_() if p.ndim == 2 else p.flip(0).contiguous().requires_grad_()
            views[name] = (lambda leaf=leaf: leaf.t()) if p.ndim == 2 else (lambda leaf=leaf: leaf.flip(0))
        leaves[name] = leaf
    return leaves, views


@pytest.mark.parametrize("kind", ["expanded", "transposed"])
@pytest.mark.parametrize("strategy", ["scale", "layernorm"])
def test_strided_parameters_match_the_reference(seed, strategy, kind):
    leaves, views = _views(strategy, kind)
    materialized = {n: v().detach().contiguous() for n, v in views.items()}
    z = draw_input((2, len(LEVELS), 5, 6), LEVELS, STAGES, strategy, materialized)
    outs, grads = [], []
    assert all(not v().is_contiguous() for v in views.values() if v().ndim == 2 or kind == "expanded")
    for fn in (rfsq_fused, rfsq_forward):
        for leaf in leaves.values():
            leaf.grad = None
        zz = z.clone().requires_grad_()
        q, idx, mean, std = fn(zz, LEVELS, STAGES, strategy, **{n: v() for n, v in views.items()})
        (q * torch.linspace(-1, 1, q.numel()).view_as(q)).sum().backward()
        outs.append((q, idx, mean, std))
        grads.append({"z": zz.grad, **{n: leaf.grad.clone() for n, leaf in leaves.items()}})
    (q, idx, mean, std), (rq, ridx, rmean, rstd) = outs
    assert torch.equal(idx, ridx), f"{int((idx != ridx).sum())} indices differ"
    assert_close_values(q, rq, "quantized")
    assert_close_values(mean, rmean, "mean")
    for name in grads[1]:
        assert_close_grads(grads[0][name], grads[1][name], name)


def test_parametrized_shared_gain_matches_the_reference(seed):
    """The report's case: a parametrization sharing one layernorm gain across stages."""
    class Share(torch.nn.Module):
        def forward(self, p):
            return p[:1].expand_as(p)

    mods = [RFSQ(stages=STAGES, strategy="layernorm", levels=LEVELS, backend=b) for b in ("triton", "reference")]
    with torch.no_grad():
        mods[0].ln_weight.uniform_(0.5, 1.5)
        mods[0].ln_bias.uniform_(-0.3, 0.3)
    mods[1].load_state_dict(mods[0].state_dict())
    for m in mods:
        parametrize.register_parametrization(m, "ln_weight", Share())
    params = {"ln_weight": mods[0].ln_weight.detach(), "ln_bias": mods[0].ln_bias.detach()}
    z = draw_input((2, len(LEVELS), 4, 6), LEVELS, STAGES, "layernorm", params)
    (q, idx), (rq, ridx) = mods[0](z), mods[1](z)
    assert torch.equal(idx, ridx)
    assert_close_values(q, rq, "quantized")


def _bad_calls():
    z = torch.randn(3, len(LEVELS), 4, 4)
    good = random_strategy_params("layernorm", STAGES, len(LEVELS))
    return z, good, [
        (dict(active_stages=torch.tensor([1, 2], dtype=torch.int32)), ValueError,
         r"active_stages must have shape \(B,\) = \(3,\), got \(2,\)"),
        (dict(active_stages=torch.ones(3)), TypeError, "active_stages must be an integer"),
        (dict(mask=torch.ones(3, 4, 4)), TypeError, "mask must be a bool tensor"),
        (dict(mask=torch.ones(3, 4, 5, dtype=torch.bool)), ValueError, r"mask must have shape \(B, \*spatial\)"),
        (dict(ln_weight=good["ln_weight"].to("meta")), ValueError, "ln_weight is on meta but z is on cpu"),
        (dict(ln_bias=good["ln_bias"][:2]), ValueError, r"needs ln_bias of shape \(3, 3\), got \(2, 3\)"),
        (dict(ln_bias=good["ln_bias"].int()), TypeError, "needs ln_bias as a float tensor"),
    ]


@pytest.mark.parametrize("case", range(7))
def test_bad_tensors_are_refused_like_the_reference(case):
    z, good, calls = _bad_calls()
    change, exc, match = calls[case]
    kwargs = {**good, **change}
    for fn in (rfsq_fused, rfsq_forward):
        with pytest.raises(exc, match=match):
            fn(z, LEVELS, STAGES, "layernorm", **kwargs)


def test_the_custom_op_checks_and_copies_what_it_reads(seed):
    """Direct callers of torch.ops.rfsq_kernels.* get the same checks; strided parameters are copied."""
    spec = get_strategy("layernorm")
    params = random_strategy_params("layernorm", STAGES, len(LEVELS))
    z = draw_input((2, len(LEVELS), 4, 5), LEVELS, STAGES, "layernorm", params)
    group = [params[p.name] for p in spec.params]
    strided = [p.t().contiguous().t() for p in group]  # same values, transposed memory
    op = torch.ops.rfsq_kernels.rfsq_forward
    want = op(z, group, None, None, LEVELS, STAGES, "layernorm", 1e-5, "atanh")
    got = op(z, strided, None, None, LEVELS, STAGES, "layernorm", 1e-5, "atanh")
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match=r"active_stages must have shape \(B,\) = \(2,\)"):
        op(z, group, None, torch.ones(1, dtype=torch.int32), LEVELS, STAGES, "layernorm", 1e-5, "atanh")
    with pytest.raises(ValueError, match="has 4 channels"):
        op(torch.randn(2, 4, 4, 5), group, None, None, LEVELS, STAGES, "layernorm", 1e-5, "atanh")
    with pytest.raises(ValueError, match="takes 2 parameter tensors"):
        op(z, group[:1], None, None, LEVELS, STAGES, "layernorm", 1e-5, "atanh")
    _, indices, mean, std = want
    backward = torch.ops.rfsq_kernels.rfsq_backward
    g = torch.ones_like(z)
    with pytest.raises(ValueError, match="mean must be the forward's float32"):
        backward(g, z, group, indices, mean[:1], std, None, None, LEVELS, STAGES, "layernorm", "atanh")
    # The backward rebuilds the residuals from the indices: they must be the forward's.
    for bad in (None, indices.long(), indices[..., :1], indices.float()):
        with pytest.raises(ValueError, match=r"indices must be the forward's torch.int32 \(2, 4, 5, 3\) indices"):
            backward(g, z, group, bad, mean, std, None, None, LEVELS, STAGES, "layernorm", "atanh")
    got_grads = backward(g, z, group, indices.transpose(1, 2).contiguous().transpose(1, 2), mean, std, None, None,
                         LEVELS, STAGES, "layernorm", "atanh")
    for a, b in zip(got_grads, backward(g, z, group, indices, mean, std, None, None, LEVELS, STAGES, "layernorm",
                                        "atanh")):
        assert torch.equal(a, b)


@pytest.mark.parametrize("strategy", ["scale", "layernorm"])
def test_inference_mode_input_trains_on_the_fused_path(seed, strategy):
    """A latent made under inference_mode (a cached dataset's features) trains the quantizer's
    parameters: the fused op saves a normal copy of it, and the gradients equal the reference's."""
    mods = [RFSQ(stages=2, strategy=strategy, levels=LEVELS, backend=b) for b in ("triton", "reference")]
    params = random_strategy_params(strategy, 2, len(LEVELS))
    with torch.no_grad():
        for name, value in params.items():
            getattr(mods[0], name).copy_(value)
    mods[1].load_state_dict(mods[0].state_dict())
    z0 = draw_input((2, len(LEVELS), 4, 5), LEVELS, 2, strategy, params)
    with torch.inference_mode():
        z = z0.clone()
        inside = mods[0](z)[0]
    assert z.is_inference() and inside.is_inference()
    results = []
    for m, x in zip(mods, (z, z0)):  # (the reference's scale math cannot save an inference tensor either)
        q, idx = m(x)
        (q * torch.linspace(-1, 1, q.numel()).view_as(q)).sum().backward()
        results.append((q, idx, {n: p.grad for n, p in m.named_parameters()}))
    (q, idx, g), (rq, ridx, rg) = results
    assert torch.equal(idx, ridx)
    assert_close_values(q, rq, "quantized")
    for name in rg:
        assert_close_grads(g[name], rg[name], name)


def test_no_tensor_is_saved_when_nothing_needs_a_gradient(seed):
    m = RFSQ(stages=2, strategy="layernorm", levels=LEVELS, backend="triton")
    saved = []
    z = torch.randn(2, len(LEVELS), 4, 4)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        with torch.no_grad():
            m(z)
        m.requires_grad_(False)
        m(z)
        assert saved == []
        m.requires_grad_(True)
        m(z)
    assert saved, "with trainable parameters the backward needs z (every parameter gradient replays from it)"


@pytest.mark.parametrize("strategy", ["none", "layernorm"])
def test_int64_stage_counts_beyond_int32_are_not_wrapped(seed, strategy):
    """``active_stages`` is read as int64 by the reference (``count > k``): a count of ``2**32 + 1``
    runs every stage and a negative one none. The kernels read int32; a bare cast would wrap
    ``2**32 + 1`` to 1 and silently drop stages (audit, 2026-12-02)."""
    params = random_strategy_params(strategy, STAGES, len(LEVELS))
    z = draw_input((3, len(LEVELS), 4, 5), LEVELS, STAGES, strategy, params)
    counts = torch.tensor([2**32 + 1, -(2**40), 2], dtype=torch.int64)
    fused = rfsq_fused(z, LEVELS, STAGES, strategy, active_stages=counts, **params)
    ref = rfsq_forward(z, LEVELS, STAGES, strategy, active_stages=counts, **params)
    assert torch.equal(fused[1], ref[1])
    assert_close_values(fused[0], ref[0], "quantized")

