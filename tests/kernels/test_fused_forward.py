"""Forward-only properties of the fused kernels (CPU: Triton interpreter): level sets from C=1 to
C=16 and int64 indices, non-finite input, layouts, the module path, bad input and empty batches."""
import pytest
import torch

from fused_helpers import assert_close_values, assert_values_match, draw_input
from rfsq_kernels import RFSQ
from rfsq_kernels.fused import rfsq_fused
from rfsq_kernels.kernels import layouts
from rfsq_kernels.reference import STRATEGIES, codebook_size, rfsq_forward
from rfsq_kernels.testing import random_strategy_params


def _compare_forward(z, levels, stages, strategy, params):
    with torch.no_grad():
        out = rfsq_fused(z, levels, stages, strategy, **params)
        ref = rfsq_forward(z, levels, stages, strategy, **params)
    assert out[1].dtype == ref[1].dtype and torch.equal(out[1], ref[1])
    assert_values_match(out[0], ref[0], out[2])
    for name, a, e in zip(("mean", "std"), (out[2], out[3]), (ref[2], ref[3])):
        assert_close_values(a, e, name)
    return out


@pytest.mark.parametrize("levels", [[5], [2, 3], [8, 8, 8, 4, 7, 6], [3] * 16, [16] * 8],
                         ids=["C1", "C2", "C6", "C16", "int64-index"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_level_sets(seed, strategy, levels):
    stages = 2
    params = random_strategy_params(strategy, stages, len(levels))
    z = draw_input((2, len(levels), 3, 5), levels, stages, strategy, params)
    out = _compare_forward(z, levels, stages, strategy, params)
    assert out[1].dtype == (torch.int64 if codebook_size(levels) >= 2**31 else torch.int32)


@pytest.mark.parametrize("stages", [3, 8])
def test_many_stages(seed, stages):
    levels = [4, 4, 4, 4, 4]
    for strategy in ("none", "layernorm"):
        params = random_strategy_params(strategy, stages, len(levels))
        z = draw_input((1, 5, 4, 6), levels, stages, strategy, params, max_tries=2000)
        _compare_forward(z, levels, stages, strategy, params)


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # NaN arithmetic in the interpreter
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_non_finite_input_gives_valid_indices(seed, strategy):
    levels, stages = [8, 5, 3, 4], 2
    params = random_strategy_params(strategy, stages, len(levels))
    z = torch.randn(2, 4, 3, 5)
    z[0, 0, 0, 0], z[0, 1, 1, 1], z[1, 2, 2, 2] = float("nan"), float("inf"), float("-inf")
    q, idx, _, _ = rfsq_fused(z, levels, stages, strategy, **params)
    assert int(idx.min()) >= 0 and int(idx.max()) < codebook_size(levels)
    ref_idx = rfsq_forward(z, levels, stages, strategy, **params)[1]
    if strategy != "layernorm":  # LN: NaN/inf poisons the (b, c) statistics; only the range is checked
        assert torch.equal(idx, ref_idx)


def test_non_flattenable_spatial_layout(seed):
    """Spatial dims that cannot be one strided index go through one explicit contiguous copy."""
    levels, stages, strategy = [8, 5, 3, 4], 2, "scale"
    params = random_strategy_params(strategy, stages, len(levels))
    base = draw_input((2, 4, 7, 5), levels, stages, strategy, params)
    z = base.transpose(2, 3)  # (B, C, W, H) view: H and W strides are not nested
    assert layouts.flat_spatial_stride(z) is None
    out = _compare_forward(z, levels, stages, strategy, params)
    assert out[0].is_contiguous()
    # a strided (non-dense) but flattenable input is read in place
    z2 = draw_input((2, 4, 30), levels, stages, strategy, params)[:, :, ::2]
    assert layouts.flat_spatial_stride(z2) == 2
    _compare_forward(z2, levels, stages, strategy, params)


@pytest.mark.parametrize("strategy", ["none", "layernorm"])
def test_module_backend_triton(seed, strategy):
    levels = [8, 8, 8, 4]
    fused = RFSQ(stages=2, strategy=strategy, levels=levels, backend="triton")
    ref = RFSQ(stages=2, strategy=strategy, levels=levels, backend="reference")
    ref.load_state_dict(fused.state_dict())
    params = fused.strategy_parameters()
    z = draw_input((2, 4, 6, 5), levels, 2, strategy, params)
    with torch.no_grad():
        (q, idx), (rq, ridx) = fused(z), ref(z)
    assert torch.equal(idx, ridx)
    assert_close_values(q, rq, "quantized")
    indices, side = fused.encode(z)
    assert_close_values(fused.decode(indices, side), rq, "decode(encode(z))")


@pytest.mark.parametrize("bad, error", [
    pytest.param(torch.randn(2, 3, 4, 4), ValueError, id="wrong-channel-count"),
    pytest.param(torch.randn(2, 4), ValueError, id="rank-below-3"),
    pytest.param(torch.ones(2, 4, 4, 4, dtype=torch.int32), TypeError, id="integer-dtype"),
])
def test_bad_input_errors_on_fused_path(bad, error):
    model = RFSQ(stages=2, strategy="layernorm", levels=[8, 8, 8, 4], backend="triton")
    with pytest.raises(error):
        model(bad)


@pytest.mark.parametrize("shape", [(0, 4, 3, 5), (2, 4, 0, 5)])
@pytest.mark.parametrize("strategy", ["none", "layernorm"])
def test_empty_inputs(strategy, shape):
    levels, stages = [8, 8, 8, 4], 2
    params = random_strategy_params(strategy, stages, len(levels), requires_grad=True)
    z = torch.randn(shape, requires_grad=True)
    out = rfsq_fused(z, levels, stages, strategy, **params)
    ref = rfsq_forward(z, levels, stages, strategy, **params)
    for a, e in zip(out, ref):
        assert a.shape == e.shape and a.dtype == e.dtype
    out[0].sum().backward()
    assert z.grad.shape == z.shape
