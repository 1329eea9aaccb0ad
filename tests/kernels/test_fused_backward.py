"""Fused kernels vs the reference: forward outputs and every gradient, several tiles per image
(the split layernorm path), stride-0 incoming gradients and bitwise determinism (CPU: Triton interpreter)."""
import pytest
import torch

from fused_helpers import compare, draw_input, run_both
from rfsq_kernels.fused import rfsq_fused
from rfsq_kernels.kernels import config
from rfsq_kernels.reference import STRATEGIES, rfsq_forward
from rfsq_kernels.testing import random_strategy_params

# odd extents that never divide a power-of-two block
SHAPES = {3: (2, 37), 4: (2, 5, 7), 5: (2, 3, 4, 5)}
LEVELS = {1: [7, 2, 16], 2: [8, 8, 8, 4], 4: [4, 4, 4, 4, 4]}


def _shape(rank, levels):
    b, *spatial = SHAPES[rank]
    return (b, len(levels), *spatial)


def _dtype_layout(dtype: torch.dtype, channels_last: bool):
    name = {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]
    return pytest.param(dtype, channels_last, id=f"{name}-{'channels_last' if channels_last else 'contiguous'}")


@pytest.mark.parametrize("dtype,channels_last", [_dtype_layout(torch.float32, False),
                                                 _dtype_layout(torch.bfloat16, True)])
@pytest.mark.parametrize("rank", [3, 4, 5])
@pytest.mark.parametrize("stages", [1, 2, 4])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_matches_reference(seed, strategy, stages, rank, dtype, channels_last):
    levels = LEVELS[stages]
    params = random_strategy_params(strategy, stages, len(levels))
    z = draw_input(_shape(rank, levels), levels, stages, strategy, params, dtype=dtype,
                   channels_last=channels_last)
    g = torch.randn(z.shape)
    fused, ref = run_both(rfsq_fused, rfsq_forward, z, levels, stages, strategy, params, grad=g)
    compare(fused, ref)
    assert fused["out"][0].stride() == z.stride(), "quantized keeps the input's memory layout"
    assert fused["grads"]["z"].stride() == z.stride()


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("dtype,channels_last", [_dtype_layout(torch.float32, True),
                                                 _dtype_layout(torch.bfloat16, False)])
def test_other_dtype_layout_pairs(seed, strategy, dtype, channels_last):
    levels, stages = [8, 5, 3, 4], 2
    params = random_strategy_params(strategy, stages, len(levels))
    z = draw_input((2, 4, 5, 7), levels, stages, strategy, params, dtype=dtype, channels_last=channels_last)
    compare(*run_both(rfsq_fused, rfsq_forward, z, levels, stages, strategy, params))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_expanded_incoming_grad(seed, strategy):
    """``out.sum().backward()`` feeds a stride-0 expanded gradient; it must be read correctly."""
    levels, stages = [8, 5, 3, 4], 3
    params = random_strategy_params(strategy, stages, len(levels))
    z = draw_input((2, 4, 6, 5), levels, stages, strategy, params)
    fused, ref = run_both(rfsq_fused, rfsq_forward, z, levels, stages, strategy, params, grad=None)
    compare(fused, ref)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_several_tiles_per_image(seed, monkeypatch, strategy):
    """Small tiles force several spatial blocks (none/scale) and the split layernorm forward and
    backward (S=45 positions; a base tile of 16, cut further by the split kernels)."""
    monkeypatch.setattr(config, "MAX_BLOCK_ELEMS", 64)
    levels, stages = [8, 5, 3, 4], 2
    # the split path, from a base tile of 16 positions
    assert config.layernorm_tiles(4, 45) == config.Tiles(4, 16, 1, False, config.SPLIT_LAYERNORM_MAXNREG)
    params = random_strategy_params(strategy, stages, len(levels))
    z = draw_input((2, 4, 5, 9), levels, stages, strategy, params)
    g = torch.randn(z.shape)
    compare(*run_both(rfsq_fused, rfsq_forward, z, levels, stages, strategy, params, grad=g))


def test_several_tiles_bf16_channels_last(seed, monkeypatch):
    monkeypatch.setattr(config, "MAX_BLOCK_ELEMS", 64)
    levels, stages, strategy = [8, 5, 3, 4], 2, "layernorm"
    params = random_strategy_params(strategy, stages, len(levels))
    z = draw_input((1, 4, 5, 7), levels, stages, strategy, params, dtype=torch.bfloat16, channels_last=True)
    compare(*run_both(rfsq_fused, rfsq_forward, z, levels, stages, strategy, params))


# layernorm with several tiles per image runs the split kernels, whose reruns are checked bitwise
# in tests/kernels/test_layernorm_split.py and test_layernorm_split_backward.py.
@pytest.mark.parametrize("strategy,tiled", [("scale", False), ("scale", True), ("layernorm", False)])
def test_backward_is_deterministic(seed, monkeypatch, strategy, tiled):
    """Parameter gradients come from per-program partials summed in a fixed order."""
    if tiled:
        monkeypatch.setattr(config, "MAX_BLOCK_ELEMS", 64)
    levels, stages = [8, 5, 3, 4], 2
    params = random_strategy_params(strategy, stages, len(levels))
    z = torch.randn(3, 4, 6, 7)
    g = torch.randn(z.shape)
    runs = [run_both(rfsq_fused, rfsq_fused, z, levels, stages, strategy, params, grad=g) for _ in range(2)]
    first = runs[0][0]["grads"]
    for result in (runs[0][1], runs[1][0], runs[1][1]):
        for name, value in first.items():
            assert torch.equal(value, result["grads"][name]), name


@pytest.mark.parametrize("split", [False, True])
def test_layernorm_backward_reads_int64_indices(seed, monkeypatch, split):
    """prod(levels) >= 2**31: the backward (single tile or split) rebuilds the residuals from int64 indices."""
    if split:
        monkeypatch.setattr(config, "MAX_BLOCK_ELEMS", 64)
    levels, stages, strategy = [16] * 8, 3, "layernorm"
    params = random_strategy_params(strategy, stages, len(levels))
    z = draw_input((2, 8, 3, 5), levels, stages, strategy, params)
    assert config.layernorm_tiles(8, 15, "backward").one_tile != split
    fused, ref = run_both(rfsq_fused, rfsq_forward, z, levels, stages, strategy, params, grad=torch.randn(z.shape))
    assert fused["out"][1].dtype == torch.int64
    compare(fused, ref)
