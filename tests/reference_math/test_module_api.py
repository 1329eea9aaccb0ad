"""The module API that vector-quantize-pytorch users expect: layouts, (B, C) inputs, dim
projections, per-stage codes, lucidrains-style helpers, configuration in the state_dict, errors."""
import io

import pytest
import torch

import rfsq_kernels.reference.rfsq_module as reference_module
from rfsq_kernels import FSQ, RFSQ
from rfsq_kernels.kernels import layouts
from rfsq_kernels.reference import STRATEGIES
from rfsq_kernels.testing import randomize_


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_channel_last_is_read_in_place_by_the_reference(strategy, seed, monkeypatch):
    seen = []
    real = reference_module.rfsq_forward

    def spy(z, *args, **kwargs):
        seen.append(z)
        return real(z, *args, **kwargs)

    monkeypatch.setattr(reference_module, "rfsq_forward", spy)
    first = randomize_(RFSQ(stages=2, strategy=strategy, backend="reference"))
    last = RFSQ(stages=2, strategy=strategy, backend="reference", channel_first=False)
    last.load_state_dict(first.state_dict())
    z_last = torch.randn(3, 6, 7, 4)  # (B, H, W, C), contiguous
    q_last, idx_last = last(z_last)
    assert seen[-1].data_ptr() == z_last.data_ptr() and seen[-1].shape == (3, 4, 6, 7)
    q_first, idx_first = first(z_last.permute(0, 3, 1, 2).contiguous())
    assert q_last.shape == z_last.shape
    assert torch.equal(idx_last, idx_first)
    torch.testing.assert_close(q_last, q_first.permute(0, 2, 3, 1), rtol=1e-6, atol=1e-6)


def test_channel_last_is_read_in_place_by_the_fused_kernels(seed, monkeypatch):
    calls = []
    real = layouts.strided_view

    def spy(t):
        out = real(t)
        calls.append((t, out[0]))
        return out

    monkeypatch.setattr(layouts, "strided_view", spy)
    m = RFSQ(stages=2, strategy="scale", levels=[8, 5, 3], backend="triton", channel_first=False)
    z = torch.randn(2, 33, 3)  # (B, N, C)
    q, idx = m(z)
    given, used = calls[0]
    assert used is given and used.data_ptr() == z.data_ptr() and used.stride() == (99, 1, 3)
    ref = RFSQ(stages=2, strategy="scale", levels=[8, 5, 3], backend="reference", channel_first=False)
    ref.load_state_dict(m.state_dict())
    rq, ridx = ref(z)
    assert torch.equal(idx, ridx)
    torch.testing.assert_close(q, rq, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("strategy", ["none", "scale"])
def test_batch_by_channel_inputs(strategy, seed):
    m = randomize_(RFSQ(stages=3, strategy=strategy, levels=[8, 5, 5]))
    z = torch.randn(6, 3)
    q, idx = m(z)
    assert q.shape == (6, 3) and idx.shape == (6, 3)
    q3, idx3 = m(z.unsqueeze(-1))
    assert torch.equal(q, q3.squeeze(-1)) and torch.equal(idx, idx3.squeeze(1))
    indices, side = m.encode(z)
    assert torch.equal(m.decode(indices, side), q)
    mask = torch.tensor([True, False, True, True, False, True])
    qm, idxm = m(z, mask=mask)
    assert (qm[~mask] == 0).all() and (idxm[~mask] == -1).all() and torch.equal(qm[mask], q[mask])
    _, _, codes = m(z, return_all_codes=True)
    assert codes.shape == (3, 6, 3)


@pytest.mark.parametrize("channel_first", [True, False])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_dim_projections(strategy, channel_first, seed):
    m = randomize_(RFSQ(stages=2, strategy=strategy, levels=[8, 5, 5], dim=16, channel_first=channel_first))
    assert isinstance(m.project_in, torch.nn.Linear) and m.project_in.in_features == 16
    z = torch.randn(2, 16, 5, 3) if channel_first else torch.randn(2, 5, 3, 16)
    q, idx, codes = m(z, return_all_codes=True)
    assert q.shape == z.shape and idx.shape == (2, 5, 3, 2)
    assert codes.shape == ((2, 2, 3, 5, 3) if channel_first else (2, 2, 5, 3, 3))
    indices, side = m.encode(z)
    assert torch.equal(indices, idx)
    assert torch.equal(m.decode(indices, side), q)
    assert torch.equal(m.get_output_from_indices(indices, side), q)
    lat = codes.sum(0) if not channel_first else codes.sum(0).movedim(1, -1)
    out = m.project_out(lat)
    torch.testing.assert_close(out if not channel_first else out.movedim(-1, 1), q, rtol=1e-5, atol=1e-5)
    q.square().sum().backward()
    assert m.project_in.weight.grad.abs().sum() > 0 and m.project_out.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("channel_first", [True, False])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_all_codes_are_the_per_stage_reconstructions(strategy, channel_first, seed):
    m = randomize_(RFSQ(stages=4, strategy=strategy, channel_first=channel_first))
    z = torch.randn(2, 5, 6, 3) if channel_first else torch.randn(2, 6, 3, 5)
    mask = torch.rand(2, 6, 3) > 0.3
    q, idx, codes = m(z, mask=mask, return_all_codes=True)
    indices, side = m.encode(z, mask=mask)
    assert torch.equal(codes, m.get_codes_from_indices(indices, side))
    parts = m.decode_stages(indices, side)
    expect = torch.stack(parts) if channel_first else torch.stack(parts).movedim(2, -1)
    assert torch.equal(codes, expect)
    torch.testing.assert_close(codes.sum(0), q, rtol=1e-5, atol=1e-5)
    assert not codes.requires_grad


def test_fsq_layouts_and_flat_inputs(seed):
    f_first, f_last = FSQ([8, 5, 4]), FSQ([8, 5, 4], channel_first=False)
    z = torch.randn(2, 7, 3)  # channel-last
    q, idx = f_last(z)
    q1, idx1 = f_first(z.transpose(1, 2))
    assert torch.equal(q, q1.transpose(1, 2)) and torch.equal(idx, idx1)
    assert torch.equal(f_last.indices_to_codes(idx), q) and torch.equal(f_last.codes_to_indices(q), idx)
    qf, idxf = f_first(z[:, 0])
    assert qf.shape == (2, 3) and idxf.shape == (2,) and torch.equal(idxf, idx[:, 0])
    assert torch.equal(f_first.indices_to_codes(idxf), qf)


@pytest.mark.parametrize("other", [dict(levels=[8, 8, 8, 8]), dict(stages=4, levels=[8, 8, 8, 4]),
                                   dict(strategy="scale"), dict(dim=8)], ids=["levels", "stages", "strategy", "dim"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_loading_another_configuration_fails_clearly(strategy, other):
    saved = RFSQ(stages=2, strategy=strategy, levels=[8, 8, 8, 4]).state_dict()
    kwargs = {**dict(stages=2, strategy=strategy, levels=[8, 8, 8, 4]), **other}
    if kwargs["strategy"] == strategy and "strategy" in other:
        pytest.skip("same configuration")
    with pytest.raises(ValueError, match="different configuration"):
        RFSQ(**kwargs).load_state_dict(saved)
    with pytest.raises(ValueError, match="different configuration"):  # config checked even if shapes agree
        RFSQ(**kwargs).load_state_dict(saved, strict=False)


def test_checkpoints_round_trip_and_old_ones_still_load():
    m = randomize_(RFSQ(stages=2, strategy="layernorm", backend="triton"))
    buf = io.BytesIO()
    torch.save({"model": m.state_dict()}, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)["model"]
    fresh = RFSQ(stages=2, strategy="layernorm", backend="reference")
    fresh.load_state_dict(state)
    assert torch.equal(fresh.ln_weight, m.ln_weight)
    old = {k: v for k, v in state.items() if k != "_extra_state"}
    with pytest.warns(UserWarning, match="no stored configuration"):
        RFSQ(stages=2, strategy="layernorm").load_state_dict(old)
    with pytest.raises(ValueError, match=r"levels: checkpoint has \[8, 8, 8, 8\], this module has \[8, 8, 8, 4\]"):
        FSQ([8, 8, 8, 4]).load_state_dict(FSQ([8, 8, 8, 8]).state_dict())
    wrapped = torch.nn.Sequential(RFSQ(stages=2, strategy="none"))
    with pytest.raises(ValueError, match="stages: checkpoint has 4"):
        wrapped.load_state_dict(torch.nn.Sequential(RFSQ(stages=4, strategy="none", levels=[8, 8, 8, 4])).state_dict())


@pytest.mark.parametrize("kwargs,exc,match", [
    pytest.param(dict(dim=0), ValueError, "dim must be an int >= 1", id="dim"),
    pytest.param(dict(quantize_dropout=True, quantize_dropout_cutoff_index=2), ValueError,
                 r"cutoff_index must be an int in \[0, stages-1 = 1\]", id="dropout_cutoff_index"),
    pytest.param(dict(quantize_dropout_multiple_of=0), ValueError, "quantize_dropout_multiple_of must be an int >= 1",
                 id="dropout_multiple_of"),
])
def test_bad_new_constructor_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        RFSQ(stages=2, **kwargs)


@pytest.mark.parametrize("call,exc,match", [
    pytest.param(lambda m, z: m(z, mask=torch.ones(2, 5)), TypeError, "mask must be a bool tensor", id="float-mask"),
    pytest.param(lambda m, z: m(z, mask=torch.ones(2, 4, dtype=torch.bool)), ValueError,
                 r"mask must have shape \(B, \*spatial\) = \(2, 5\)", id="mask-shape"),
    pytest.param(lambda m, z: m(z, stages=0), ValueError, r"stages must be an int in \[1, 2\]", id="stages-0"),
    pytest.param(lambda m, z: m(z, stages=3), ValueError, r"stages must be an int in \[1, 2\]", id="stages-3"),
    pytest.param(lambda m, z: m(z, stages=torch.tensor([1, 3])), ValueError, r"must lie in \[0, 2\]",
                 id="per-sample-stages-range"),
    pytest.param(lambda m, z: m(z, stages=torch.tensor([1])), ValueError, r"shape \(B,\) = \(2,\)",
                 id="per-sample-stages-shape"),
    pytest.param(lambda m, z: m(z, stages=torch.tensor([1.0, 2.0])), TypeError, "integer", id="per-sample-stages-float"),
    pytest.param(lambda m, z: m(z.transpose(1, 2)), ValueError, "has 5 channels", id="channel-count"),
])
def test_bad_call_arguments(call, exc, match):
    with pytest.raises(exc, match=match):
        call(RFSQ(stages=2), torch.randn(2, 4, 5))


def test_fused_module_serves_k_stages_and_flat_inputs(seed):
    """backend='triton' (interpreter on CPU): the first k stages, and (B, C) inputs."""
    fused = randomize_(RFSQ(stages=4, strategy="layernorm", backend="triton"))
    ref = RFSQ(stages=4, strategy="layernorm", backend="reference")
    ref.load_state_dict(fused.state_dict())
    z = torch.randn(2, 5, 6, 7)
    q, idx = fused(z, stages=2)
    rq, ridx = ref(z, stages=2)
    assert idx.shape == (2, 6, 7, 2) and torch.equal(idx, ridx)
    torch.testing.assert_close(q, rq, rtol=1e-5, atol=1e-5)
    fused = randomize_(RFSQ(stages=2, strategy="scale", levels=[8, 5, 5], backend="triton"))
    ref = RFSQ(stages=2, strategy="scale", levels=[8, 5, 5], backend="reference")
    ref.load_state_dict(fused.state_dict())
    z = torch.randn(9, 3)
    (q, idx), (rq, ridx) = fused(z), ref(z)
    assert q.shape == (9, 3) and torch.equal(idx, ridx)
    torch.testing.assert_close(q, rq, rtol=1e-5, atol=1e-5)


def test_new_arguments_compile_without_graph_breaks(seed):
    """Channel-last, projections, mask and quantize dropout under torch.compile(fullgraph=True)."""
    m = RFSQ(stages=4, strategy="layernorm", channel_first=False, dim=8, quantize_dropout=True).train()
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    z = torch.randn(3, 10, 8, requires_grad=True)
    mask = torch.rand(3, 10) > 0.2
    q, idx = compiled(z, mask=mask)
    q.sum().backward()
    assert q.shape == z.shape and idx.shape == (3, 10, 4) and torch.isfinite(z.grad).all()
    assert ((idx == -1) | mask[..., None]).all()
