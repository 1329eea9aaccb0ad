"""Where vector-quantize-pytorch's late ResidualFSQ stages come from (issue 30, item 3).

At the library's README configuration (``dim=256, levels=[8, 5, 5, 3], num_quantizers=8``, input
``randn(1, 1024, 256)``), counts per stage the indices that differ from the library's:
- ``ref``: our reference path;
- ``nudge_x`` / ``nudge_h``: the library itself, with its input / its soft clamp's input moved by
  one ulp (``torch.nextafter``);
- ``fused``: our fused path (in the Triton interpreter on CPU: its exp-based tanh);
- ``fused_vs_kernel_tanh``: our fused path against the library fed with the same tanh.

Run: ``python bench/vq_deep_stages.py [seeds]`` (sets TRITON_INTERPRET=1 without a GPU).
Results are in docs/migrating-from-vector-quantize-pytorch.md ("Deep stages").
"""
import copy
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

import vector_quantize_pytorch as vq  # noqa: E402
from vq_client_helpers import library_rfsq_with_kernel_tanh  # noqa: E402

from rfsq_kernels import vqpytorch as ours  # noqa: E402


def _up(t: torch.Tensor) -> torch.Tensor:
    return torch.nextafter(t, torch.full_like(t, float("inf")))


def measure(seed: int, device: str = "cuda" if torch.cuda.is_available() else "cpu") -> dict:
    torch.manual_seed(seed)
    kw = dict(dim=256, levels=[8, 5, 5, 3], num_quantizers=8)
    lib = vq.ResidualFSQ(**kw).eval().to(device)
    ref = ours.ResidualFSQ(backend="reference", **kw).eval().to(device)
    fused = ours.ResidualFSQ(backend="triton", **kw).eval().to(device)
    ref.load_state_dict(lib.state_dict())
    fused.load_state_dict(lib.state_dict())
    x = torch.randn(1, 1024, 256, device=device)
    with torch.no_grad():
        idx = lib(x)[1]
        h = lib.project_in(x)
        no_proj = copy.deepcopy(lib)
        no_proj.project_in = torch.nn.Identity()
        runs = {"ref": ref(x)[1], "nudge_x": lib(_up(x))[1], "nudge_h": no_proj(_up(h))[1], "fused": fused(x)[1]}
        kernel_tanh = library_rfsq_with_kernel_tanh(lib, x)[1]
    out = {name: [int((i[..., k] != idx[..., k]).sum()) for k in range(8)] for name, i in runs.items()}
    out["fused_vs_kernel_tanh"] = [int((runs["fused"][..., k] != kernel_tanh[..., k]).sum()) for k in range(8)]
    return out


if __name__ == "__main__":
    torch.set_num_threads(1)
    for s in range(int(sys.argv[1]) if len(sys.argv) > 1 else 5):
        print(s, measure(s), flush=True)
