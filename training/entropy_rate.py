"""The real rate of a quantizer's tokens: what an entropy coder needs, not the nominal bits/token.

A token (one latent position) carries K stage indices; each index is split into its digits (one per
channel of FSQ / RFSQ / ResidualFSQ levels, one per bit of LFQ, the whole index of VQ). The model is
**factorized**: one categorical distribution per (stage, digit), fitted on the *training* tokens
(counts + :data:`PSEUDO_COUNT` per symbol, the Krichevsky–Trofimov estimator, so that a symbol never
seen in training stays codable). Encoder and decoder both know the model (it is a property of the
trained codec, not sent with each image). The held-out tokens of one image are range-coded with
`constriction <https://bamler-lab.github.io/constriction/>`_ into one bitstream; a header bit per
column says whether that column uses the fitted model or the uniform one (whichever is cheaper on this
image: a codec never needs more than the nominal bits plus the header). Its size in bytes is the real
rate, and :func:`code_tokens` decodes it back and checks it is exact.

    digits, sizes = token_digits(model, loader)               # (N, D) digits, (D,) alphabet sizes
    probs = fit_factorized(train_digits, sizes)
    report = code_tokens(test_digits, probs)                  # bytes, bits/token, ideal bits/token
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

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


def choose_models(digits: np.ndarray, probs: List[np.ndarray]) -> List[bool]:
    """Per column: True to code it with the fitted model, False to fall back to the uniform one (when
    the fitted model would cost more than ``log2(alphabet)`` bits per symbol on these digits, e.g. when
    the held-out photo's codes are spread wider than the training photos')."""
    n = max(len(digits), 1)
    return [float(-np.log2(p[digits[:, j]]).sum()) / n <= np.log2(len(p)) for j, p in enumerate(probs)]


def _models(probs: List[np.ndarray], fitted: Sequence[bool]):
    import constriction

    cat = constriction.stream.model.Categorical
    return [cat(p if f else np.full(len(p), 1.0 / len(p)), perfect=False) for p, f in zip(probs, fitted)]


def encode(digits: np.ndarray, probs: List[np.ndarray], fitted: Optional[Sequence[bool]] = None) -> np.ndarray:
    """Range-code ``digits`` (``(N, J)``) into one stream: a header of one bit per column (fitted model or
    uniform, see :func:`choose_models`; default: :func:`choose_models`), then each column with its model.
    Returns the compressed words (uint32)."""
    import constriction

    fitted = choose_models(digits, probs) if fitted is None else list(fitted)
    enc = constriction.stream.queue.RangeEncoder()
    enc.encode(np.asarray(fitted, dtype=np.int32), constriction.stream.model.Categorical(np.array([0.5, 0.5]),
                                                                                         perfect=False))
    for j, model in enumerate(_models(probs, fitted)):
        enc.encode(np.ascontiguousarray(digits[:, j], dtype=np.int32), model)
    return enc.get_compressed()


def decode(compressed: np.ndarray, probs: List[np.ndarray], n: int) -> np.ndarray:
    """Inverse of :func:`encode` for ``n`` tokens."""
    import constriction

    dec = constriction.stream.queue.RangeDecoder(compressed)
    fitted = dec.decode(constriction.stream.model.Categorical(np.array([0.5, 0.5]), perfect=False), len(probs))
    cols = [dec.decode(model, n) for model in _models(probs, [bool(f) for f in fitted])]
    return np.stack(cols, axis=1).astype(np.int32) if cols else np.zeros((n, 0), np.int32)


def code_tokens(digits: np.ndarray, probs: List[np.ndarray]) -> Dict[str, float]:
    """Code ``digits`` into one bitstream (:func:`encode`), decode it and check the round trip
    (``RuntimeError`` if not exact). Returns ``bytes`` (of the whole bitstream), ``tokens``,
    ``bits_per_token`` (8 * bytes / tokens), ``ideal_bits_per_token`` (the cross-entropy of the models
    used, what an ideal coder would need; ``ideal_bits_per_column`` per column) and ``uniform_columns``
    (columns that fell back to uniform)."""
    digits = np.asarray(digits, dtype=np.int32)
    n = digits.shape[0]
    fitted = choose_models(digits, probs)
    compressed = encode(digits, probs, fitted)
    if not np.array_equal(decode(compressed, probs, n), digits):
        raise RuntimeError("entropy-coded tokens did not decode back exactly")
    nbytes = int(compressed.nbytes)
    columns = [float(-np.log2(p[digits[:, j]]).sum() / max(n, 1)) if f else float(np.log2(len(p)))
               for j, (p, f) in enumerate(zip(probs, fitted))]
    return {"bytes": nbytes, "tokens": n, "bits_per_token": 8.0 * nbytes / max(n, 1),
            "ideal_bits_per_token": float(sum(columns)), "ideal_bits_per_column": columns,
            "uniform_columns": int(len(fitted) - sum(fitted))}
