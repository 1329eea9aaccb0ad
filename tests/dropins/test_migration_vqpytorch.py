"""docs/migrating-from-vector-quantize-pytorch.md, checked: both libraries on the same input.

Where the semantics agree (FSQ codes and indices, index packing, layouts, shapes, projection
parameter names, the -1 sentinel) the results are compared exactly. The one documented FSQ
difference — vector-quantize-pytorch 1.32 bounds with ``half_l = (L-1)(1+1e-3)/2``, SPEC with
``(L-1)(1-1e-3)/2`` — is checked to be the *only* one: codes differ exactly where the two
pre-rounding values round differently.
"""
import math

import pytest
import torch

from numpy_rfsq import BOUNDARY_TOL
from rfsq_kernels import FSQ, RFSQ
from rfsq_kernels.reference import indices_to_digits

vqp = pytest.importorskip("vector_quantize_pytorch")
LEVELS = [8, 5, 4, 3]


def _bounded(z: torch.Tensor, levels, sign: int) -> torch.Tensor:
    """float64 pre-rounding values of a channel-last ``z`` with ``half_l = (L-1)(1 + sign*1e-3)/2``."""
    lv = torch.tensor(levels, dtype=torch.float64)
    half_l = (lv - 1) * (1 + sign * 1e-3) / 2
    offset = torch.where(lv % 2 == 0, 0.5, 0.0).double()
    return torch.tanh(z.double() + torch.atanh(offset / half_l)) * half_l - offset


def _near_boundary(b: torch.Tensor) -> torch.Tensor:
    return ((b - torch.floor(b)) - 0.5).abs() < BOUNDARY_TOL


def _draw(shape, levels):
    """Channel-last input with no element within ``BOUNDARY_TOL`` of a .5 boundary in either
    convention (float32 vs float64 could flip those); returns it and the elements where the
    conventions round differently."""
    z = torch.randn(shape) * 1.5
    for _ in range(100):
        bad = (_near_boundary(_bounded(z, levels, +1)) | _near_boundary(_bounded(z, levels, -1))).any(-1)
        if not bad.any():
            break
        z[bad] = torch.randn(int(bad.sum()), shape[-1]) * 1.5
    differ = (torch.round(_bounded(z, levels, +1)) != torch.round(_bounded(z, levels, -1))).any(-1)
    return z, differ


def test_fsq_codes_and_indices_agree_except_where_the_documented_bound_differs(seed):
    theirs, ours = vqp.FSQ(LEVELS), FSQ(LEVELS, channel_first=False)
    z, differ = _draw((4, 2000, 4), LEVELS)
    q_t, idx_t = theirs(z)
    q_o, idx_o = ours(z)
    assert idx_t.shape == idx_o.shape == (4, 2000) and q_o.shape == q_t.shape
    assert torch.equal(idx_t != idx_o, differ) and torch.equal((q_t != q_o).any(-1), differ)
    assert 0 < differ.float().mean() < 0.03  # documented: about 1% of elements for N(0, 1.5^2)
    # away from those elements: identical
    z_clean = z[~differ].view(1, -1, 4)
    q_t, idx_t = theirs(z_clean)
    q_o, idx_o = ours(z_clean)
    assert torch.equal(idx_t.int(), idx_o) and torch.equal(q_t, q_o)
    # RFSQ with one 'none' stage is FSQ
    q_r, idx_r = RFSQ(stages=1, strategy="none", levels=LEVELS, channel_first=False)(z_clean)
    assert torch.equal(idx_r[..., 0], idx_o) and torch.equal(q_r, q_o)


def test_fsq_image_layout_and_index_helpers_agree(seed):
    theirs = vqp.FSQ(LEVELS)
    z, differ = _draw((2, 6, 5, 4), LEVELS)
    z[differ] = 0.0  # 0 is far from every boundary in both conventions
    img = z.permute(0, 3, 1, 2)  # lucidrains treats rank >= 4 inputs as channel-first
    q_t, idx_t = theirs(img)
    q_o, idx_o = FSQ(LEVELS)(img)
    assert torch.equal(idx_t, idx_o) and torch.equal(q_t, q_o)
    last = FSQ(LEVELS, channel_first=False)
    flat_idx = idx_o.view(2, -1)
    assert torch.equal(theirs.indices_to_codes(flat_idx), last.indices_to_codes(flat_idx))
    codes = last.indices_to_codes(flat_idx)
    assert torch.equal(theirs.codes_to_indices(codes.unsqueeze(-2)).squeeze(-1), last.codes_to_indices(codes))
    assert torch.equal(theirs.indices_to_level_indices(flat_idx).long(),
                       indices_to_digits(flat_idx, LEVELS).movedim(1, -1))
    assert theirs.codebook_size == last.codebook_size == math.prod(LEVELS)


@pytest.mark.filterwarnings("ignore:.*no stored configuration")
def test_residual_fsq_shapes_layouts_and_projection_names_agree(seed):
    K, dim = 3, 16
    theirs = vqp.ResidualFSQ(levels=LEVELS, num_quantizers=K, dim=dim)
    ours = RFSQ(stages=K, strategy="none", levels=LEVELS, dim=dim, channel_first=False)
    ours.load_state_dict(theirs.state_dict())  # same names and shapes: project_in / project_out
    assert torch.equal(ours.project_in.weight, theirs.project_in.weight)
    x = torch.randn(2, 10, dim)
    out_t = theirs(x, return_all_codes=True)
    out_o = ours(x, return_all_codes=True)
    for a, b in zip(out_t, out_o):
        assert a.shape == b.shape
    assert ours.num_quantizers == theirs.num_quantizers and ours.codebook_size == theirs.codebook_size
    assert ours.get_codes_from_indices(out_o[1]).shape == theirs.get_codes_from_indices(out_t[1]).shape
    assert ours.get_output_from_indices(out_o[1]).shape == theirs.get_output_from_indices(out_t[1]).shape


def test_quantize_dropout_uses_the_same_sentinel(seed):
    theirs = vqp.ResidualFSQ(levels=LEVELS, num_quantizers=4, quantize_dropout=True).train()
    ours = RFSQ(stages=4, strategy="none", levels=LEVELS, channel_first=False, quantize_dropout=True,
                quantize_dropout_per_sample=False).train()
    x = torch.randn(3, 9, 4, requires_grad=True)
    _, idx_t = theirs(x, rand_quantize_dropout_fixed_seed=1)
    _, idx_o = ours(x)
    for idx in (idx_t, idx_o):  # per batch: one k for all samples and positions, -1 beyond it
        kept = (idx != -1).sum(-1)
        assert (kept == kept.flatten()[0]).all() and ((idx == -1) == (torch.arange(4) >= kept[..., None])).all()
    # our decoder takes lucidrains-shaped (B, N, K) int64 indices with -1 suffixes
    ours.eval()
    q_k = ours(x, stages=2)[0]
    idx = ours.encode(x)[0].long()
    idx[..., 2:] = -1
    assert torch.equal(ours.get_output_from_indices(idx), q_k)
