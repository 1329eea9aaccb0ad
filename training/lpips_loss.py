"""LPIPS-VGG built offline, and the training loss (L1 + LPIPS + quantizer aux loss)."""
from __future__ import annotations

import os
import warnings
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from training.data import denormalize
from training.lpips_weights import find_backbone

# lpips.pretrained_networks.vgg16 splits torchvision's ``features`` into 5 slices at these indices.
_SLICE_BOUNDS = ((1, 0, 4), (2, 4, 9), (3, 9, 16), (4, 16, 23), (5, 23, 30))


def _slice_key(key: str) -> str:
    """``features.N.weight`` -> ``net.sliceS.N.weight`` (the lpips module's name for it)."""
    _, n, kind = key.split(".")
    for s, lo, hi in _SLICE_BOUNDS:
        if lo <= int(n) < hi:
            return f"net.slice{s}.{n}.{kind}"
    raise KeyError(key)


def build_lpips(backbone: Optional[Dict[str, torch.Tensor]] = None) -> nn.Module:
    """``lpips.LPIPS(net='vgg')`` without any download: heads from the ``lpips`` wheel (loaded
    ``weights_only``), the VGG16 backbone from ``backbone`` (``features.N.*`` tensors) or random
    (``None``: for tests and benchmarks only). Frozen and in eval mode."""
    import lpips

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's deprecated ``pretrained=`` argument
        model = lpips.LPIPS(net="vgg", pretrained=False, pnet_rand=True, verbose=False)
    heads = os.path.join(os.path.dirname(lpips.__file__), "weights", "v0.1", "vgg.pth")
    model.load_state_dict(torch.load(heads, map_location="cpu", weights_only=True), strict=False)
    if backbone is not None:
        state = {_slice_key(k): v for k, v in backbone.items()}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or any(k.startswith("net.") for k in missing):
            raise RuntimeError(f"LPIPS backbone mismatch: missing {missing}, unexpected {unexpected}")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def load_lpips(weights: Optional[str] = None) -> Tuple[nn.Module, str]:
    """LPIPS-VGG with real weights (see :func:`training.lpips_weights.find_backbone`) and their source.

    ``weights='random'`` gives a random backbone (tests/benchmarks; its numbers mean nothing).
    Raises :class:`training.lpips_weights.LPIPSWeightsError` when no weights are found.
    """
    if weights == "random":
        return build_lpips(None), "random (testing only: LPIPS values are meaningless)"
    backbone, source = find_backbone(weights)
    return build_lpips(backbone), source


class ReconstructionLoss(nn.Module):
    """Paper loss: ``L1(recon, x)`` in the normalized space + ``LPIPS(recon, x)`` on images mapped back
    to [0, 1] (``normalize=True`` maps them to LPIPS's [-1, 1]) + the quantizer's aux loss.

    ``forward`` returns ``(total, parts)`` with ``parts`` the detached ``l1``, ``lpips``, ``aux``.
    With ``lpips_model=None`` the LPIPS term is left out (``--no-lpips``).
    """

    def __init__(self, lpips_model: Optional[nn.Module] = None, lpips_weight: float = 1.0):
        super().__init__()
        self.lpips = lpips_model
        self.lpips_weight = lpips_weight

    def forward(self, recon: torch.Tensor, x: torch.Tensor, aux: torch.Tensor):
        l1 = (recon.float() - x.float()).abs().mean()
        total = l1 + aux.float()
        lp = torch.zeros((), device=x.device)
        if self.lpips is not None:
            lp = self.lpips(denormalize(recon), denormalize(x), normalize=True).float().mean()
            total = total + self.lpips_weight * lp
        return total, {"l1": l1.detach(), "lpips": lp.detach(), "aux": aux.detach().float()}
