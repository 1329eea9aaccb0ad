"""End-to-end training-step benchmark: images/s of one step of the paper's setup.

One step = the SPEC encoder/decoder with ``RFSQ(stages=4, strategy='layernorm')`` (the paper's best,
40 bits/token), loss L1 + LPIPS-VGG + aux, backward, grad-norm clip 1.0, Adam step (fused on CUDA);
batch 128 of 128x128 images on CUDA. Variants: quantizer fused (Triton) vs reference, fp32 vs bf16
autocast, channels_last off/on, torch.compile off/on. LPIPS uses a random VGG backbone
(``pnet_rand``): timing does not depend on the weights, so no download is needed.

On CPU (CI: ``pytest bench/ --benchmark-disable``) it runs tiny sizes (batch 2, 32x32, width 8)
so the code cannot rot; the fused and compile variants are CUDA-only and skipped with a reason.
``benchmark.extra_info`` holds ``images_per_s`` (own timing: median of timed steps after warm-up).
"""
from __future__ import annotations

import functools
import statistics
import time

import pytest
import torch

from training.lpips_loss import ReconstructionLoss, build_lpips
from training.model import AutoEncoder, build_quantizer

CUDA = torch.cuda.is_available()
BATCH, SIZE, WIDTH = (128, 128, 128) if CUDA else (2, 32, 8)
WARMUP, TIMED = (5, 20) if CUDA else (1, 2)


@functools.lru_cache(maxsize=1)
def _lpips(device: str) -> torch.nn.Module:
    """One frozen LPIPS-VGG (random backbone) per session: building VGG16 takes seconds."""
    return build_lpips(None).to(device)


def _make_step(backend: str, amp: str, channels_last: bool, compile_: bool):
    device = torch.device("cuda" if CUDA else "cpu")
    torch.manual_seed(0)
    model = AutoEncoder(build_quantizer("rfsq", rfsq_stages=4, rfsq_strategy="layernorm", backend=backend), width=WIDTH).to(device)
    lpips_model = _lpips(str(device))
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model, lpips_model = model.to(memory_format=fmt), lpips_model.to(memory_format=fmt)
    loss_fn = ReconstructionLoss(lpips_model)
    fwd = torch.compile(model) if compile_ else model
    opt = torch.optim.Adam(model.parameters(), lr=8e-4, weight_decay=5e-5, **({"fused": True} if CUDA else {}))
    x = torch.randn(BATCH, 3, SIZE, SIZE, device=device).contiguous(memory_format=fmt)
    dtype = torch.bfloat16 if amp == "bf16" else None

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            recon, _, _, aux = fwd(x)
            loss, _ = loss_fn(recon, x, aux)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if CUDA:
            torch.cuda.synchronize()

    return step


@pytest.mark.parametrize("compile_", [False, True], ids=["eager", "compile"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("amp", ["fp32", "bf16"])
@pytest.mark.parametrize("backend", ["triton", "reference"], ids=["fused", "reference"])
def test_train_step(benchmark, backend: str, amp: str, channels_last: bool, compile_: bool) -> None:
    """images/s of one training step for this variant (see the module docstring)."""
    if not CUDA and backend == "triton":
        pytest.skip("fused quantizer variant needs CUDA (interpreter timings are meaningless)")
    if not CUDA and compile_:
        pytest.skip("torch.compile variant is timed on CUDA only (on CPU, compile time would dominate CI)")
    step = _make_step(backend, amp, channels_last, compile_)
    for _ in range(WARMUP):
        step()
    times = []
    for _ in range(TIMED):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    med = statistics.median(times)
    benchmark.extra_info.update({
        "images_per_s": BATCH / med, "batch": BATCH, "image_size": SIZE, "model_width": WIDTH,
        "device": torch.cuda.get_device_name() if CUDA else "cpu", "quantizer": "rfsq4-ln", "backend": backend,
        "amp": amp, "channels_last": channels_last, "compile": compile_,
    })
    benchmark(step)
