"""Quantize-and-reconstruct demo: a small RFSQ autoencoder learns real photos in a few minutes on CPU.

    python examples/demo.py [--steps 150] [--strategy layernorm] [--stages 2] [--out runs/demo]

Uses the paper's encoder/decoder (128x128 images -> 32x32 latents), RFSQ as the bottleneck, L1
loss only (no LPIPS: it needs pretrained weights), photos shipped with scikit-image. Prints the
loss, PSNR and per-stage residual RMS, and writes originals above reconstructions as a PNG.
"""
from __future__ import annotations

import argparse
import math
import os
import time

import numpy as np
import torch
from torch import nn

from rfsq_kernels import RFSQ
from rfsq_kernels.reference import STRATEGIES

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry")


def load_photos() -> torch.Tensor:
    """The RGB photos that scikit-image ships (no download), as float tensors in [0, 1]."""
    from skimage import data

    return [torch.from_numpy(getattr(data, n)()[..., :3].copy()).permute(2, 0, 1).float() / 255 for n in PHOTOS]


def random_crops(photos, n: int, size: int, gen: torch.Generator) -> torch.Tensor:
    """``n`` random ``size``x``size`` crops with random horizontal flips."""
    out = []
    for _ in range(n):
        img = photos[int(torch.randint(len(photos), (1,), generator=gen))]
        y = int(torch.randint(img.shape[1] - size + 1, (1,), generator=gen))
        x = int(torch.randint(img.shape[2] - size + 1, (1,), generator=gen))
        crop = img[:, y:y + size, x:x + size]
        out.append(crop.flip(-1) if torch.rand(1, generator=gen) < 0.5 else crop)
    return torch.stack(out)


class AutoEncoder(nn.Module):
    """SPEC's encoder/decoder around an RFSQ bottleneck."""

    def __init__(self, quantizer: RFSQ):
        super().__init__()
        c = quantizer.num_channels
        self.encoder = nn.Sequential(nn.Conv2d(3, 128, 4, 2, 1), nn.ReLU(), nn.Conv2d(128, 256, 4, 2, 1),
                                     nn.ReLU(), nn.Conv2d(256, c, 1))
        self.quantizer = quantizer
        self.decoder = nn.Sequential(nn.Conv2d(c, 256, 1), nn.ReLU(), nn.ConvTranspose2d(256, 128, 4, 2, 1),
                                     nn.ReLU(), nn.ConvTranspose2d(128, 3, 4, 2, 1))

    def forward(self, x):
        z = self.encoder(x)
        q, indices = self.quantizer(z)
        return self.decoder(q), z, indices


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--stages", type=int, default=2)
    p.add_argument("--strategy", default="layernorm", choices=STRATEGIES)
    p.add_argument("--lr", type=float, default=8e-4)
    p.add_argument("--out", default="runs/demo")
    args = p.parse_args()

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    photos = load_photos()
    val = random_crops(photos, 8, args.size, torch.Generator().manual_seed(1)).to(device)
    model = AutoEncoder(RFSQ(stages=args.stages, strategy=args.strategy)).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=5e-5)
    rfsq = model.quantizer
    print(f"RFSQ {rfsq.stages}x{rfsq.codebook_size} {rfsq.strategy}, {rfsq.bits_per_token:.0f} bits/token, "
          f"device {device}, {args.steps} steps of batch {args.batch_size}")
    t0 = time.time()
    for step in range(1, args.steps + 1):
        x = random_crops(photos, args.batch_size, args.size, gen).to(device)
        recon, _, _ = model(x)
        loss = (recon - x).abs().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 25 == 0 or step == 1:
            print(f"step {step:4d}  L1 {loss.item():.4f}  {step * args.batch_size / (time.time() - t0):.1f} img/s")

    model.eval()
    with torch.no_grad():
        recon, z, _ = model(val)
        recon = recon.clamp(0, 1)
        mse = ((recon - val) ** 2).mean().item()
        parts = rfsq.decode_stages(*rfsq.encode(z))
        residual, rms = z.float(), []
        for q in parts:
            residual = residual - q
            rms.append(residual.pow(2).mean().sqrt().item())
    print(f"val L1 {(recon - val).abs().mean().item():.4f}  PSNR {10 * math.log10(1 / mse):.2f} dB  "
          f"residual RMS per stage {[round(r, 4) for r in rms]} (latent RMS {z.pow(2).mean().sqrt().item():.4f})")
    os.makedirs(args.out, exist_ok=True)
    grid = torch.cat([torch.cat(list(val.cpu()), 2), torch.cat(list(recon.cpu()), 2)], 1)
    path = os.path.join(args.out, "reconstructions.png")
    from PIL import Image

    Image.fromarray((grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(path)
    print(f"wrote {path} (originals above reconstructions)")


if __name__ == "__main__":
    main()
