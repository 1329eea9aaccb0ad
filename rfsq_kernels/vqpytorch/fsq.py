"""Drop-in ``FSQ`` of vector-quantize-pytorch 1.32.0 (standalone finite scalar quantization).

Same constructor arguments and defaults, buffers (``_levels``, ``_basis``, ``implicit_codebook``
non-persistent; ``orthogonal_rot`` persistent when ``orthogonal_rotation``), ``state_dict`` keys,
methods (``bound``, ``symmetry_preserving_bound``, ``quantize``, ``maybe_apply_noise``, ...), call
signature, outputs and output strides. Indices are packed exactly from the integer digits.
``implicit_codebook`` is a buffer like the library's up to :data:`CODEBOOK_BUFFER_LIMIT` floats;
above that it is computed on each access instead of being held in memory.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..backend import check_backend, use_fused
from ..reference import check_indices
from . import reference as ref
from .routing import warn_reference_path

#: Largest ``implicit_codebook`` (``prod(levels) * codebook_dim`` floats, 256 MB) held as a buffer.
CODEBOOK_BUFFER_LIMIT = 2**26


class FSQ(nn.Module):
    """vector-quantize-pytorch's ``FSQ``: ``forward(z) -> (codes, indices)``.

    ``z`` is ``(B, N, dim)``, or ``(B, dim, *spatial)`` when ``channel_first=True`` or
    ``z.ndim >= 4`` (as in the library). ``backend`` as in :class:`rfsq_kernels.RFSQ`.
    """

    def __init__(
        self,
        levels: Sequence[int],
        dim: Optional[int] = None,
        num_codebooks: int = 1,
        keep_num_codebooks_dim: Optional[bool] = None,
        scale: Optional[float] = None,
        allowed_dtypes: Tuple[torch.dtype, ...] = (torch.float32, torch.float64),
        channel_first: bool = False,
        projection_has_bias: bool = True,
        return_indices: bool = True,
        force_quantization_f32: bool = True,
        preserve_symmetry: bool = False,
        noise_dropout: float = 0.,
        bound_hard_clamp: bool = False,
        orthogonal_rotation: bool = False,
        backend: str = "auto",
    ):
        super().__init__()
        levels = [int(v) for v in levels]
        if not levels or any(v < 2 for v in levels):
            raise ValueError(f"levels must be a non-empty list of ints >= 2, got {levels!r}")
        if any(v == 2 for v in levels) and not preserve_symmetry:
            raise ValueError("levels == 2 needs preserve_symmetry=True (or a greater level), as in "
                             "vector-quantize-pytorch")
        if noise_dropout > 0 and not preserve_symmetry:
            raise ValueError("noise_dropout > 0 needs preserve_symmetry=True, as in vector-quantize-pytorch")
        if num_codebooks < 1:
            raise ValueError(f"num_codebooks must be >= 1, got {num_codebooks}")
        self.levels = levels
        self.register_buffer("_levels", ref.levels_tensor(levels), persistent=False)
        self.register_buffer("_basis", torch.cumprod(torch.tensor([1] + levels[:-1]), dim=0, dtype=torch.int32),
                             persistent=False)
        self.scale = scale
        self.preserve_symmetry = preserve_symmetry
        self.noise_dropout = noise_dropout
        self.codebook_dim = len(levels)
        self.num_codebooks = num_codebooks
        self.effective_codebook_dim = self.codebook_dim * num_codebooks
        keep_num_codebooks_dim = num_codebooks > 1 if keep_num_codebooks_dim is None else keep_num_codebooks_dim
        if num_codebooks > 1 and not keep_num_codebooks_dim:
            raise ValueError("num_codebooks > 1 needs keep_num_codebooks_dim=True")
        self.keep_num_codebooks_dim = keep_num_codebooks_dim
        self.dim = len(levels) * num_codebooks if dim is None else dim
        self.channel_first = channel_first
        self.has_projections = self.dim != self.effective_codebook_dim
        if self.has_projections:
            self.project_in = nn.Linear(self.dim, self.effective_codebook_dim, bias=projection_has_bias)
            self.project_out = nn.Linear(self.effective_codebook_dim, self.dim, bias=projection_has_bias)
        else:
            self.project_in = self.project_out = nn.Identity()
        self.return_indices = return_indices
        if return_indices:
            self.codebook_size = ref.codebook_size(levels)
            if self.codebook_size * self.codebook_dim <= CODEBOOK_BUFFER_LIMIT:
                self.register_buffer("implicit_codebook", self._build_codebook(), persistent=False)
            else:
                self._codebook_on_demand = True
        self.allowed_dtypes = allowed_dtypes
        self.force_quantization_f32 = force_quantization_f32
        self.bound_hard_clamp = bound_hard_clamp
        self.orthogonal_rotation = orthogonal_rotation
        if orthogonal_rotation:
            rot = torch.empty(self.codebook_dim, self.codebook_dim)
            nn.init.orthogonal_(rot)
            self.register_buffer("orthogonal_rot", rot)
        self.backend = check_backend(backend)

    # -- math -------------------------------------------------------------------------------------

    def bound(self, z: Tensor, eps: float = 1e-3, hard_clamp: bool = False) -> Tensor:
        """The library's default bound of ``z`` ``(..., codebook_dim)``: the normalized codes
        ``round_ste(tanh(z + shift) * half_l - offset) / (L // 2)`` (``clamp`` and no shift
        ``atanh`` with ``hard_clamp``)."""
        return ref.tanh_bound(z, self._levels, hard_clamp, eps)[0]

    def symmetry_preserving_bound(self, z: Tensor, hard_clamp: bool = False) -> Tensor:
        """The library's symmetric bound: ``2/(L-1) * floor_ste((L-1)(tanh(z)+1)/2 + 0.5) - 1``
        (``clamp(z, -1, 1)`` instead of ``tanh`` with ``hard_clamp``)."""
        return ref.symmetric_bound(z, self._levels, hard_clamp)[0]

    def quantize(self, z: Tensor) -> Tensor:
        """The quantized codes of ``z`` ``(..., codebook_dim)``, same shape (the library's
        ``quantize``: the configured bound with ``bound_hard_clamp``)."""
        return self._quantize_with_digits(z)[0]

    def _quantize_with_digits(self, z: Tensor) -> Tuple[Tensor, Tensor]:
        """``(codes, digits)``: :meth:`quantize` plus the integer digits the index is packed from."""
        if self.preserve_symmetry:
            return ref.symmetric_bound(z, self._levels, self.bound_hard_clamp)
        return ref.tanh_bound(z, self._levels, self.bound_hard_clamp)

    def maybe_apply_noise(self, bounded_z: Tensor) -> Tensor:
        """The library's noise dropout: in training with ``noise_dropout > 0``, each element gets
        ``U(-0.5, 0.5)`` added with probability ``noise_dropout``, then is clamped to ``[-1, 1]``;
        otherwise ``bounded_z`` unchanged."""
        if not self.training or self.noise_dropout == 0.:
            return bounded_z
        return ref.noise_dropout(bounded_z, self.noise_dropout)

    def fused_supported(self, dtype: torch.dtype = torch.float32) -> Optional[str]:
        """None when the fused kernels compute this configuration for inputs of ``dtype``, else why
        not (the module then runs the reference path, whatever ``backend`` says): they run the
        default bound (no ``preserve_symmetry``/``bound_hard_clamp``) in float32."""
        if self.preserve_symmetry or self.bound_hard_clamp:
            return "preserve_symmetry or bound_hard_clamp in the standalone FSQ"
        if self.training and self.noise_dropout > 0:
            return "noise_dropout > 0 in training (the noise is drawn from torch's RNG stream, as in the library)"
        if dtype != torch.float32 and not (dtype in (torch.bfloat16, torch.float16) and self.force_quantization_f32
                                            and dtype not in self.allowed_dtypes):
            return f"{dtype} inputs that the library quantizes in their own precision"
        return None

    def _codes_and_indices(self, z: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
        """The library's quantization block on ``z`` ``(B, N, c, d)``."""
        reason = self.fused_supported(z.dtype)
        if reason is None and use_fused(self.backend, z):
            from .fused import fsq_fused

            codes, indices = fsq_fused(z, self.levels)
            return codes, (indices if self.return_indices else None)
        if reason is not None and self.backend == "triton":
            warn_reference_path(self, reason)
        orig_dtype = z.dtype
        if self.force_quantization_f32 and orig_dtype not in self.allowed_dtypes:
            z = z.float()
        codes, digits = self._quantize_with_digits(z)
        indices = ref.pack_digits(digits, self.levels) if self.return_indices else None
        codes = self.maybe_apply_noise(codes)
        return codes.to(orig_dtype), indices

    def forward(self, z: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
        """``(codes, indices)``: codes in ``z``'s layout and dtype, indices ``(B, N[, c])`` int32
        (``(B, *spatial[, c])`` for image/video input)."""
        need_move = z.ndim >= 4 or self.channel_first
        if z.ndim < 3:
            raise ValueError(f"z must be (B, N, dim) or channel-first (B, dim, ...), got shape {tuple(z.shape)}")
        if need_move:
            z = z.movedim(1, -1)
        spatial = z.shape[1:-1]
        z = z.reshape(z.shape[0], -1, z.shape[-1])
        if need_move:  # the library packs with a copy: channels_last output strides follow from it
            z = z.contiguous()
        if z.shape[-1] != self.dim:
            raise ValueError(f"expected dimension of {self.dim} but found dimension of {z.shape[-1]}")
        z = self.project_in(z)
        z = z.reshape(*z.shape[:2], self.num_codebooks, self.codebook_dim)
        if self.orthogonal_rotation:
            z = z @ self.orthogonal_rot
        codes, indices = self._codes_and_indices(z)
        if self.orthogonal_rotation:
            codes = codes @ self.orthogonal_rot.t()
        codes = codes.reshape(*codes.shape[:2], self.effective_codebook_dim)
        out = self.project_out(codes)
        out = out.reshape(out.shape[0], *spatial, out.shape[-1])
        if indices is not None:
            indices = indices.reshape(indices.shape[0], *spatial, self.num_codebooks)
        if need_move:
            out = out.movedim(-1, 1)
        if indices is not None and not self.keep_num_codebooks_dim:
            indices = indices.squeeze(-1)
        return out, indices

    # -- codes and indices ------------------------------------------------------------------------

    def _scale_and_shift_inverse(self, digits: Tensor) -> Tensor:
        if self.preserve_symmetry:
            return ref.symmetric_codes_from_digits(digits, self._levels)
        return ref.tanh_codes_from_digits(digits, self._levels)

    def indices_to_level_indices(self, indices: Tensor) -> Tensor:
        """Digits ``(..., codebook_dim)`` of ``indices``, computed exactly, in the library's dtype
        (``indices``' dtype promoted with int32: int32 for int32 indices). Any integer dtype is read
        exactly, and values outside ``[0, prod(levels))`` raise (``rfsq_kernels.reference.check_indices``,
        as in every decoder)."""
        exact = check_indices(indices, ref.codebook_size(self.levels))
        return ref.unpack_indices(exact, self.levels).to(torch.promote_types(indices.dtype, torch.int32))

    def codes_to_indices(self, zhat: Tensor) -> Tensor:
        """Index of each code ``(..., codebook_dim)``: digits recovered in float, rounded, packed
        exactly (the library packs in float32, wrong above 2**24)."""
        if zhat.shape[-1] != self.codebook_dim:
            raise ValueError(f"zhat must have {self.codebook_dim} channels on its last axis, got {zhat.shape[-1]}")
        if self.preserve_symmetry:
            digits = (zhat + 1.) / (2. / (self._levels - 1))
        else:
            half_width = self._levels // 2
            digits = zhat * half_width + half_width
        return ref.pack_digits(digits.round(), self.levels)

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """Inverse of :meth:`codes_to_indices`, with ``project_out`` and the library's layout."""
        is_img_or_video = indices.ndim >= (3 + int(self.keep_num_codebooks_dim))
        codes = self._scale_and_shift_inverse(self.indices_to_level_indices(indices))
        if self.orthogonal_rotation:
            codes = codes @ self.orthogonal_rot.t()
        if self.keep_num_codebooks_dim:
            codes = codes.reshape(*codes.shape[:-2], -1)
        codes = self.project_out(codes)
        if is_img_or_video or self.channel_first:
            codes = codes.movedim(-1, 1)
        return codes

    def _build_codebook(self) -> Tensor:
        """The library's ``implicit_codebook`` ``(prod(levels), codebook_dim)``, computed with its ops."""
        digits = ref.unpack_indices(torch.arange(ref.codebook_size(self.levels), device=self._levels.device),
                                    self.levels)
        return self._scale_and_shift_inverse(digits)

    def __getattr__(self, name: str):
        # A codebook above CODEBOOK_BUFFER_LIMIT is not held as a buffer: build it on access.
        if name == "implicit_codebook" and self.__dict__.get("_codebook_on_demand"):
            return self._build_codebook()
        return super().__getattr__(name)

    def extra_repr(self) -> str:
        return f"levels={self.levels}, dim={self.dim}, num_codebooks={self.num_codebooks}, backend={self.backend!r}"
