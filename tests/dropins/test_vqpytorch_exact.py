"""rfsq_kernels.vqpytorch against the installed vector-quantize-pytorch (reference path, CPU):
values, indices and every gradient bit for bit; state_dict interchange; decoding round trips;
the options; and where the library is wrong, that we do the right thing."""
from __future__ import annotations

import pytest
import torch

vq = pytest.importorskip("vector_quantize_pytorch", reason="vector-quantize-pytorch is not installed "
                         "(pip install -e '.[test]')")

from rfsq_kernels.vqpytorch import FSQ, GroupedResidualFSQ, ResidualFSQ, from_vqpytorch  # noqa: E402
from rfsq_kernels.vqpytorch import reference as ref  # noqa: E402

MIXED = [3, 4, 5, 6, 7, 8, 16]
LEVELS = {1: [8, 5, 5, 5], 2: MIXED, 4: [16, 7, 6, 4, 3], 8: [4, 3, 4, 3, 5, 3, 4, 3]}
# (the library builds its implicit codebook per stage: small codebooks keep the tests quick)


def _run(module, x, g, **kw):
    x = x.detach().clone().requires_grad_()
    out = module(x, **kw)
    (out[0].float() * g).sum().backward()
    grads = [x.grad] + [p.grad for p in module.parameters()]
    module.zero_grad()
    return out, grads


def _assert_same(ours, theirs, grads_ours, grads_theirs, out_dtype):
    q, idx = ours[0], ours[1]
    assert q.dtype == out_dtype
    assert torch.equal(q, theirs[0].to(out_dtype)), "quantized differs"
    assert torch.equal(idx.long(), theirs[1].long()), "indices differ"
    for a, b in zip(grads_ours, grads_theirs):
        assert a.dtype == b.dtype and torch.equal(a, b), "gradient differs"


def _latent(shape, dtype=torch.float32):
    return (torch.randn(shape) * 1.5).to(dtype)


@pytest.mark.parametrize("K", [1, 2, 4, 8])
@pytest.mark.parametrize("layout", ["bnc", "cf3", "cf4", "cf5"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_residual_fsq_bitwise(K, layout, dtype, seed):
    levels = LEVELS[K]
    C = len(levels)
    channel_first = layout != "bnc"
    shape = {"bnc": (3, 29, C), "cf3": (2, C, 13), "cf4": (2, C, 5, 7), "cf5": (2, C, 3, 2, 5)}[layout]
    lib = vq.ResidualFSQ(levels=levels, num_quantizers=K, is_channel_first=channel_first)
    ours = ResidualFSQ(levels=levels, num_quantizers=K, is_channel_first=channel_first, backend="reference")
    x = _latent(shape, dtype)
    g = torch.randn(shape).to(dtype).float()  # representable in dtype: both see the same gradient
    (q1, i1), gr1 = _run(lib, x, g)
    (q2, i2), gr2 = _run(ours, x, g)
    assert i2.shape == i1.shape and i2.dtype == torch.int32
    _assert_same((q2, i2), (q1, i1), gr2, gr1, dtype)


@pytest.mark.parametrize("channel_first", [False, True])
def test_residual_fsq_projections_bitwise(channel_first, seed):
    lib = vq.ResidualFSQ(levels=LEVELS[4], num_quantizers=4, dim=24, is_channel_first=channel_first)
    ours = ResidualFSQ(levels=LEVELS[4], num_quantizers=4, dim=24, is_channel_first=channel_first, backend="reference")
    ours.load_state_dict(lib.state_dict())
    shape = (2, 24, 4, 5) if channel_first else (2, 19, 24)
    x, g = _latent(shape), torch.randn(shape)
    out1, gr1 = _run(lib, x, g, return_all_codes=not channel_first)
    out2, gr2 = _run(ours, x, g, return_all_codes=not channel_first)
    _assert_same(out2, out1, gr2, gr1, torch.float32)
    assert len(gr2) == 5  # x, project_in weight/bias, project_out weight/bias
    if not channel_first:
        assert torch.equal(out2[2], out1[2])


@pytest.mark.parametrize("groups", [2, 4])
def test_grouped_residual_fsq_bitwise(groups, seed):
    kw = dict(dim=8 * groups, groups=groups, levels=[8, 5, 5, 3], num_quantizers=3)
    lib, ours = vq.GroupedResidualFSQ(**kw), GroupedResidualFSQ(backend="reference", **kw)
    assert lib.state_dict().keys() == ours.state_dict().keys()
    ours.load_state_dict(lib.state_dict())
    x, g = _latent((2, 11, 8 * groups)), torch.randn(2, 11, 8 * groups)
    out1, gr1 = _run(lib.eval(), x, g, return_all_codes=True)
    out2, gr2 = _run(ours.eval(), x, g, return_all_codes=True)
    _assert_same(out2, out1, gr2, gr1, torch.float32)
    assert out2[1].shape == (groups, 2, 11, 3)
    assert all(torch.equal(a, b) for a, b in zip(out2[2], out1[2]))
    assert torch.equal(ours.get_output_from_indices(out2[1]), out2[0])


def test_decoding_round_trips(seed):
    lib = vq.ResidualFSQ(levels=LEVELS[8], num_quantizers=8)
    ours = ResidualFSQ(levels=LEVELS[8], num_quantizers=8, backend="reference")
    x = _latent((4, 33, 8))
    q, idx = ours(x)
    codes = ours.get_codes_from_indices(idx)
    assert torch.equal(codes, lib.get_codes_from_indices(idx))
    # ours sums the stages in the forward's order: bitwise the forward's output (the library's
    # einops reduce may differ in the last bit)
    assert torch.equal(ours.get_output_from_indices(idx), q)
    torch.testing.assert_close(lib.get_output_from_indices(idx), q, rtol=0, atol=1e-6)
    assert torch.equal(ours.codebooks, lib.codebooks)


def test_channel_first_decoding_works(seed):
    """The library's get_output_from_indices fails with is_channel_first=True; ours inverts forward."""
    ours = ResidualFSQ(levels=[8, 5, 5, 5], num_quantizers=3, is_channel_first=True, backend="reference")
    x = _latent((2, 4, 6, 5))
    q, idx, codes = ours(x, return_all_codes=True)
    assert idx.shape == (2, 3, 6, 5) and codes.shape == (3, 2, 6, 5, 4)
    assert torch.equal(ours.get_output_from_indices(idx), q)
    lib = vq.ResidualFSQ(levels=[8, 5, 5, 5], num_quantizers=3, is_channel_first=True)
    with pytest.raises(Exception):
        lib.get_output_from_indices(idx)


def test_large_codebook_indices_exact(seed):
    """prod(levels) = 2**28: the library's float32 packing corrupts indices; ours are exact.
    (The library's ResidualFSQ would build a 7.5 GB codebook here; its packing is called through
    an FSQ built without one.)"""
    levels = [16] * 7
    ours = ResidualFSQ(levels=levels, num_quantizers=2, backend="reference")
    x = _latent((2, 300, 7))
    q, idx = ours(x)
    codes = ours.get_codes_from_indices(idx)
    assert torch.equal(ref.sum_stages(codes), q)
    assert int(idx.max()) >= 2**24
    lib_fsq = vq.FSQ(levels=levels, preserve_symmetry=True, return_indices=False)
    theirs = lib_fsq.codes_to_indices(codes[0] / ours.scales[0])
    assert bool((theirs != idx[..., 0]).any()), "the library packs exactly here; update the migration guide"
    assert torch.equal(ours.get_codes_from_indices(idx), codes)


def test_state_dict_interchange_and_conversion(seed):
    kw = dict(levels=[8, 5, 5, 5], num_quantizers=4, dim=32)
    lib, ours = vq.ResidualFSQ(**kw), ResidualFSQ(**kw)
    assert list(lib.state_dict()) == list(ours.state_dict())
    lib.load_state_dict(ours.state_dict())
    ours.load_state_dict(lib.state_dict())
    assert dict(ours.named_buffers()).keys() == dict(lib.named_buffers()).keys()  # layers.k._levels, ... too
    for (name, a), b in zip(ours.named_buffers(), lib.buffers()):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    assert torch.equal(ours.scales, lib.scales) and torch.equal(ours.soft_clamp_input_value, lib.soft_clamp_input_value)
    conv = from_vqpytorch(lib.eval(), backend="reference")
    assert isinstance(conv, ResidualFSQ) and not conv.training
    x = _latent((2, 7, 32))
    assert torch.equal(conv(x)[0], lib(x)[0])
    fsq = vq.FSQ(levels=[8, 5, 5, 5], dim=12, orthogonal_rotation=True, preserve_symmetry=True)
    conv = from_vqpytorch(fsq)
    assert list(conv.state_dict()) == list(fsq.state_dict())
    x = _latent((2, 7, 12))
    assert all(torch.equal(a, b) for a, b in zip(conv(x), fsq(x)))
    grouped = vq.GroupedResidualFSQ(dim=16, groups=2, levels=[8, 5, 5, 5], num_quantizers=2)
    conv = from_vqpytorch(grouped)
    x = _latent((2, 7, 16))
    assert all(torch.equal(a, b) for a, b in zip(conv.eval()(x), grouped.eval()(x)))
    with pytest.raises(TypeError, match="from_vqpytorch"):
        from_vqpytorch(torch.nn.Linear(2, 2))


def test_quantize_dropout_matches(seed):
    kw = dict(levels=[8, 5, 5, 5], num_quantizers=6, quantize_dropout=True, quantize_dropout_cutoff_index=1,
              quantize_dropout_multiple_of=2)
    lib, ours = vq.ResidualFSQ(**kw), ResidualFSQ(backend="reference", **kw)
    x, g = _latent((2, 9, 4)), torch.randn(2, 9, 4)
    counts = set()
    for s in range(12):
        (q1, i1), gr1 = _run(lib, x, g, rand_quantize_dropout_fixed_seed=s)
        (q2, i2), gr2 = _run(ours, x, g, rand_quantize_dropout_fixed_seed=s)
        _assert_same((q2, i2), (q1, i1), gr2, gr1, torch.float32)
        assert i2.dtype == torch.int64  # int64 while dropout is active (the library: when a stage is dropped)
        counts.add(int((i2[0, 0] != -1).sum()))
        # no seed: the same torch RNG draw gives the same count
        torch.manual_seed(s)
        (q1, i1), _ = _run(lib, x, g)
        torch.manual_seed(s)
        (q2, i2), _ = _run(ours, x, g)
        assert torch.equal(q1, q2) and torch.equal(i1.long(), i2)
    assert counts == {2, 4, 6}
    with torch.no_grad():  # no dropout without grad, like the library
        assert int((ours(x)[1] == -1).sum()) == 0
    coarse = ours.eval()(x)[1][..., :2]
    assert torch.equal(ours.get_output_from_indices(coarse), lib.get_output_from_indices(coarse))


def test_path_changing_options(seed):
    x, g = _latent((2, 9, 4)), torch.randn(2, 9, 4)
    for kw in (dict(bound_hard_clamp=False), dict(bound_hard_clamp=False, soft_clamp_input_value=1.5),
               dict(bound_hard_clamp=False, soft_clamp_input_value=[1.2, 1.3, 1.4, 1.5])):
        lib = vq.ResidualFSQ(levels=[8, 5, 5, 5], num_quantizers=3, **kw)
        ours = ResidualFSQ(levels=[8, 5, 5, 5], num_quantizers=3, backend="reference", **kw)
        (q1, i1), gr1 = _run(lib, x, g)
        (q2, i2), gr2 = _run(ours, x, g)
        _assert_same((q2, i2), (q1, i1), gr2, gr1, torch.float32)
    # noise dropout: the same torch RNG stream gives the same noise
    lib = vq.ResidualFSQ(levels=[8, 5, 5, 5], num_quantizers=3, noise_dropout=0.5)
    ours = ResidualFSQ(levels=[8, 5, 5, 5], num_quantizers=3, noise_dropout=0.5, backend="reference")
    torch.manual_seed(seed)
    (q1, i1), gr1 = _run(lib, x, g)
    torch.manual_seed(seed)
    (q2, i2), gr2 = _run(ours, x, g)
    _assert_same((q2, i2), (q1, i1), gr2, gr1, torch.float32)
    # backend='triton' with an option the kernels do not compute: the reference path, with a warning
    torch.manual_seed(seed)
    with pytest.warns(UserWarning, match="noise_dropout > 0 in training"):
        q3, i3 = ResidualFSQ(levels=[8, 5, 5, 5], num_quantizers=3, noise_dropout=0.5, backend="triton")(x)
    assert torch.equal(q3, q1) and torch.equal(i3, i1)
    for bad, err in ((dict(orthogonal_rotation=True), "orthogonal_rotation"), (dict(return_indices=False), "return_indices"),
                     (dict(num_codebooks=2), "num_codebooks"), (dict(channel_first=True), "channel_first"),
                     (dict(keep_num_codebooks_dim=True), "keep_num_codebooks_dim"),
                     (dict(soft_clamp_input_value=2.0), "soft_clamp_input_value"), (dict(bogus=1), "bogus"),
                     (dict(preserve_symmetry=True), "preserve_symmetry")):
        with pytest.raises((ValueError, TypeError), match=err):
            ResidualFSQ(levels=[8, 5], num_quantizers=2, **bad)
    ResidualFSQ(levels=[8, 5], num_quantizers=2, allowed_dtypes=(torch.float32,), force_quantization_f32=False,
                scale=2.0, projection_has_bias=False)


@pytest.mark.parametrize("kw", [dict(), dict(preserve_symmetry=True), dict(preserve_symmetry=True, bound_hard_clamp=True),
                                dict(bound_hard_clamp=True), dict(num_codebooks=2, dim=8), dict(dim=10),
                                dict(channel_first=True), dict(levels=MIXED), dict(return_indices=False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fsq_bitwise(kw, dtype, seed):
    kw = {"levels": [8, 5, 5, 5], **kw}
    lib, ours = vq.FSQ(**kw), FSQ(backend="reference", **kw)
    ours.load_state_dict(lib.state_dict())
    dim = ours.dim
    for shape in ((2, 13, dim), (2, dim, 3, 4), (2, dim, 2, 3, 2)):
        if kw.get("channel_first") and len(shape) == 3:
            shape = (2, dim, 13)
        x = _latent(shape, dtype)
        g = torch.randn(shape).to(dtype).float()
        if dtype == torch.bfloat16 and "dim" in kw:
            continue  # float32 projection weights on a bf16 input fail in both libraries
        (q1, i1), gr1 = _run(lib, x, g)
        (q2, i2), gr2 = _run(ours, x, g)
        assert q2.dtype == q1.dtype and q2.shape == q1.shape
        if i1 is None:
            assert i2 is None
            i1 = i2 = torch.zeros(())
        _assert_same((q2, i2), (q1, i1), gr2, gr1, q1.dtype)
        if i1.ndim:
            assert i2.shape == i1.shape and i2.dtype == i1.dtype
            assert torch.equal(ours.indices_to_codes(i2), lib.indices_to_codes(i1))
    if not kw.get("return_indices", True):
        return
    book = ours.implicit_codebook
    assert torch.equal(book, lib.implicit_codebook)
    if "num_codebooks" not in kw:
        assert torch.equal(ours.codes_to_indices(book), lib.codes_to_indices(book))


class _TinyAE(torch.nn.Module):
    def __init__(self, quantizer):
        super().__init__()
        self.enc = torch.nn.Conv2d(3, 8, 4, 2, 1)
        self.q = quantizer
        self.dec = torch.nn.ConvTranspose2d(8, 3, 4, 2, 1)

    def forward(self, img):
        h = self.enc(img)
        quantized, _ = self.q(h)
        return self.dec(quantized)


def test_swapping_the_module_gives_identical_training(seed):
    """20 Adam steps of a tiny autoencoder: the library's ResidualFSQ and ours, same losses."""
    data = torch.rand(4, 3, 8, 8)
    losses = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: intra-op threads only spin (seconds per step on a loaded machine)
    try:
        _train_both(data, seed, losses)
    finally:
        torch.set_num_threads(threads)
    assert losses[0] == losses[1]
    assert losses[0][-1] < losses[0][0]


def _train_both(data, seed, losses):
    for make in (vq.ResidualFSQ, lambda **kw: ResidualFSQ(backend="reference", **kw)):
        torch.manual_seed(seed)
        model = _TinyAE(make(levels=[8, 5, 5, 5], num_quantizers=4, dim=8, is_channel_first=True))
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        run = []
        for _ in range(20):
            loss = (model(data) - data).abs().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            run.append(loss.item())
        losses.append(run)


def test_cast_module_keeps_the_library_math(seed):
    """``module.to(bfloat16)`` casts the buffers, and the library then computes in bf16: the
    reference path follows it bit for bit and the fused path declines (auto falls back)."""
    kw = dict(levels=[8, 5, 5, 5], num_quantizers=3)
    lib, ours = vq.ResidualFSQ(**kw).to(torch.bfloat16), ResidualFSQ(**kw).to(torch.bfloat16)
    assert ours.fused_supported() is not None
    x = _latent((2, 9, 4), torch.bfloat16)
    assert all(torch.equal(a, b) for a, b in zip(ours(x), lib(x)))
