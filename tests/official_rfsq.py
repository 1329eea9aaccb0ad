"""The official RFSQ code's math, re-implemented for the tests from its description (SPEC.md, "The
official RFSQ code"; issue 30): this project's own code, not a copy.

``OfficialStyleRFSQ(num_stages, strategy, fsq_levels, dim=None, initial_scale=1.0)``, stages in
``self.stages``; a scale stage holds ``log_scale`` (initialised to ``log(initial_scale)``, used as
``softplus``), a layernorm stage ``layernorm.weight`` / ``layernorm.bias`` ``(C,)``, statistics
over H, W with ``var(unbiased=False)`` and ``sqrt(var + 1e-5)``. FSQ per channel: ``half_l =
(L-1)(1-1e-3)/2``, ``shift = tan(offset / half_l)`` (float64 constants rounded to float32),
``round_ste(tanh(z + shift) * half_l - offset) / (L // 2)``; the index packs the float digits
``code * half_w + half_w`` and truncates with ``.to(int32)``. Input ``(B, C, H, W)``.
"""
from __future__ import annotations

import math
from typing import List

import torch
import torch.nn.functional as F
from torch import nn


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
