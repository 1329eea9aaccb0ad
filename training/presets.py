"""The paper's 9 quantizer configurations (``--preset``) and its Table 1 numbers."""
from __future__ import annotations

from typing import Dict, List

#: preset name -> training-script defaults it sets (explicit flags still override them).
PRESETS: Dict[str, dict] = {
    "vq-ema": dict(quantizer="ema", n_embed=4096, embed_dim=6),
    "fsq": dict(quantizer="fsq", levels=[8, 8, 8, 8]),
    "lfq": dict(quantizer="lfq", lfq_dim=12),
    "rfsq2-none": dict(quantizer="rfsq", rfsq_stages=2, rfsq_strategy="none"),
    "rfsq2-scale": dict(quantizer="rfsq", rfsq_stages=2, rfsq_strategy="scale"),
    "rfsq2-ln": dict(quantizer="rfsq", rfsq_stages=2, rfsq_strategy="layernorm"),
    "rfsq4-none": dict(quantizer="rfsq", rfsq_stages=4, rfsq_strategy="none"),
    "rfsq4-scale": dict(quantizer="rfsq", rfsq_stages=4, rfsq_strategy="scale"),
    "rfsq4-ln": dict(quantizer="rfsq", rfsq_stages=4, rfsq_strategy="layernorm"),
}

#: preset -> (paper's name, L1, LPIPS, PSNR) on ImageNet 128x128 val (paper Table 1).
PAPER_TABLE1: Dict[str, tuple] = {
    "vq-ema": ("VQ-EMA", 0.355, 0.489, 12.7),
    "lfq": ("LFQ", 0.241, 0.361, 16.0),
    "fsq": ("FSQ", 0.143, 0.182, 20.3),
    "rfsq2-none": ("RFSQ-2x2048-None", 0.130, 0.159, 21.1),
    "rfsq2-scale": ("RFSQ-2x2048-Scale", 0.122, 0.152, 21.5),
    "rfsq2-ln": ("RFSQ-2x2048-LN", 0.124, 0.148, 21.3),
    "rfsq4-none": ("RFSQ-4x1024-None", 0.113, 0.121, 22.2),
    "rfsq4-scale": ("RFSQ-4x1024-Scale", 0.103, 0.101, 22.9),
    "rfsq4-ln": ("RFSQ-4x1024-LN", 0.102, 0.100, 22.9),
}


def preset_of(cfg: dict) -> str:
    """The preset name a quantizer configuration matches, or ``'custom'``."""
    from rfsq_kernels.reference import default_levels, get_strategy
    from rfsq_kernels.reference.strategies import SOFTPLUS_SCALE

    for name, p in PRESETS.items():
        q = p["quantizer"]
        if cfg.get("quantizer") != q:
            continue
        if q == "ema" and (cfg.get("n_embed"), cfg.get("embed_dim")) == (4096, 6):
            return name
        if q == "lfq" and cfg.get("lfq_dim") == 12:
            return name
        if q == "fsq" and list(cfg.get("levels") or [8, 8, 8, 8]) == [8, 8, 8, 8]:
            return name
        if q == "rfsq" and (cfg.get("rfsq_stages"), cfg.get("rfsq_strategy")) == (p["rfsq_stages"], p["rfsq_strategy"]):
            levels = cfg.get("levels")
            if levels is None or list(levels) == list(default_levels(p["rfsq_stages"])):
                return name
    return "custom"


#: preset -> bits/token of the paper's configuration (what compare.py checks a result against).
PAPER_BITS: Dict[str, float] = {"vq-ema": 12.0, "fsq": 12.0, "lfq": 12.0, "rfsq2-none": 22.0, "rfsq2-scale": 22.0,
                                "rfsq2-ln": 22.0, "rfsq4-none": 40.0, "rfsq4-scale": 40.0, "rfsq4-ln": 40.0}


def run_identity(cfg: dict) -> Dict[str, object]:
    """The settings that make a checkpoint resumable: the quantizer's own (defaults made explicit, so
    ``levels=None`` equals the default levels; settings that quantizer ignores left out), the model
    width and the image size. Accepts ``vars(args)`` or an identity (idempotent)."""
    from rfsq_kernels.reference import default_levels, get_strategy
    from rfsq_kernels.reference.strategies import SOFTPLUS_SCALE

    q = cfg["quantizer"]
    out: Dict[str, object] = {"quantizer": q}
    if q == "rfsq":
        stages, strategy = cfg["rfsq_stages"], cfg["rfsq_strategy"]
        out.update(rfsq_stages=stages, rfsq_strategy=strategy,
                   levels=[int(v) for v in (cfg.get("levels") or default_levels(stages))])
        if any(p.role == SOFTPLUS_SCALE for p in get_strategy(strategy).params):  # initial_scale matters
            out["rfsq_initial_scale"] = float(cfg["rfsq_initial_scale"])
    elif q == "fsq":
        out["levels"] = [int(v) for v in (cfg.get("levels") or [8, 8, 8, 8])]
    elif q == "lfq":
        out["lfq_dim"] = cfg["lfq_dim"]
    elif q == "ema":
        out.update(n_embed=cfg["n_embed"], embed_dim=cfg["embed_dim"])
    elif q in ("lucidrains", "vqpy"):
        stages = cfg["rfsq_stages"]
        out.update(rfsq_stages=stages, levels=[int(v) for v in (cfg.get("levels") or default_levels(stages))])
    out.update(model_width=cfg["model_width"], image_size=cfg["image_size"])
    holdout = cfg.get("holdout_photos")  # which photos are held out decides what validation measures
    out["holdout_photos"] = sorted(holdout) if holdout else None
    extra = cfg.get("extra_photos")  # so do the photos added to the embedded set
    out["extra_photos"] = sorted(extra) if extra else None
    return out


def identity_differences(saved: dict, now: dict) -> List[str]:
    """``'key: A in the checkpoint, B now'`` for each setting of :func:`run_identity` that differs
    (a key only one side has follows from another difference, e.g. the quantizer, and is left out)."""
    a, b = run_identity(saved), run_identity(now)
    return [f"{k}: {a[k]} in the checkpoint, {b[k]} now" for k in a if k in b and a[k] != b[k]]
