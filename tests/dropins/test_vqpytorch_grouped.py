"""GroupedResidualFSQ on the fused path: every group in one kernel launch per direction, each
group's values, indices and gradients (input and parameters) bitwise what its own ResidualFSQ
computes; and the drop-ins' cached forward and backward read nothing back from the device."""
from __future__ import annotations

import pytest
import torch

from rfsq_kernels.backend import interpreter_enabled
from rfsq_kernels.kernels.vq import fsq as fsq_kernels
from rfsq_kernels.kernels.vq import residual_fsq as rfsq_kernels
from rfsq_kernels.vqpytorch import FSQ, GroupedResidualFSQ, ResidualFSQ
from rfsq_kernels.vqpytorch import fused as _fused  # noqa: F401  (registers the custom ops)

pytestmark = pytest.mark.skipif(not interpreter_enabled() and not torch.cuda.is_available(),
                                reason="needs TRITON_INTERPRET=1 (tests/conftest.py sets it) or a GPU")
DEV = "cuda" if torch.cuda.is_available() else "cpu"

GROUPED = [  # (constructor kwargs, input shape): each layout the module prepares differently
    (dict(dim=16, groups=4, levels=[8, 5, 5, 5], num_quantizers=3), (2, 40, 16)),   # channel slices, no copy
    (dict(dim=24, groups=3, levels=[8, 5, 5, 5], num_quantizers=2), (2, 5, 6, 24)),  # projections (float32 only)
    (dict(dim=8, groups=2, levels=[5] * 4, num_quantizers=2, accept_image_fmap=True), (2, 8, 5, 6)),
    (dict(dim=8, groups=2, levels=[5] * 4, num_quantizers=2, accept_image_fmap=True, is_channel_first=True),
     (2, 8, 5, 6)),
]


def _run(module, x, g, seed):
    """Outputs of ``module(x)`` and the gradients of ``sum(quantized * g)`` w.r.t. x and every parameter."""
    x = x.detach().clone().requires_grad_()
    module.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the quantize dropout seed
    q, idx = module(x)
    (q.float() * g).sum().backward()
    grads = {name: p.grad for name, p in module.named_parameters()}
    return q, idx, x.grad, grads


class _Count:
    """Wraps a kernel module's ``launch``: counts the launches of each kernel, then launches."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def __call__(self, kernel, *args, **kwargs):
        self.calls.append(kernel)
        return self.inner(kernel, *args, **kwargs)


def _per_group(monkeypatch):
    """Make GroupedResidualFSQ run its groups one ResidualFSQ call each (the path to compare with)."""
    monkeypatch.setattr(GroupedResidualFSQ, "_fused_groups", lambda self, x: False)


@pytest.mark.parametrize("kw,shape,dtype", [(kw, shape, dtype) for kw, shape in GROUPED
                                             for dtype in (torch.float32, torch.bfloat16)
                                             if dtype == torch.float32 or kw["dim"] == kw["groups"] * len(kw["levels"])])
def test_grouped_one_launch_equals_per_group_bitwise(kw, shape, dtype, monkeypatch, seed):
    dropout = dict(quantize_dropout=True, quantize_dropout_cutoff_index=1) if kw["num_quantizers"] > 2 else {}
    module = GroupedResidualFSQ(backend="triton", **kw, **dropout).to(DEV)
    module.train(bool(dropout))
    x = (torch.randn(shape, device=DEV) * 1.5).to(dtype)
    g = torch.randn(shape, device=DEV)
    count = _Count(rfsq_kernels.launch)
    with monkeypatch.context() as m:
        m.setattr(rfsq_kernels, "launch", count)
        fused = _run(module, x, g, seed)
    assert count.calls == [rfsq_kernels._fwd_vq_rfsq_kernel, rfsq_kernels._bwd_vq_rfsq_kernel]
    with monkeypatch.context() as m:
        _per_group(m)
        count = _Count(rfsq_kernels.launch)
        m.setattr(rfsq_kernels, "launch", count)
        expected = _run(module, x, g, seed)
    assert len(count.calls) == 2 * kw["groups"]  # what the one launch replaces
    (q, idx, dx, grads), (eq, eidx, edx, egrads) = fused, expected
    assert q.dtype == eq.dtype and q.shape == eq.shape and q.stride() == eq.stride()
    assert torch.equal(q, eq) and torch.equal(idx, eidx) and idx.dtype == eidx.dtype
    assert dx.shape == edx.shape and torch.equal(dx, edx)
    assert grads.keys() == egrads.keys()
    for name in grads:
        assert torch.equal(grads[name], egrads[name]), name
    if dropout:
        assert idx.dtype == torch.int64  # the per-sample stage counts reached the kernel


def test_grouped_return_all_codes_and_buffers_per_group(monkeypatch, seed):
    """Each group keeps its own buffers: one group's changed scales change only its slice."""
    kw = dict(dim=16, groups=4, levels=[8, 5, 5, 5], num_quantizers=2)
    module = GroupedResidualFSQ(backend="triton", **kw).to(DEV).eval()
    module.rvqs[2].scales.mul_(0.5)
    module.rvqs[1].soft_clamp_input_value.mul_(0.75)
    x = torch.randn(2, 30, 16, device=DEV)
    q, idx, codes = module(x, return_all_codes=True)
    with monkeypatch.context() as m:
        _per_group(m)
        eq, eidx, ecodes = module(x, return_all_codes=True)
    assert torch.equal(q, eq) and torch.equal(idx, eidx)
    assert len(codes) == len(ecodes) == 4 and all(torch.equal(a, b) for a, b in zip(codes, ecodes))


# -- no host sync after the first call with a configuration ---------------------------------------
_CONVERSIONS = ("tolist", "item", "__int__", "__float__", "__bool__", "__index__", "numpy", "cpu")


def _no_conversion(*args, **kwargs):
    raise AssertionError("a tensor was converted to Python on a cached forward or backward")


@pytest.mark.parametrize("make,shape", [
    (lambda: ResidualFSQ(levels=[8, 5, 5, 5], num_quantizers=3, backend="triton"), (2, 6, 4)),
    (lambda: ResidualFSQ(levels=[8, 5, 5, 5], num_quantizers=3, dim=8, quantize_dropout=True,
                         backend="triton").train(), (2, 6, 8)),
    (lambda: FSQ(levels=[8, 5, 5, 5], backend="triton"), (2, 6, 4)),
    (lambda: GroupedResidualFSQ(dim=16, groups=4, levels=[8, 5, 5, 5], num_quantizers=3, backend="triton"),
     (2, 6, 16)),
    (lambda: GroupedResidualFSQ(dim=16, groups=2, levels=[8, 5, 5, 5], num_quantizers=3, backend="triton"),
     (2, 6, 16)),
])
def test_cached_forward_and_backward_read_nothing_back(make, shape, monkeypatch):
    """After the first call with a configuration, the drop-ins' forward and backward convert no
    tensor to Python (no device-to-host copy, no sync). The kernels are not started (their
    launches are stubbed: the interpreter itself reads tensors through NumPy), so the host path
    alone is under test. Quantize dropout draws its seed with ``.item()`` like the library, so
    that module is called with a fixed seed."""
    launches = []
    for module in (rfsq_kernels, fsq_kernels):
        monkeypatch.setattr(module, "launch", lambda kernel, *a, **k: launches.append(kernel))
    quantizer = make().to(DEV)
    kw = {"rand_quantize_dropout_fixed_seed": 3} if getattr(quantizer, "quantize_dropout", False) else {}
    x = torch.randn(shape, device=DEV, requires_grad=True)

    def call():
        out = quantizer(x, **kw)
        out[0].sum().backward()

    call()  # the first call with this configuration builds the constant tables
    first = len(launches)
    with monkeypatch.context() as m:
        for attr in _CONVERSIONS:
            m.setattr(torch.Tensor, attr, _no_conversion)
        call()
        call()
    assert len(launches) == 3 * first and first == 2


def test_grouped_op_opcheck_and_boundary(seed):
    """The grouped op's fake implementation, schema and autograd registration agree with the real
    ones; a table list that does not match the groups is a clear error."""
    from rfsq_kernels.vqpytorch import reference as ref

    levels = [8, 5, 5, 5]
    x = torch.randn(3, 2, 16, 4, device=DEV, requires_grad=True)
    scales = [ref.stage_scales(levels, 2).to(DEV) for _ in range(3)]
    clamps = [ref.default_soft_clamp(levels).to(DEV) for _ in range(3)]
    active = torch.full((2,), 1, dtype=torch.int32, device=DEV)
    op = torch.ops.rfsq_kernels.vq_grouped_rfsq_forward.default
    torch.library.opcheck(op, (x, scales, clamps, active, levels))
    with pytest.raises(ValueError, match="one tensor per group"):
        op(x, scales[:2], clamps, None, levels)
    with pytest.raises(ValueError, match=r"\(G, B, N, C\)"):
        op(x[0], scales, clamps, None, levels)
