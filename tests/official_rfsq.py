"""The official RFSQ code's math, re-implemented for the tests from its description (SPEC.md, "The
official RFSQ code"; issue 30): this project's own code, not a copy.

``OfficialStyleRFSQ(num_stages, strategy, fsq_levels, dim=None, initial_scale=1.0)``, stages in
``self.stages``; a scale stage holds ``log_scale`` (initialised to ``log(initial_scale)``, used as
``softplus``), a layernorm stage ``layernorm.weight`` / ``layernorm.bias`` ``(C,)``, statistics
over H, W with ``var(unbiased=False)`` and ``sqrt(var + 1e-5)``. FSQ per channel: ``half_l =
(L-1)(1-1e-3)/2``, ``shift = tan(offset / half_l)`` (float64 constants rounded to float32),
``round_ste(tanh(z + shift) * half_l - offset) / (L // 2)``; the index packs the float digits
``code * half_w + half_w`` and truncates with ``.to(int32)``. Input ``(B, C, H, W)``.

The comparison harness shared by ``tests/dropins/test_official.py`` and ``bench/official_parity.py``
follows the model: ``CASES``, :func:`official_model` (a model with trained-looking parameters) and
:func:`check_against_official` (both models on one input, forward and backward).
"""
from __future__ import annotations

import math
from typing import List

import torch
import torch.nn.functional as F
from torch import nn

from rfsq_kernels import from_official


def _column(values, ref: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=ref.device).view(1, -1, 1, 1)


class OfficialStyleFSQ(nn.Module):
    def __init__(self, levels: List[int], eps: float = 1e-3):
        super().__init__()
        self.levels = list(levels)
        self.half_l = [(L - 1) * (1 - eps) / 2 for L in levels]
        self.offset = [0.5 if L % 2 == 0 else 0.0 for L in levels]
        self.shift = [math.tan(o / h) for o, h in zip(self.offset, self.half_l)]
        self.half_w = [L // 2 for L in levels]
        basis, acc = [], 1
        for L in levels:
            basis.append(acc)
            acc *= L
        self.basis = basis

    def forward(self, z: torch.Tensor):
        half_l, offset = _column(self.half_l, z), _column(self.offset, z)
        shift, half_w = _column(self.shift, z), _column(self.half_w, z)
        bounded = torch.tanh(z + shift) * half_l - offset
        rounded = bounded + (torch.round(bounded) - bounded).detach()
        codes = rounded / half_w
        digits = codes * half_w + half_w
        indices = (digits * _column(self.basis, z)).sum(dim=1).to(torch.int32)
        return codes, indices


class OfficialStyleLayerNorm(nn.Module):
    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x):
        self.mean = x.mean(dim=[2, 3], keepdim=True)
        self.std = torch.sqrt(x.var(dim=[2, 3], keepdim=True, unbiased=False) + self.eps)
        return self.weight.view(1, -1, 1, 1) * ((x - self.mean) / self.std) + self.bias.view(1, -1, 1, 1)

    def inverse(self, y):
        return ((y - self.bias.view(1, -1, 1, 1)) / self.weight.view(1, -1, 1, 1)) * self.std + self.mean


class _Stage(nn.Module):
    def __init__(self, strategy: str, levels: List[int], dim, initial_scale: float):
        super().__init__()
        self.strategy = strategy
        self.fsq = OfficialStyleFSQ(levels)
        if strategy == "scale":
            self.log_scale = nn.Parameter(torch.log(torch.tensor(initial_scale)))
        elif strategy == "layernorm":
            self.layernorm = OfficialStyleLayerNorm(dim)

    def forward(self, r):
        if self.strategy == "scale":
            a = F.softplus(self.log_scale)
            codes, idx = self.fsq(r * a)
            q = codes / a
        elif self.strategy == "layernorm":
            codes, idx = self.fsq(self.layernorm(r))
            q = self.layernorm.inverse(codes)
        else:
            q, idx = self.fsq(r)
        return q, r - q, idx


class OfficialStyleRFSQ(nn.Module):
    def __init__(self, num_stages: int, strategy: str, fsq_levels: List[int], dim=None, initial_scale: float = 1.0):
        super().__init__()
        self.num_stages, self.strategy = num_stages, strategy
        self.stages = nn.ModuleList([_Stage(strategy, fsq_levels, dim, initial_scale) for _ in range(num_stages)])

    def forward(self, z):
        qs, idx, r = [], [], z
        for stage in self.stages:
            q, r, i = stage(r)
            qs.append(q)
            idx.append(i)
        return sum(qs), torch.stack(idx, dim=-1)


#: ``(num_stages, levels)``: the two paper configurations the comparisons run.
CASES = [(2, [8, 8, 8, 4]), (4, [4, 4, 4, 4, 4])]


def official_model(K: int, strategy: str, levels: List[int], seed: int) -> OfficialStyleRFSQ:
    """An official-style model of ``K`` stages whose scale / layernorm parameters are drawn from
    ``seed`` (trained-looking values, so the comparison does not rest on the initial ones)."""
    torch.manual_seed(seed)
    off = OfficialStyleRFSQ(K, strategy, levels, dim=len(levels), initial_scale=1.0)
    with torch.no_grad():  # trained-looking parameters, not the initial ones
        for stage in off.stages:
            if strategy == "scale":
                stage.log_scale.copy_(torch.randn(()) * 0.5 + 1.0)
            elif strategy == "layernorm":
                stage.layernorm.weight.copy_(1 + 0.3 * torch.randn(len(levels)))
                stage.layernorm.bias.copy_(0.2 * torch.randn(len(levels)))
    return off


def _bounded_per_stage(off, z):
    """The official pre-rounding values of each stage, ``(K, B, C, H, W)``."""
    seen = []
    for stage in off.stages:
        stage.fsq.register_forward_pre_hook(lambda m, args: seen.append(
            (torch.tanh(args[0] + torch.tensor(m.shift).view(1, -1, 1, 1)) * torch.tensor(m.half_l).view(1, -1, 1, 1)
             - torch.tensor(m.offset).view(1, -1, 1, 1)).detach()))
    out = off(z)
    return out, torch.stack(seen)


def _run(module, z, g):
    z = z.detach().clone().requires_grad_()
    q, idx = module(z)
    (q * g).sum().backward()
    return q.detach(), idx, z.grad, [p.grad.clone() for p in module.parameters()]


def check_against_official(strategy: str, K: int, levels: List[int], seed: int, backend: str = "reference"):
    """Run :func:`official_model` and its ``from_official`` copy on one input drawn from ``seed + 1``,
    forward and backward with one random incoming gradient. Returns ``(bounded, official, ours)``:
    the official pre-rounding values per stage ``(K, B, C, H, W)``, and for each model
    ``(values, indices, grad of z, grads of its parameters)``."""
    off = official_model(K, strategy, levels, seed)
    ours = from_official(off, backend=backend)
    torch.manual_seed(seed + 1)
    z = torch.randn(4, len(levels), 8, 8) * 1.5
    g = torch.randn_like(z)
    (q_off, idx_off), bounded = _bounded_per_stage(off, z)
    q1, i1, gz1, gp1 = _run(off, z, g)
    q2, i2, gz2, gp2 = _run(ours, z, g)
    assert torch.equal(q1, q_off) and i2.dtype == i1.dtype == torch.int32 and i2.shape == i1.shape
    return bounded, (q1, i1, gz1, gp1), (q2, i2, gz2, gp2)
