"""The fused vector-quantize-pytorch ops' boundary (rfsq_kernels/vqpytorch/op_boundary.py): every
tensor a kernel reads is checked inside the custom ops, so a direct caller gets a clear error instead
of a kernel reading past a short tensor or reinterpreting a float mask; and a latent made under
``torch.inference_mode()`` trains through the fused path (what autograd saves is a normal copy)."""
from __future__ import annotations

import pytest
import torch

from rfsq_kernels.backend import interpreter_enabled
import rfsq_kernels.vqpytorch.fused  # noqa: F401  (registers the custom ops)
from rfsq_kernels.vqpytorch import ResidualFSQ

pytestmark = pytest.mark.skipif(not interpreter_enabled() and not torch.cuda.is_available(),
                                reason="needs TRITON_INTERPRET=1 (tests/conftest.py sets it) or a GPU")
DEV = "cuda" if torch.cuda.is_available() else "cpu"
LEVELS = [5, 5, 5, 5]
K = 2


def _args(B=2, N=6):
    m = ResidualFSQ(dim=len(LEVELS), levels=LEVELS, num_quantizers=K).to(DEV)
    x = torch.randn(B, N, len(LEVELS), device=DEV)
    return x, m.scales.float(), m.soft_clamp_input_value.float()


def _forward(x, scales, clamp, mask=None, active=None, levels=LEVELS):
    return torch.ops.rfsq_kernels.vq_rfsq_forward(x, scales, clamp, mask, active, levels)


BAD_FORWARD = [
    ("float mask", lambda x, s, c: dict(mask=torch.ones(x.shape[:2], device=DEV)), TypeError, "mask must be a bool"),
    ("int8 mask", lambda x, s, c: dict(mask=torch.ones(x.shape[:2], dtype=torch.int8, device=DEV)), TypeError,
     "mask must be a bool"),
    ("short mask", lambda x, s, c: dict(mask=torch.ones(x.shape[0], 3, dtype=torch.bool, device=DEV)), ValueError,
     r"mask must have shape \(B, \*spatial\) = \(2, 6\), got \(2, 3\)"),
    ("short active", lambda x, s, c: dict(active=torch.ones(1, dtype=torch.int32, device=DEV)), ValueError,
     r"active must have shape \(B,\) = \(2,\), got \(1,\)"),
    ("float active", lambda x, s, c: dict(active=torch.ones(2, device=DEV)), TypeError, "active must be an integer"),
    ("levels for 3 channels", lambda x, s, c: dict(levels=[5, 5, 5]), ValueError,
     r"x must have shape \(B, N, C\) with C = len\(levels\) = 3"),
    ("level 1", lambda x, s, c: dict(levels=[1, 5, 5, 5]), ValueError, r"levels\[0\]=1"),
    ("3-d scales", lambda x, s, c: dict(scales=s[None]), ValueError, r"scales must have shape \(K, C\)"),
    ("scales of 3 channels", lambda x, s, c: dict(scales=s[:, :3]), ValueError, r"scales must have shape \(K, C\)"),
    ("int scales", lambda x, s, c: dict(scales=s.int()), TypeError, "scales must be a float"),
    ("meta scales", lambda x, s, c: dict(scales=s.to("meta")), ValueError, "scales is on meta"),
    ("clamp of 3", lambda x, s, c: dict(clamp=torch.ones(3, device=DEV)), ValueError, "clamp_value must be a scalar"),
    ("int x", lambda x, s, c: dict(x=x.int()), TypeError, "x must be a float"),
    ("2-d x", lambda x, s, c: dict(x=x[0]), ValueError, r"x must have shape \(B, N, C\)"),
]


@pytest.mark.parametrize("case,change,error,match", BAD_FORWARD, ids=[c[0] for c in BAD_FORWARD])
def test_residual_fsq_op_refuses_what_its_kernel_cannot_read(case, change, error, match):
    x, scales, clamp = _args()
    kw = dict(x=x, scales=scales, clamp=clamp)
    kw.update(change(x, scales, clamp))
    with pytest.raises(error, match=match):
        _forward(**kw)
    with pytest.raises(error, match=match):  # the fake (traced) implementation checks the same
        with torch._subclasses.fake_tensor.FakeTensorMode(allow_non_fake_inputs=True):
            _forward(**kw)


def test_backward_ops_refuse_a_gradient_of_another_shape():
    x, scales, clamp = _args()
    with pytest.raises(ValueError, match=r"grad_q must have x's shape \(2, 6, 4\)"):
        torch.ops.rfsq_kernels.vq_rfsq_backward(x[:1], x, scales, clamp, None, None, LEVELS)
    with pytest.raises(ValueError, match=r"grad must have x's shape \(2, 6, 4\)"):
        torch.ops.rfsq_kernels.vq_fsq_backward(x[:1], x, LEVELS)
    with pytest.raises(TypeError, match="grad_q must be a float"):
        torch.ops.rfsq_kernels.vq_rfsq_backward(x.int(), x, scales, clamp, None, None, LEVELS)


def test_fsq_op_refuses_levels_of_another_width():
    x, _, _ = _args()
    with pytest.raises(ValueError, match=r"C = len\(levels\) = 2"):
        torch.ops.rfsq_kernels.vq_fsq_forward(x, [5, 5])
    with pytest.raises(TypeError, match="x must be a float"):
        torch.ops.rfsq_kernels.vq_fsq_forward(x.int(), LEVELS)


def test_inference_mode_input_trains_through_the_fused_residual_fsq(seed):
    """Trainable scales (a user's fine-tuning) with a latent from ``inference_mode`` (cached
    features): the op saves a normal copy of the input, and the gradients equal those from a
    normal copy of the same latent."""
    mods = [ResidualFSQ(dim=len(LEVELS), levels=LEVELS, num_quantizers=K).to(DEV) for _ in range(2)]
    for m in mods:
        m.scales = torch.nn.Parameter(m.scales.clone())
    x0 = torch.randn(2, 6, len(LEVELS), device=DEV)
    with torch.inference_mode():
        x = x0.clone()
    assert x.is_inference()
    results = []
    for m, inp in zip(mods, (x, x0)):
        q, idx = m(inp)
        (q * torch.linspace(-1, 1, q.numel(), device=DEV).view_as(q)).sum().backward()
        results.append((q, idx, m.scales.grad))
    (q, idx, g), (rq, ridx, rg) = results
    assert torch.equal(idx, ridx) and torch.equal(q, rq)
    assert g is not None and torch.equal(g, rg)
