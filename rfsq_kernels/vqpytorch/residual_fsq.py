"""Drop-in ``ResidualFSQ`` and ``GroupedResidualFSQ`` of vector-quantize-pytorch 1.32.0.

Same constructor arguments and defaults, buffers, ``state_dict`` keys, call signature and outputs
as the library (``docs/migrating-from-vector-quantize-pytorch.md``, "Exact drop-in"), plus
``backend=`` like :class:`rfsq_kernels.RFSQ`. ``layers`` holds the library's per-stage ``FSQ``s
(:class:`~rfsq_kernels.vqpytorch.FSQ` drop-ins with their ``implicit_codebook`` buffers) for code
that reads them; the forward runs the whole stage loop at once (fused, or the reference math), and
decoding computes codes from the indices.
"""
from __future__ import annotations

import random
from math import ceil
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..backend import check_backend, use_fused
from ..reference import check_indices
from .fsq import FSQ
from . import reference as ref
from .routing import warn_reference_path

#: Keyword arguments that ResidualFSQ forwards to each stage's FSQ, and what we do with them.
_NO_EFFECT_KWARGS = ("allowed_dtypes", "force_quantization_f32", "scale", "projection_has_bias")
_FIXED_KWARGS = {"return_indices": True, "channel_first": False, "num_codebooks": 1,
                 "keep_num_codebooks_dim": (None, False), "orthogonal_rotation": False}


def get_maybe_sync_seed(device, max_size: int = 10_000) -> int:
    """The library's dropout seed: ``torch.randint(0, max_size)`` on ``device``, summed over ranks
    when ``torch.distributed`` runs with more than one process (a collective, like the library)."""
    rand_int = torch.randint(0, max_size, (), device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(rand_int)
    return int(rand_int.item())


def dropout_stage_count(seed: int, cutoff: int, num_quantizers: int, multiple_of: int) -> int:
    """Stages kept by quantize dropout for ``seed``: the library's ``random.Random(seed)`` draw,
    ``randrange(cutoff, K)`` (+1, rounded up to ``multiple_of``), capped at K."""
    index = random.Random(seed).randrange(cutoff, num_quantizers)
    if multiple_of != 1:
        index = ceil((index + 1) / multiple_of) * multiple_of - 1
    return min(index + 1, num_quantizers)


def _check_stage_kwargs(kwargs: Dict[str, Any]) -> float:
    """Validate the FSQ keyword arguments; returns ``noise_dropout``."""
    noise = 0.
    for name, value in kwargs.items():
        if name in ("preserve_symmetry", "bound_hard_clamp", "dim", "levels"):
            raise TypeError(f"ResidualFSQ sets {name!r} of its stages itself; it cannot be passed as a keyword "
                            f"argument (vector-quantize-pytorch raises too)")
        if name == "noise_dropout":
            noise = float(value)
            if not 0. <= noise <= 1.:
                raise ValueError(f"noise_dropout must be in [0, 1], got {value!r}")
        elif name in _FIXED_KWARGS:
            allowed = _FIXED_KWARGS[name]
            allowed = allowed if isinstance(allowed, tuple) else (allowed,)
            if value not in allowed and not (name == "num_codebooks" and value == 1):
                raise ValueError(
                    f"ResidualFSQ({name}={value!r}) is not supported: vector-quantize-pytorch 1.32.0 fails or "
                    f"computes something else with it inside ResidualFSQ; only {name}={allowed[0]!r} is accepted")
        elif name not in _NO_EFFECT_KWARGS:
            raise TypeError(f"ResidualFSQ got an unexpected keyword argument {name!r} (not an argument of "
                            f"vector-quantize-pytorch 1.32.0's FSQ)")
    return noise


def _pack_channel_last(x: Tensor, channel_first: bool):
    """``(B, *spatial, D)`` (or channel-first ``(B, D, *spatial)``) -> ``(B, N, D)`` view and the
    spatial shape to restore."""
    if x.ndim < 2:
        raise ValueError(f"x must have a batch and a feature dimension, got shape {tuple(x.shape)}")
    if channel_first:
        x = x.movedim(1, -1)
    spatial = x.shape[1:-1]
    x = x.reshape(x.shape[0], -1, x.shape[-1])
    # the library packs with a copy (einops.pack), so its output has channels_last strides
    return (x.contiguous() if channel_first else x), spatial


def _unpack_channel_last(x: Tensor, spatial, channel_first: bool) -> Tensor:
    x = x.reshape(x.shape[0], *spatial, x.shape[-1])
    return x.movedim(-1, 1) if channel_first else x


class ResidualFSQ(nn.Module):
    """vector-quantize-pytorch's ``ResidualFSQ`` (1.26.0 - 1.32.0 math), fused.

    ``forward(x, return_all_codes=False, rand_quantize_dropout_fixed_seed=None)
    -> (quantized, indices[, all_codes])``; ``x`` is ``(B, N, dim)`` (any ``(B, *, dim)``), or
    ``(B, dim, *spatial)`` with ``is_channel_first=True``. Values, indices and gradients equal the
    library's bit for bit on the reference path; differences where the library is wrong are listed
    in ``docs/migrating-from-vector-quantize-pytorch.md``.

    ``backend``: ``'auto'`` (fused Triton kernels for CUDA tensors), ``'triton'`` or ``'reference'``.
    """

    def __init__(
        self,
        *,
        levels: Sequence[int],
        num_quantizers: int,
        dim: Optional[int] = None,
        is_channel_first: bool = False,
        quantize_dropout: bool = False,
        quantize_dropout_cutoff_index: int = 0,
        quantize_dropout_multiple_of: int = 1,
        soft_clamp_input_value: Union[float, List[float], Tensor, None] = None,
        bound_hard_clamp: bool = True,
        backend: str = "auto",
        **kwargs,
    ):
        super().__init__()
        levels = [int(v) for v in levels]
        if not levels or any(v <= 1 for v in levels):
            raise ValueError(f"levels must be a non-empty list of ints > 1, got {levels!r}")
        if int(num_quantizers) < 1:
            raise ValueError(f"num_quantizers must be >= 1, got {num_quantizers!r}")
        if quantize_dropout_cutoff_index < 0:
            raise ValueError(f"quantize_dropout_cutoff_index must be >= 0, got {quantize_dropout_cutoff_index}")
        if quantize_dropout and num_quantizers > 1 and quantize_dropout_cutoff_index >= num_quantizers:
            raise ValueError(f"quantize_dropout_cutoff_index ({quantize_dropout_cutoff_index}) must be below "
                             f"num_quantizers ({num_quantizers})")
        if quantize_dropout_multiple_of < 1:
            raise ValueError(f"quantize_dropout_multiple_of must be >= 1, got {quantize_dropout_multiple_of}")
        self.noise_dropout = _check_stage_kwargs(kwargs)
        self.stage_kwargs = dict(kwargs)
        codebook_dim = len(levels)
        dim = codebook_dim if dim is None else int(dim)
        self.has_projections = dim != codebook_dim
        self.project_in = nn.Linear(dim, codebook_dim) if self.has_projections else nn.Identity()
        self.project_out = nn.Linear(codebook_dim, dim) if self.has_projections else nn.Identity()
        self.dim = dim
        self.is_channel_first = is_channel_first
        self.num_quantizers = int(num_quantizers)
        self.levels = levels
        self.codebook_dim = codebook_dim
        self.codebook_size = ref.codebook_size(levels)
        self.bound_hard_clamp = bound_hard_clamp
        self.layers = nn.ModuleList([FSQ(levels=levels, dim=codebook_dim, preserve_symmetry=True,
                                         bound_hard_clamp=bound_hard_clamp, backend=backend, **kwargs)
                                     for _ in range(self.num_quantizers)])
        self.register_buffer("scales", ref.stage_scales(levels, self.num_quantizers), persistent=False)
        self.quantize_dropout = quantize_dropout and num_quantizers > 1
        self.quantize_dropout_cutoff_index = quantize_dropout_cutoff_index
        self.quantize_dropout_multiple_of = quantize_dropout_multiple_of
        if bound_hard_clamp:
            if soft_clamp_input_value is not None:
                raise ValueError("soft_clamp_input_value needs bound_hard_clamp=False (with bound_hard_clamp=True "
                                 "the clamp value is 1 + 1/(L-1) per channel, as in vector-quantize-pytorch)")
            soft_clamp_input_value = ref.default_soft_clamp(levels)
        if isinstance(soft_clamp_input_value, (list, tuple, float, int)):
            soft_clamp_input_value = torch.tensor(soft_clamp_input_value, dtype=torch.float32)
        self.register_buffer("soft_clamp_input_value", soft_clamp_input_value, persistent=False)
        self.backend = check_backend(backend)

    # -- the quantizer ---------------------------------------------------------------------------

    def fused_supported(self) -> Optional[str]:
        """None when the fused kernels compute this configuration, else the reason they do not
        (the module then runs the reference path, whatever ``backend`` says)."""
        if not self.bound_hard_clamp:
            return "bound_hard_clamp=False (tanh stages)"
        if self.noise_dropout > 0 and self.training:
            return "noise_dropout > 0 in training (the noise is drawn from torch's RNG stream, as in the library)"
        if self.scales.dtype != torch.float32 or self.soft_clamp_input_value.dtype != torch.float32:
            return "scales/soft_clamp_input_value buffers not in float32 (the module was cast; the library then " \
                   "computes in that dtype)"
        return None

    def _quantize(self, x: Tensor, num_active: Optional[int]):
        """``(B, N, C)`` -> ``(quantized float32, indices (B, N, K))``, fused or reference."""
        reason = self.fused_supported()
        if reason is None and use_fused(self.backend, x):
            from .fused import residual_fsq_fused

            return residual_fsq_fused(x, self.levels, self.scales, self.soft_clamp_input_value, num_active)
        if reason is not None and self.backend == "triton":
            warn_reference_path(self, reason)
        noise = None
        if self.noise_dropout > 0 and self.training:
            p = self.noise_dropout
            noise = lambda codes: ref.noise_dropout(codes, p)  # noqa: E731
        return ref.residual_fsq_core(x, self.levels, self.scales, self.soft_clamp_input_value, num_active,
                                     hard_clamp=self.bound_hard_clamp, noise=noise,
                                     allowed_dtypes=self.stage_kwargs.get("allowed_dtypes", (torch.float32, torch.float64)),
                                     force_quantization_f32=self.stage_kwargs.get("force_quantization_f32", True))

    def forward(self, x: Tensor, return_all_codes: bool = False, rand_quantize_dropout_fixed_seed: Optional[int] = None):
        """``(quantized, indices[, all_codes])`` like vector-quantize-pytorch 1.32.0's ResidualFSQ.

        ``quantized`` has ``x``'s shape and dtype (the library returns float32 for bf16/fp16 input);
        ``indices`` is ``(B, N, K)`` (channel-first: ``(B, K, *spatial)``), int32 (int64 when the
        codebook exceeds int32, and while quantize dropout is active, with -1 for dropped stages);
        ``all_codes`` ``(K, B, *spatial, C)``.
        """
        x3, spatial = self._prepare(x)
        quantized, indices = self._quantize(x3, self._num_active(x, rand_quantize_dropout_fixed_seed))
        return self._finish(quantized, indices, x3.dtype, spatial, return_all_codes)

    def _prepare(self, x: Tensor):
        """``x`` -> ``(project_in(x) as (B, N, C), spatial shape)``: the forward up to the quantizer."""
        x3, spatial = _pack_channel_last(x, self.is_channel_first)
        if x3.shape[-1] != self.dim:
            raise ValueError(f"x has {x3.shape[-1]} features on its "
                             f"{'channel (dim 1)' if self.is_channel_first else 'last'} axis; this ResidualFSQ "
                             f"expects dim={self.dim}")
        return self.project_in(x3), spatial

    def _num_active(self, x: Tensor, seed: Optional[int]) -> Optional[int]:
        """Stages kept by quantize dropout in this call (None: all, no dropout)."""
        if not (self.training and self.quantize_dropout and torch.is_grad_enabled()):
            return None
        if seed is None:
            seed = get_maybe_sync_seed(x.device)
        return dropout_stage_count(seed, self.quantize_dropout_cutoff_index, self.num_quantizers,
                                   self.quantize_dropout_multiple_of)

    def _finish(self, quantized: Tensor, indices: Tensor, dtype: torch.dtype, spatial, return_all_codes: bool):
        """The quantizer's ``(B, N, C)`` outputs -> the forward's ``(quantized, indices[, all_codes])``."""
        quantized = self.project_out(quantized.to(dtype))
        quantized = _unpack_channel_last(quantized, spatial, self.is_channel_first)
        indices = _unpack_channel_last(indices, spatial, self.is_channel_first)
        if not return_all_codes:
            return quantized, indices
        return quantized, indices, self.get_codes_from_indices(indices)

    # -- decoding ---------------------------------------------------------------------------------

    def _indices_channel_last(self, indices: Tensor) -> Tensor:
        # the shared check: any integer dtype read exactly (int64), values in [0, codebook_size) or -1
        indices = check_indices(indices, self.codebook_size, allow_sentinel=True)
        if indices.ndim < 2:
            raise ValueError(f"indices must be an integer tensor (B, N, K) (channel-first: (B, K, *spatial)), got shape "
                             f"{tuple(indices.shape)}")
        if self.is_channel_first:
            indices = indices.movedim(1, -1)
        k = indices.shape[-1]
        if k > self.num_quantizers:
            raise ValueError(f"indices have {k} stages, this ResidualFSQ has {self.num_quantizers}")
        if k < self.num_quantizers:
            pad = indices.new_full((*indices.shape[:-1], self.num_quantizers - k), ref.SENTINEL)
            indices = torch.cat([indices, pad], dim=-1)
        return indices

    def get_codes_from_indices(self, indices: Tensor) -> Tensor:
        """Per-stage codes ``(K, B, *spatial, C)`` (float32, before ``project_out``): stage k's
        ``codebook[index] * scales[k]``, zeros for -1. Fewer than K stages are padded with -1."""
        indices = self._indices_channel_last(indices)
        return ref.codes_from_indices(indices, self.levels, self.scales)

    def get_output_from_indices(self, indices: Tensor) -> Tensor:
        """The forward's ``quantized`` from its ``indices`` (bitwise equal; same layout)."""
        codes = ref.sum_stages(self.get_codes_from_indices(indices))
        out = self.project_out(codes)
        return out.movedim(-1, 1) if self.is_channel_first else out

    @property
    def codebooks(self) -> Tensor:
        """The library's stacked implicit codebooks ``(K, prod(levels), C)``, computed now
        (``prod(levels) * C * K`` floats: large codebooks are large)."""
        digits = ref.unpack_indices(torch.arange(self.codebook_size, device=self.scales.device), self.levels)
        book = ref.symmetric_codes_from_digits(digits, ref.levels_tensor(self.levels, digits.device))
        return book.expand(self.num_quantizers, *book.shape).clone()

    def extra_repr(self) -> str:
        return (f"levels={self.levels}, num_quantizers={self.num_quantizers}, dim={self.dim}, "
                f"is_channel_first={self.is_channel_first}, backend={self.backend!r}")


class GroupedResidualFSQ(nn.Module):
    """vector-quantize-pytorch's ``GroupedResidualFSQ``: ``dim`` split into ``groups`` equal
    chunks, each its own :class:`ResidualFSQ` (``rvqs``). Indices ``(G, B, N, K)``; the
    quantized output concatenates the groups along ``dim`` (dim 1 with ``accept_image_fmap``).

    ``accept_image_fmap=True`` without ``is_channel_first=True`` on a ``(B, dim, *spatial)`` input
    of rank >= 4 quantizes along dim 1, as the library's stage FSQs do (they treat rank >= 4 as
    channel-first), with the library's layouts: indices ``(G, B, *spatial, K)``, output strides
    channels_last."""

    def __init__(self, *, dim: int, groups: int = 1, accept_image_fmap: bool = False, backend: str = "auto",
                 **kwargs):
        super().__init__()
        if groups < 1 or dim % groups != 0:
            raise ValueError(f"dim ({dim}) must be divisible by groups ({groups})")
        self.dim = dim
        self.groups = groups
        self.accept_image_fmap = accept_image_fmap
        # the library's fmap case: split on dim 1, stages quantize dim 1, indices stay channel-last
        self._fmap_channel_last = accept_image_fmap and not kwargs.get("is_channel_first", False)
        self.rvqs = nn.ModuleList([ResidualFSQ(dim=dim // groups, backend=backend, **kwargs) for _ in range(groups)])
        self.codebook_size = self.rvqs[0].codebook_size

    @property
    def codebooks(self) -> Tensor:
        return torch.stack(tuple(rvq.codebooks for rvq in self.rvqs))

    @property
    def split_dim(self) -> int:
        return 1 if self.accept_image_fmap else -1

    def get_codes_from_indices(self, indices: Tensor) -> Tensor:
        """``(G, K, B, *spatial, C)`` from indices ``(G, ...)``."""
        return torch.stack(tuple(rvq.get_codes_from_indices(i) for rvq, i in zip(self.rvqs, indices)))

    def get_output_from_indices(self, indices: Tensor) -> Tensor:
        """The forward's ``quantized`` from its indices ``(G, ...)`` (same layout)."""
        outs = tuple(rvq.get_output_from_indices(i) for rvq, i in zip(self.rvqs, indices))
        if self._fmap_channel_last and indices.ndim >= 5:  # (G, B, *spatial, K): outputs back to dim 1
            outs = tuple(o.movedim(-1, 1) for o in outs)
        return torch.cat(outs, dim=self.split_dim)

    def _quantize_group(self, rvq: ResidualFSQ, chunk: Tensor, **kw):
        if not (self._fmap_channel_last and chunk.ndim >= 4):
            return rvq(chunk, **kw)
        # channels last, packed with a copy like the library's stage FSQ (channels_last output strides)
        out = rvq(chunk.movedim(1, -1).contiguous(), **kw)
        return (out[0].movedim(-1, 1), *out[1:])

    def _fused_groups(self, x: Tensor) -> bool:
        """True when one fused launch per direction computes every group: the groups all take the
        fused path (same backend, training mode, float32 buffers)."""
        first = self.rvqs[0]
        return all(rvq.fused_supported() is None and use_fused(rvq.backend, x) and rvq.training == first.training
                   for rvq in self.rvqs)

    def _forward_fused(self, x: Tensor, chunks, seed: Optional[int], return_all_codes: bool):
        """Every group in one launch per direction (:func:`.fused.grouped_residual_fsq_fused`),
        each group's inputs prepared and outputs finished exactly as its own ResidualFSQ does."""
        from .fused import grouped_residual_fsq_fused

        fmap = [self._fmap_channel_last and chunk.ndim >= 4 for chunk in chunks]
        prepared = [rvq._prepare(chunk.movedim(1, -1).contiguous() if f else chunk)
                    for rvq, chunk, f in zip(self.rvqs, chunks, fmap)]
        first = self.rvqs[0]
        if not first.has_projections and not self.accept_image_fmap and not first.is_channel_first:
            # the groups are channel slices of one tensor: quantize them in place, no copy
            x3, _ = _pack_channel_last(x, False)
            x4 = x3.unflatten(-1, (self.groups, first.dim)).permute(2, 0, 1, 3)
        else:
            x4 = torch.stack([x3 for x3, _ in prepared])
        quantized, indices = grouped_residual_fsq_fused(
            x4, first.levels, [rvq.scales for rvq in self.rvqs], [rvq.soft_clamp_input_value for rvq in self.rvqs],
            first._num_active(x, seed))
        out = []
        for rvq, q, i, (x3, spatial), f in zip(self.rvqs, quantized.unbind(0), indices.unbind(0), prepared, fmap):
            o = rvq._finish(q, i, x3.dtype, spatial, return_all_codes)
            out.append((o[0].movedim(-1, 1), *o[1:]) if f else o)
        return out

    def forward(self, x: Tensor, return_all_codes: bool = False):
        """``(quantized, indices (G, ...)[, all_codes])``, ``all_codes`` a tuple of the groups'
        codes (as the library returns). In training, one dropout seed is
        drawn for all groups (only when quantize dropout is on: the library draws it always).
        On the fused path every group runs in one kernel launch per direction."""
        if x.shape[self.split_dim] != self.dim:
            raise ValueError(f"x has {x.shape[self.split_dim]} features on dim {self.split_dim}, expected {self.dim}")
        chunks = x.chunk(self.groups, dim=self.split_dim)
        seed = None
        if self.training and self.rvqs[0].quantize_dropout and torch.is_grad_enabled():
            seed = get_maybe_sync_seed(x.device)
        if self._fused_groups(x):
            out = self._forward_fused(x, chunks, seed, return_all_codes)
        else:
            out = tuple(self._quantize_group(rvq, chunk, return_all_codes=return_all_codes,
                                             rand_quantize_dropout_fixed_seed=seed)
                        for rvq, chunk in zip(self.rvqs, chunks))
        quantized, all_indices, *maybe_codes = tuple(zip(*out))
        ret = (torch.cat(quantized, dim=self.split_dim), torch.stack(all_indices))
        if maybe_codes:
            ret = ret + (maybe_codes[0],)  # a tuple of per-group codes, as the library returns
        return ret
