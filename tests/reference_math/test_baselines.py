"""LFQ and VQ-EMA baselines with the paper's settings."""
import pytest
import torch

from rfsq_kernels import LFQ, VQEMA


def test_lfq_signs_indices_and_commitment(seed):
    lfq = LFQ(dim=12)
    z = torch.randn(2, 12, 5, 5, requires_grad=True)
    q, idx, aux = lfq(z)
    assert torch.equal(q.detach(), torch.where(z > 0, 1.0, -1.0))
    assert idx.shape == (2, 5, 5) and idx.dtype == torch.int32 and idx.max() < 4096
    assert torch.equal(lfq.indices_to_codes(idx), q.detach())
    torch.testing.assert_close(aux, ((z - q.detach()) ** 2).mean())
    q.sum().backward()
    assert torch.equal(z.grad, torch.ones_like(z))  # straight-through
    assert (lfq.codebook_size, lfq.bits_per_token) == (4096, 12.0)


def test_vqema_picks_nearest_code_and_updates_its_ema(seed):
    vq = VQEMA(n_embed=64, dim=6)
    assert vq.embed.abs().max() <= 1 / 64
    z = torch.randn(4, 6, 3, 3, requires_grad=True)
    before = vq.embed.clone()
    q, idx, aux = vq(z)
    flat = z.detach().movedim(1, -1).reshape(-1, 6)
    assert torch.equal(idx.flatten().long(), torch.cdist(flat, before).argmin(1))
    assert not torch.equal(vq.embed, before), "training mode updates the codebook"
    torch.testing.assert_close(vq.cluster_size.sum(), torch.tensor(0.01 * flat.shape[0]))
    q.sum().backward()
    assert torch.equal(z.grad, torch.ones_like(z))
    assert aux.item() > 0
    vq.eval()
    frozen = vq.embed.clone()
    vq(z)
    assert torch.equal(vq.embed, frozen), "eval mode leaves the codebook alone"


def test_vqema_ema_converges_to_cluster_means():
    torch.manual_seed(0)
    centers = torch.randn(8, 6) * 3
    vq = VQEMA(n_embed=8, dim=6, decay=0.9)
    with torch.no_grad():
        vq.embed.copy_(centers + 0.5)
        vq.embed_avg.copy_(vq.embed)
    for _ in range(200):
        pts = centers[torch.randint(0, 8, (256,))] + 0.05 * torch.randn(256, 6)
        vq(pts.T.reshape(1, 6, 256))
    assert (vq.embed - centers).abs().max() < 0.05
