"""Bad input gets a clear error naming the argument and what was expected."""
import pytest
import torch

from rfsq_kernels import FSQ, LFQ, RFSQ, VQEMA


@pytest.mark.parametrize("kwargs,exc,match", [
    pytest.param(dict(levels=[]), ValueError, "levels must not be empty", id="levels-empty"),
    pytest.param(dict(levels=[8, 1, 4]), ValueError, r"levels\[1\]=1", id="levels-one"),
    pytest.param(dict(levels=[8, 2.5]), TypeError, r"levels\[1\] must be an int", id="levels-float"),
    pytest.param(dict(levels=8), TypeError, "levels must be a sequence", id="levels-scalar"),
    pytest.param(dict(strategy="ln"), ValueError, "strategy must be one of", id="strategy-unknown"),
    pytest.param(dict(backend="cuda"), ValueError, "backend must be one of", id="backend-unknown"),
    pytest.param(dict(stages=0), ValueError, "stages must be >= 1", id="stages-0"),
    pytest.param(dict(stages=2.0), TypeError, "stages must be an int", id="stages-float"),
    pytest.param(dict(stages=3), ValueError, "stages=3 has no default levels", id="stages-3-no-default-levels"),
    pytest.param(dict(strategy="scale", initial_scale=0.0), ValueError, "initial_scale must be a finite number > 0",
                 id="initial_scale-0"),
])
def test_bad_constructor_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        RFSQ(**kwargs)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("z,exc,match", [
    pytest.param(torch.randn(2, 3, 8, 8), ValueError, "has 3 channels .* expects 4", id="channel-count"),
    pytest.param(torch.randn(2, 4), ValueError, "strategy='layernorm' normalizes each channel over",
                 id="layernorm-without-positions"),
    pytest.param(torch.randn(4), ValueError, "channel-first", id="rank-1"),
    pytest.param(torch.randint(0, 5, (2, 4, 8, 8)), TypeError, "floating-point", id="integer-dtype"),
    pytest.param(torch.ones(2, 4, 8, 8, dtype=torch.bool), TypeError, "floating-point", id="bool-dtype"),
    pytest.param([[1.0]], TypeError, "must be a torch.Tensor", id="not-a-tensor"),
])
def test_bad_latents(backend, z, exc, match):
    with pytest.raises(exc, match=match):
        RFSQ(stages=2, backend=backend)(z)


def test_bad_codec_inputs():
    m = RFSQ(stages=2)
    idx, side = m.encode(torch.randn(2, 4, 4, 4))
    with pytest.raises(ValueError, match="side must be"):
        m.decode(idx, None)
    with pytest.raises(ValueError, match=r"side must be .*side\[:, :k\]"):
        m.decode(idx[..., :1], side)
    with pytest.raises(ValueError, match="indices must have shape"):
        m.decode(torch.cat([idx, idx], dim=-1), side)
    with pytest.raises(TypeError, match="indices must be an integer"):
        m.decode(idx.float(), side)


def test_triton_backend_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="backend='triton' runs on CUDA tensors"):
        RFSQ(stages=2, backend="triton")(torch.randn(1, 4, 4, 4))


def test_other_quantizers_check_channels():
    with pytest.raises(ValueError, match="expects 4"):
        FSQ([8, 8, 8, 8])(torch.randn(1, 3, 4, 4))
    with pytest.raises(ValueError, match="expects 12"):
        LFQ(12)(torch.randn(1, 3, 4, 4))
    with pytest.raises(ValueError, match="expects 6"):
        VQEMA(16, 6)(torch.randn(1, 3, 4, 4))
