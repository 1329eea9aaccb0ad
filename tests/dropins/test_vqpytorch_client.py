"""vector-quantize-pytorch's own client code with the import swapped (issue 30, item 1).

This project's test-only copies of the *structure* of the library's tests (``tests/test_readme.py``
of 1.32.0: ``test_fsq``, ``test_fsq_without_indices``, ``test_rfsq``; it has no
GroupedResidualFSQ test, so one in the same style is added) and of its FSQ example
(``examples/autoencoder_fsq.py``: a conv autoencoder around ``FSQ([8, 6, 5])`` inside the
library's ``Sequential``, AdamW, L1 loss), on the reference path and on the fused path.

Reference path: bitwise the library (values, indices, every gradient, the loss curve, the final
weights, output strides). Fused path: bitwise the library run with the tanh the kernels use
(the interpreter's fallback here, ``tests/vq_client_helpers.py``), since tanh is the one
operation whose last bit differs (docs/migrating-from-vector-quantize-pytorch.md).
"""
from __future__ import annotations

import pytest
import torch

from rfsq_kernels.backend import interpreter_enabled
from vq_client_helpers import library_rfsq_with_kernel_tanh, library_with_kernel_tanh

vq = pytest.importorskip("vector_quantize_pytorch", reason="vector-quantize-pytorch is not installed")
import vector_quantize_pytorch.utils as vq_utils  # noqa: E402
from vector_quantize_pytorch.utils import Sequential  # noqa: E402

from rfsq_kernels import vqpytorch as ours  # noqa: E402


def _klasses():
    # read at call time: registration rebinds the library's tuple (the Sequential reads it so too)
    return vq_utils.QUANTIZE_KLASSES

FUSED_OK = interpreter_enabled() or torch.cuda.is_available()
BACKENDS = ["reference", pytest.param("triton", marks=pytest.mark.skipif(not FUSED_OK, reason="no interpreter/GPU"))]
pytestmark = pytest.mark.filterwarnings("ignore:.*running the reference path")


def _grad_run(module, x, **kw):
    x = x.detach().clone().requires_grad_()
    out = module(x, **kw)
    out[0].float().square().sum().backward()
    return out, x.grad


# -- tests/test_readme.py::test_fsq -----------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("preserve_symmetry", [True, False])
@pytest.mark.parametrize("bound_hard_clamp", [True, False])
def test_readme_fsq(preserve_symmetry, bound_hard_clamp, backend, seed, monkeypatch):
    levels = [8, 5, 5, 5]
    quantizer = ours.FSQ(levels, preserve_symmetry=preserve_symmetry, bound_hard_clamp=bound_hard_clamp,
                         backend=backend)
    lib = vq.FSQ(levels, preserve_symmetry=preserve_symmetry, bound_hard_clamp=bound_hard_clamp)
    x = torch.randn(1, 1024, 4)
    (xhat, indices), gx = _grad_run(quantizer, x)
    assert torch.all(xhat == quantizer.indices_to_codes(indices))  # the library test's own assertion
    fused = backend == "triton" and quantizer.fused_supported() is None
    if fused:
        library_with_kernel_tanh(monkeypatch)
    (lhat, lidx), lgx = _grad_run(lib, x)
    assert torch.equal(xhat, lhat) and torch.equal(indices, lidx) and indices.dtype == lidx.dtype
    assert torch.equal(gx, lgx)


@pytest.mark.parametrize("backend", BACKENDS)
def test_readme_fsq_without_indices(backend, seed):
    quantizer = ours.FSQ([8, 5, 5, 5], return_indices=False, backend=backend)
    xhat, indices = quantizer(torch.randn(1, 1024, 4))
    assert indices is None and xhat.shape == (1, 1024, 4)
    assert not hasattr(quantizer, "implicit_codebook") and not hasattr(vq.FSQ([8, 5, 5, 5], return_indices=False),
                                                                          "implicit_codebook")


# -- tests/test_readme.py::test_rfsq ----------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_readme_rfsq(backend, seed):
    residual_fsq = ours.ResidualFSQ(dim=256, levels=[8, 5, 5, 3], num_quantizers=8, backend=backend)
    lib = vq.ResidualFSQ(dim=256, levels=[8, 5, 5, 3], num_quantizers=8)
    residual_fsq.load_state_dict(lib.state_dict())
    x = torch.randn(1, 1024, 256)
    residual_fsq.eval()
    lib.eval()
    quantized, indices = residual_fsq(x)
    quantized_out = residual_fsq.get_output_from_indices(indices)
    assert torch.all(quantized == quantized_out)  # the library test's own assertion
    if backend == "triton":
        lq, lidx = library_rfsq_with_kernel_tanh(lib, x)
    else:
        lq, lidx = lib(x)
    assert torch.equal(quantized, lq) and torch.equal(indices, lidx) and indices.dtype == lidx.dtype


@pytest.mark.parametrize("backend", BACKENDS)
def test_readme_style_grouped_rfsq(backend, seed):
    kw = dict(dim=64, groups=2, levels=[8, 5, 5, 3], num_quantizers=4)
    grouped, lib = ours.GroupedResidualFSQ(backend=backend, **kw).eval(), vq.GroupedResidualFSQ(**kw).eval()
    grouped.load_state_dict(lib.state_dict())
    x = torch.randn(1, 512, 64)
    quantized, indices = grouped(x)
    assert torch.all(quantized == grouped.get_output_from_indices(indices))
    if backend == "triton":
        outs = [library_rfsq_with_kernel_tanh(rvq, chunk) for rvq, chunk in zip(lib.rvqs, x.chunk(2, dim=-1))]
        lq, lidx = torch.cat([o[0] for o in outs], dim=-1), torch.stack([o[1] for o in outs])
    else:
        lq, lidx = lib(x)
    assert torch.equal(quantized, lq) and torch.equal(indices, lidx)


# -- examples/autoencoder_fsq.py --------------------------------------------------------------


def _simple_fsq_autoencoder(fsq_class, levels, **kw):
    """The example's SimpleFSQAutoEncoder, with the FSQ class as a parameter."""
    nn = torch.nn
    return Sequential(
        nn.Conv2d(1, 16, kernel_size=3, stride=1, padding=1),
        nn.MaxPool2d(kernel_size=2, stride=2),
        nn.GELU(),
        nn.Conv2d(16, 32, kernel_size=3, stride=1, padding=1),
        nn.MaxPool2d(kernel_size=2, stride=2),
        nn.Conv2d(32, len(levels), kernel_size=1),
        fsq_class(levels, **kw),
        nn.Conv2d(len(levels), 32, kernel_size=3, stride=1, padding=1),
        nn.Upsample(scale_factor=2, mode="nearest"),
        nn.Conv2d(32, 16, kernel_size=3, stride=1, padding=1),
        nn.GELU(),
        nn.Upsample(scale_factor=2, mode="nearest"),
        nn.Conv2d(16, 1, kernel_size=3, stride=1, padding=1),
    )


def _train_example(fsq_class, steps=6, seed=1234, **kw):
    """The example's train loop (fixed seed, AdamW 3e-4, L1 of the clamped output), on tiny data:
    a fixed random batch stands in for FashionMNIST (no download). Returns the loss curve, the
    final weights and the strides of the quantizer's output."""
    torch.random.manual_seed(seed)
    levels = [8, 6, 5]
    model = _simple_fsq_autoencoder(fsq_class, levels, **kw)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    data = torch.rand(8, 1, 16, 16) * 2 - 1
    strides = []
    model.fns[6].register_forward_hook(lambda m, i, o: strides.append(o[0].stride()))
    losses, active = [], []
    for _ in range(steps):
        opt.zero_grad()
        out, indices = model(data)
        out = out.clamp(-1., 1.)
        rec_loss = (out - data).abs().mean()
        rec_loss.backward()
        opt.step()
        losses.append(rec_loss.item())
        active.append(indices.unique().numel())
    return losses, active, [p.detach().clone() for p in model.parameters()], strides


@pytest.mark.parametrize("backend", BACKENDS)
def test_autoencoder_fsq_example_trains_bitwise_like_the_library(backend, seed, monkeypatch):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions: intra-op threads only spin on a loaded machine
    try:
        mine = _train_example(lambda levels, **kw: ours.FSQ(levels, backend=backend, **kw))
        if backend == "triton":
            library_with_kernel_tanh(monkeypatch)
        theirs = _train_example(vq.FSQ)
    finally:
        torch.set_num_threads(threads)
    assert mine[0] == theirs[0], "loss curves differ"
    assert mine[1] == theirs[1], "code usage differs"
    assert all(torch.equal(a, b) for a, b in zip(mine[2], theirs[2])), "final weights differ"
    assert mine[3] == theirs[3] and mine[3][0] == (48, 1, 12, 3)  # channels_last, like the library
    assert mine[0][-1] < mine[0][0]


# -- recognised by the library's helpers --------------------------------------------------------


def test_library_sequential_recognises_the_drop_ins():
    for m in (ours.FSQ([8, 5]), ours.ResidualFSQ(levels=[8, 5], num_quantizers=2),
              ours.GroupedResidualFSQ(dim=4, groups=2, levels=[8, 5], num_quantizers=2)):
        assert isinstance(m, _klasses())
        seq = Sequential(torch.nn.Identity(), m)
        assert len(seq(torch.randn(2, 3, m.dim if hasattr(m, "dim") else 4))) >= 2
    with pytest.raises(AssertionError, match="exactly one quantizer"):
        Sequential(ours.FSQ([8, 5]), ours.FSQ([8, 5]))
    assert len(set(_klasses())) == len(_klasses())  # registered once


_IMPORT_ORDER = """
import sys
{block}
import rfsq_kernels.vqpytorch as o
assert sys.modules.get("vector_quantize_pytorch") is None  # importing ours does not import the library
{after}
"""


@pytest.mark.parametrize("case", ["library_later", "library_absent"])
def test_registration_without_importing_the_library(case):
    import subprocess
    import sys

    if case == "library_later":
        code = _IMPORT_ORDER.format(block="", after="from vector_quantize_pytorch.utils import QUANTIZE_KLASSES\n"
                                    "assert o.FSQ in QUANTIZE_KLASSES and o.ResidualFSQ in QUANTIZE_KLASSES")
    else:
        code = _IMPORT_ORDER.format(block="sys.modules['vector_quantize_pytorch'] = None",
                                    after="import torch\nprint(o.FSQ([8, 5])(torch.zeros(1, 3, 2))[1].tolist())")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


# -- attributes, methods and strides with the library's types and semantics --------------------


@pytest.mark.parametrize("kw", [dict(), dict(preserve_symmetry=True), dict(bound_hard_clamp=True),
                                dict(preserve_symmetry=True, noise_dropout=0.3)])
def test_fsq_methods_and_buffers_match_the_library(kw, seed):
    levels = [8, 5, 5, 3]
    lib, mine = vq.FSQ(levels, **kw), ours.FSQ(levels, backend="reference", **kw)
    z = torch.randn(3, 50, 4) * 1.5
    for hard in (False, True):
        assert torch.equal(mine.bound(z, hard_clamp=hard), lib.bound(z, hard_clamp=hard))
        assert torch.equal(mine.symmetry_preserving_bound(z, hard_clamp=hard),
                           lib.symmetry_preserving_bound(z, hard_clamp=hard))
    q = mine.quantize(z)
    assert isinstance(q, torch.Tensor) and torch.equal(q, lib.quantize(z))
    for training in (False, True):
        mine.train(training)
        lib.train(training)
        torch.manual_seed(seed)
        a = mine.maybe_apply_noise(q)
        torch.manual_seed(seed)
        assert torch.equal(a, lib.maybe_apply_noise(q))
    for dtype in (torch.int32, torch.int64):
        idx = torch.randint(0, mine.codebook_size, (7, 5), dtype=dtype)
        d_mine, d_lib = mine.indices_to_level_indices(idx), lib.indices_to_level_indices(idx)
        assert d_mine.dtype == d_lib.dtype and torch.equal(d_mine, d_lib)
    assert mine.indices_to_level_indices(torch.zeros(3, dtype=torch.int32)).dtype == torch.int32
    bufs_mine, bufs_lib = dict(mine.named_buffers()), dict(lib.named_buffers())
    assert bufs_mine.keys() == bufs_lib.keys() and "implicit_codebook" in bufs_mine
    assert "implicit_codebook" not in mine.state_dict()
    for name, b in bufs_lib.items():
        assert bufs_mine[name].dtype == b.dtype and torch.equal(bufs_mine[name], b), name
    assert mine.to(torch.float64).implicit_codebook.dtype == torch.float64  # a buffer: moves with the module


def test_huge_implicit_codebook_is_computed_on_access():
    mine = ours.FSQ([16] * 7, backend="reference")  # 2**28 codes x 7: 7.5 GB as a buffer
    assert "implicit_codebook" not in dict(mine.named_buffers())
    assert mine.__dict__.get("_codebook_on_demand")


def test_residual_fsq_layers_match_the_library(seed):
    kw = dict(levels=[8, 5, 5, 3], num_quantizers=3, noise_dropout=0.2)
    lib, mine = vq.ResidualFSQ(**kw), ours.ResidualFSQ(backend="reference", **kw)
    assert isinstance(mine.layers, torch.nn.ModuleList) and len(mine.layers) == len(lib.layers) == 3
    z = torch.randn(2, 40, 4)
    for a, b in zip(mine.layers, lib.layers):
        assert isinstance(a, ours.FSQ) and isinstance(a, _klasses())
        assert (a.preserve_symmetry, a.bound_hard_clamp, a.noise_dropout) == (b.preserve_symmetry,
                                                                              b.bound_hard_clamp, b.noise_dropout)
        torch.manual_seed(seed)
        qa, ia = a(z)
        torch.manual_seed(seed)
        qb, ib = b(z)
        assert torch.equal(qa, qb) and torch.equal(ia, ib) and torch.equal(a.implicit_codebook, b.implicit_codebook)
    assert torch.equal(mine.codebooks, lib.codebooks)


def _layouts():
    L = [8, 5, 5, 3]
    for shape, cf in [((2, 4, 5, 6), True), ((2, 4, 7), True), ((2, 4, 3, 2, 5), True), ((2, 9, 4), False)]:
        for dim in (None, 6):
            s = list(shape)
            if dim:
                s[1 if cf else -1] = dim
            yield L, tuple(s), cf, dim


@pytest.mark.parametrize("backend", BACKENDS)
def test_output_strides_match_the_library(backend, seed):
    for levels, shape, cf, dim in _layouts():
        x = torch.randn(shape)
        pairs = [(vq.ResidualFSQ(levels=levels, num_quantizers=2, dim=dim, is_channel_first=cf),
                  ours.ResidualFSQ(levels=levels, num_quantizers=2, dim=dim, is_channel_first=cf, backend=backend)),
                 (vq.FSQ(levels, dim=dim, channel_first=cf), ours.FSQ(levels, dim=dim, channel_first=cf, backend=backend))]
        for lib, mine in pairs:
            mine.load_state_dict(lib.state_dict())
            (a, ai), (b, bi) = lib(x), mine(x)
            assert (a.stride(), ai.stride()) == (b.stride(), bi.stride()), (type(mine).__name__, shape, cf, dim)
    x = torch.randn(2, 8, 5, 4)
    lib = vq.GroupedResidualFSQ(dim=8, groups=2, levels=[5] * 4, num_quantizers=2, accept_image_fmap=True)
    mine = ours.GroupedResidualFSQ(dim=8, groups=2, levels=[5] * 4, num_quantizers=2, accept_image_fmap=True,
                                   backend=backend)
    (a, ai), (b, bi) = lib(x), mine(x)
    assert (a.stride(), ai.stride()) == (b.stride(), bi.stride())


# -- issue 25 item 9: GroupedResidualFSQ(accept_image_fmap=True) ---------------------------------


def test_grouped_image_fmap_quantizes_the_channel_axis_like_the_library(seed):
    """Without is_channel_first the library's stage FSQs treat a rank-4 chunk as channel-first, so
    it quantizes dim 1 (it needs width == dim/groups, and its soft clamp and scales broadcast along
    the width: uniform levels keep that consistent). Ours: the same, bit for bit, and any width."""
    kw = dict(dim=8, groups=2, levels=[5] * 4, num_quantizers=3, accept_image_fmap=True)
    lib, mine = vq.GroupedResidualFSQ(**kw), ours.GroupedResidualFSQ(backend="reference", **kw)
    x = torch.randn(2, 8, 5, 4) * 1.5
    (q1, i1), g1 = _grad_run(lib.eval(), x)
    (q2, i2), g2 = _grad_run(mine.eval(), x)
    assert i2.shape == i1.shape == (2, 2, 5, 4, 3)
    assert torch.equal(q1, q2) and torch.equal(i1, i2) and torch.equal(g1, g2)
    assert torch.equal(mine.get_output_from_indices(i2), q2)
    # any width, and the same as quantizing each group's channels explicitly
    x = torch.randn(2, 8, 5, 7) * 1.5
    q, idx = mine(x)
    cf = ours.GroupedResidualFSQ(backend="reference", is_channel_first=True, **kw).eval()
    qc, ic = cf(x)
    assert torch.equal(q, qc) and torch.equal(idx, ic.movedim(2, -1))
    assert torch.equal(mine.get_output_from_indices(idx), q)


# -- issue 30 item 3: the K=8 late-stage indices ---------------------------------------------------


def test_late_stages_resolve_below_float32_precision(seed):
    """Stage k's grid step is ``2 L**-k / (L-1)`` in input units: for L=8 at k=7 it is 1.4e-7, about
    one ulp of an input near 1, so the late digits are decided by the input's last bits. The
    library's own indices move there under a one-ulp nudge of its (clamped) input; the early
    stages do not. (The fused path equals the library bitwise once both use the same tanh:
    test_readme_rfsq[triton]; measured counts: bench/vq_deep_stages.py, docs.)"""
    assert 2 * 8.0 ** -7 / 7 < 2 * torch.finfo(torch.float32).eps
    levels = [8, 5, 5, 3]
    lib = vq.ResidualFSQ(levels=levels, num_quantizers=8).eval()
    mine = ours.ResidualFSQ(levels=levels, num_quantizers=8, backend="reference").eval()
    c = lib.soft_clamp_input_value
    lib.soft_clamp_input_value = None  # feed the clamped input directly
    y = (torch.randn(4, 1024, 4) * 1.5 / c).tanh() * c
    nudged = torch.nextafter(y, torch.full_like(y, float("inf")))
    a, b = lib(y)[1], lib(nudged)[1]
    moved = [(a[..., k] != b[..., k]).float().mean().item() for k in range(8)]
    # An early stage moves only where the input lies within an ulp of a rounding boundary: about
    # ulp / step of the positions (stage 2: 1.2e-7 / 4.5e-3 = 2.7e-5, i.e. ~0.4 of the 16384 values
    # drawn), so a draw may flip one or two of them; the late stage moves a large share.
    assert max(moved[:3]) < 1e-3 and moved[7] > 0.05, moved
    from rfsq_kernels.vqpytorch import reference as ref

    _, idx = ref.residual_fsq_core(nudged, levels, mine.scales, None)  # our stage loop, no clamp
    assert torch.equal(idx, b)  # the reference path follows the library's last bits too


# -- issue 30 item 2: options the kernels do not compute run the reference path ------------------


def test_options_the_kernels_do_not_compute_route_to_the_reference_path(seed):
    x = torch.randn(2, 9, 4) * 1.5
    cases = [
        (dict(levels=[8, 5, 5, 5], num_quantizers=3, bound_hard_clamp=False), "bound_hard_clamp=False"),
        (dict(levels=[8, 5, 5, 5], num_quantizers=3, noise_dropout=0.5), "noise_dropout > 0 in training"),
    ]
    for kw, reason in cases:
        lib, mine = vq.ResidualFSQ(**kw), ours.ResidualFSQ(backend="triton", **kw)
        assert reason in mine.fused_supported()
        with pytest.warns(UserWarning, match="running the reference path"):
            torch.manual_seed(seed)
            q2, i2 = mine(x)
        torch.manual_seed(seed)
        q1, i1 = lib(x)
        assert torch.equal(q1, q2) and torch.equal(i1, i2)
    noisy = ours.ResidualFSQ(levels=[8, 5], num_quantizers=2, noise_dropout=0.5)
    assert noisy.eval().fused_supported() is None and noisy.train().fused_supported() is not None  # fused at eval
    for kw in (dict(preserve_symmetry=True), dict(bound_hard_clamp=True),
               dict(preserve_symmetry=True, noise_dropout=0.3)):
        lib, mine = vq.FSQ([8, 5, 5, 5], **kw), ours.FSQ([8, 5, 5, 5], backend="triton", **kw)
        assert mine.fused_supported() is not None
        with pytest.warns(UserWarning, match="running the reference path"):
            torch.manual_seed(seed)
            q2, i2 = mine(x)
        torch.manual_seed(seed)
        q1, i1 = lib(x)
        assert torch.equal(q1, q2) and torch.equal(i1, i2)
    assert ours.FSQ([8, 5, 5, 5]).fused_supported() is None
