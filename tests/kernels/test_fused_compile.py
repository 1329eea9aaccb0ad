"""torch.compile / torch.library / autocast integration of the fused op (CPU: Triton interpreter)."""
import pytest
import torch
from torch import nn

from fused_helpers import assert_close_grads, draw_input
import rfsq_kernels.fused  # noqa: F401  (registers the custom ops used directly below)
from rfsq_kernels import RFSQ
from rfsq_kernels.reference import STRATEGIES, get_strategy
from rfsq_kernels.testing import random_strategy_params


class _Tiny(nn.Module):
    """conv -> RFSQ -> conv, the shape of a tokenizer bottleneck."""

    def __init__(self, strategy: str, backend: str):
        super().__init__()
        self.enc = nn.Conv2d(3, 4, 1)
        self.quant = RFSQ(stages=2, strategy=strategy, levels=[8, 8, 8, 4], backend=backend)
        self.dec = nn.Conv2d(4, 3, 1)

    def forward(self, x):
        q, idx = self.quant(self.enc(x))
        return self.dec(q), idx


def _pair(strategy):
    torch.manual_seed(1234)
    fused = _Tiny(strategy, "triton")
    ref = _Tiny(strategy, "reference")
    ref.load_state_dict(fused.state_dict())
    return fused, ref


def _step(model, x):
    model.zero_grad()
    y, idx = model(x)
    y.square().mean().backward()
    module = getattr(model, "_orig_mod", model)  # compiled wrappers prefix parameter names
    return y, idx, {n: p.grad.clone() for n, p in module.named_parameters()}


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("strategy", ["scale", "layernorm"])
def test_compile_fullgraph(seed, strategy, backend):
    fused, ref = _pair(strategy)
    x = torch.randn(2, 3, 5, 7)
    compiled = torch.compile(fused, fullgraph=True, backend=backend)
    y, idx, grads = _step(compiled, x)
    ry, ridx, rgrads = _step(ref, x)
    assert torch.equal(idx, ridx)
    torch.testing.assert_close(y, ry, rtol=1e-5, atol=1e-5)
    for name in rgrads:
        assert_close_grads(grads[name], rgrads[name], name)


def test_autocast_bf16(seed):
    """Under CPU autocast the conv emits bf16; the op takes it as is, computes in fp32 and returns
    bf16 like the reference does."""
    fused, ref = _pair("layernorm")
    x = torch.randn(2, 3, 5, 7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, idx, grads = _step(fused, x)
        ry, ridx, rgrads = _step(ref, x)
        zq, _ = fused.quant(fused.enc(x))
    assert zq.dtype == torch.bfloat16
    assert torch.equal(idx, ridx)
    assert y.dtype == ry.dtype
    for name in rgrads:
        assert grads[name].dtype == rgrads[name].dtype, name
        assert torch.isfinite(grads[name]).all(), name
    torch.testing.assert_close(grads["quant.ln_weight"], rgrads["quant.ln_weight"], rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("sparse", [False, True], ids=["plain", "mask+counts"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_opcheck(seed, strategy, sparse):
    levels, stages = [8, 5, 3, 4], 2
    params = random_strategy_params(strategy, stages, len(levels), requires_grad=True)
    z = draw_input((2, 4, 3, 5), levels, stages, strategy, params).requires_grad_()
    spec = get_strategy(strategy)  # the op takes the parameter group in table order, kernel form
    group = [p.kernel_form(params[p.name].detach()).requires_grad_() for p in spec.params]
    mask = active = None
    if sparse:  # padding mask (B, *spatial) and per-sample stage counts (B,) int32
        mask, active = torch.rand(2, 3, 5) > 0.3, torch.tensor([1, 2], dtype=torch.int32)
    args = (z, group, mask, active, levels, stages, strategy, 1e-5, "atanh")
    # schema, autograd registration, fake tensor and aot_dispatch_dynamic (which runs the backward op)
    torch.library.opcheck(torch.ops.rfsq_kernels.rfsq_forward.default, args)


# -- issue 25, item 10: fullgraph with dynamic shapes, per-sample stage counts and decode --------------
# fullgraph=True refuses any graph break, and a host sync (.item(), bool(tensor), .tolist()) is one
# (capture_scalar_outputs is off), so these also show that forward and backward read nothing back.
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_compile_fullgraph_dynamic(seed, strategy):
    fused = RFSQ(stages=2, strategy=strategy, levels=[8, 5, 4], backend="triton")
    ref = RFSQ(stages=2, strategy=strategy, levels=[8, 5, 4], backend="reference")
    params = random_strategy_params(strategy, 2, 3)
    with torch.no_grad():
        for name, value in params.items():
            getattr(fused, name).copy_(value)
    ref.load_state_dict(fused.state_dict())
    compiled = torch.compile(fused, fullgraph=True, dynamic=True, backend="aot_eager")
    for i, shape in enumerate([(2, 3, 5, 7), (3, 3, 4, 6)]):
        z = draw_input(shape, [8, 5, 4], 2, strategy, params)
        zz, rz = z.clone().requires_grad_(), z.clone().requires_grad_()
        with torch.compiler.set_stance("fail_on_recompile") if i else torch.compiler.set_stance("default"):
            q, idx = compiled(zz)  # the second shape reuses the dynamic graph
            q.square().sum().backward()
        rq, ridx = ref(rz)
        rq.square().sum().backward()
        assert torch.equal(idx, ridx)
        torch.testing.assert_close(q, rq, rtol=1e-5, atol=1e-5)
        assert_close_grads(zz.grad, rz.grad, "z")
    for name in params:
        assert_close_grads(getattr(fused, name).grad, getattr(ref, name).grad, name)


def test_compile_fullgraph_per_sample_stages_and_mask(seed):
    levels, strategy = [8, 5, 4], "layernorm"
    fused = RFSQ(stages=3, strategy=strategy, levels=levels, backend="triton")
    ref = RFSQ(stages=3, strategy=strategy, levels=levels, backend="reference")
    params = random_strategy_params(strategy, 3, 3)
    with torch.no_grad():
        for name, value in params.items():
            getattr(fused, name).copy_(value)
    ref.load_state_dict(fused.state_dict())
    z = draw_input((3, 3, 4, 5), levels, 3, strategy, params)
    counts, mask = torch.tensor([0, 2, 3]), torch.rand(3, 4, 5) > 0.2
    compiled = torch.compile(fused, fullgraph=True, dynamic=True, backend="aot_eager")
    zz = z.clone().requires_grad_()
    q, idx = compiled(zz, mask=mask, stages=counts)
    q.square().sum().backward()
    rz = z.clone().requires_grad_()
    rq, ridx = ref(rz, mask=mask, stages=counts)
    rq.square().sum().backward()
    assert torch.equal(idx, ridx)
    torch.testing.assert_close(q, rq, rtol=1e-5, atol=1e-5)
    assert_close_grads(zz.grad, rz.grad, "z")
    assert_close_grads(fused.ln_weight.grad, ref.ln_weight.grad, "ln_weight")
    # the range check of the counts runs on the device (a device-side assert on CUDA)
    with pytest.raises(RuntimeError, match=r"per-sample stage counts outside \[0, 3\]"):
        compiled(z, stages=torch.tensor([0, 4, 1]))


def test_compile_fullgraph_decode(seed):
    m = RFSQ(stages=2, strategy="layernorm", levels=[8, 5, 4], backend="triton")
    z = torch.randn(2, 3, 4, 5)
    idx, side = m.encode(z)
    decode = torch.compile(m.decode, fullgraph=True, backend="aot_eager")
    assert torch.equal(decode(idx, side), m.decode(idx, side))
    with pytest.raises(RuntimeError, match="indices outside"):
        decode(idx + 200, side)
    bad = side.clone()
    bad[0, 0, 1, 0] = -1.0
    with pytest.raises(RuntimeError, match="std <= 0"):
        decode(idx, bad)


def test_compile_fullgraph_dynamic_quantize_dropout(seed):
    """Training with quantize dropout under a symbolic batch size: the per-sample counts are drawn
    on the device (randint's generator overload did not take a symbolic size)."""
    m = RFSQ(stages=3, strategy="layernorm", levels=[8, 5, 4], channel_first=False, dim=6, quantize_dropout=True,
             backend="triton").train()
    compiled = torch.compile(m, fullgraph=True, dynamic=True, backend="aot_eager")
    for batch in (3, 5):
        z = torch.randn(batch, 10, 6, requires_grad=True)
        mask = torch.rand(batch, 10) > 0.2
        q, idx = compiled(z, mask=mask)
        q.sum().backward()
        assert idx.shape == (batch, 10, 3) and torch.isfinite(z.grad).all()
        assert ((idx == -1) | mask[..., None]).all()
