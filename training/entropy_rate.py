"""The real rate of a quantizer's tokens: what an entropy coder needs, not the nominal bits/token.

A token (one latent position) carries K stage indices; each index is split into its digits (one per
channel of FSQ / RFSQ / ResidualFSQ levels, one per bit of LFQ, the whole index of VQ). The model is
**factorized**: one categorical distribution per (stage, digit), fitted on the *training* tokens
(counts + :data:`PSEUDO_COUNT` per symbol, the Krichevsky–Trofimov estimator, so that a symbol never
seen in training stays codable). Encoder and decoder both know the model (it is a property of the
trained codec, not sent with each image). The held-out tokens of one image are range-coded with
`constriction <https://bamler-lab.github.io/constriction/>`_ into one bitstream; its size in bytes is
the real rate, and :func:`code_tokens` decodes it back and checks it is exact.

    digits, sizes = token_digits(model, loader)               # (N, D) digits, (D,) alphabet sizes
    probs = fit_factorized(train_digits, sizes)
    report = code_tokens(test_digits, probs)                  # bytes, bits/token, ideal bits/token
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import numpy as np
import torch

#: added to every symbol's count when fitting (KT estimator: 1/2).
PSEUDO_COUNT = 0.5


def digit_sizes(adapter) -> List[int]:
    """Alphabet size of each digit of one stage's index for a :class:`training.model.QuantizerAdapter`:
    the levels (FSQ, RFSQ, ResidualFSQ), ``[2] * dim`` (LFQ) or ``[codebook size]`` (VQ)."""
    kind, q = adapter.kind, adapter.quantizer
    if kind in ("rfsq", "fsq", "lucidrains", "vqpy"):
        return [int(v) for v in q.levels]
    if kind == "lfq":
        return [2] * int(q.dim)
    return [int(adapter.codebook_size)]


def split_digits(indices: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """``(N, K)`` packed stage indices -> ``(N, K * len(sizes))`` digits (mixed radix, place values
    ``cumprod([1] + sizes[:-1])``, the packing of every quantizer here). Raises ``ValueError`` when an
    index does not fit the sizes."""
    idx = indices.long()
    basis = torch.cumprod(torch.tensor([1] + list(sizes[:-1]), dtype=torch.int64), 0)
    lv = torch.tensor(list(sizes), dtype=torch.int64)
    digits = torch.div(idx[..., None], basis, rounding_mode="floor") % lv  # (N, K, D)
    if not torch.equal((digits * basis).sum(-1), idx):
        raise ValueError(f"indices outside the codebook of levels {list(sizes)}")
    return digits.reshape(idx.shape[0], -1)


@torch.no_grad()
def token_digits(model, loader) -> np.ndarray:
    """Every token's digits, ``(N, K * D)`` int32, of the images in ``loader`` (an
    :class:`training.model.AutoEncoder` in eval mode). Column ``k * D + d`` is stage k's digit d."""
    sizes = digit_sizes(model.quantizer)
    out = []
    for x in loader:
        x = x[0] if isinstance(x, (tuple, list)) else x
        _, idx, _ = model.quantizer(model.encoder(x))
        out.append(split_digits(idx.reshape(-1, idx.shape[-1]), sizes))
    return torch.cat(out).numpy().astype(np.int32)


def fit_factorized(digits: np.ndarray, sizes: Sequence[int], pseudo_count: float = PSEUDO_COUNT) -> List[np.ndarray]:
    """One probability vector per column of ``digits`` (``(N, K * len(sizes))``): counts + ``pseudo_count``,
    normalized. Column ``j`` has alphabet ``sizes[j % len(sizes)]``."""
    digits = np.asarray(digits)
    probs = []
    for j in range(digits.shape[1]):
        v = sizes[j % len(sizes)]
        counts = np.bincount(digits[:, j], minlength=v).astype(np.float64) + pseudo_count
        if len(counts) > v:
            raise ValueError(f"digit column {j} holds symbols >= its alphabet size {v}")
        probs.append(counts / counts.sum())
    return probs


def encode(digits: np.ndarray, probs: List[np.ndarray]) -> np.ndarray:
    """Range-code ``digits`` (``(N, J)``) column by column, each with its categorical; returns the
    compressed words (uint32)."""
    import constriction

    enc = constriction.stream.queue.RangeEncoder()
    for j, p in enumerate(probs):
        enc.encode(np.ascontiguousarray(digits[:, j], dtype=np.int32),
                   constriction.stream.model.Categorical(p, perfect=False))
    return enc.get_compressed()


def decode(compressed: np.ndarray, probs: List[np.ndarray], n: int) -> np.ndarray:
    """Inverse of :func:`encode` for ``n`` tokens."""
    import constriction

    dec = constriction.stream.queue.RangeDecoder(compressed)
    cols = [dec.decode(constriction.stream.model.Categorical(p, perfect=False), n) for p in probs]
    return np.stack(cols, axis=1).astype(np.int32) if cols else np.zeros((n, 0), np.int32)


def code_tokens(digits: np.ndarray, probs: List[np.ndarray]) -> Dict[str, float]:
    """Code ``digits`` into one bitstream, decode it and check the round trip (``RuntimeError`` if not
    exact). Returns ``bytes`` (of the bitstream), ``tokens``, ``bits_per_token`` (8 * bytes / tokens) and
    ``ideal_bits_per_token`` (the model's cross-entropy, what an ideal coder would need)."""
    digits = np.asarray(digits, dtype=np.int32)
    n = digits.shape[0]
    compressed = encode(digits, probs)
    if not np.array_equal(decode(compressed, probs, n), digits):
        raise RuntimeError("entropy-coded tokens did not decode back exactly")
    nbytes = int(compressed.nbytes)
    ideal = -sum(np.log2(p[digits[:, j]]).sum() for j, p in enumerate(probs))
    return {"bytes": nbytes, "tokens": n, "bits_per_token": 8.0 * nbytes / max(n, 1),
            "ideal_bits_per_token": float(ideal) / max(n, 1)}
