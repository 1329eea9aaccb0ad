"""Pure-PyTorch ground truth of every quantizer (installed as ``rfsq_kernels.reference``).

Everything here follows docs/semantics.md exactly; the fused Triton kernels are tested against it.
"""
from .codebook import (
    DEFAULT_LEVELS,
    FSQ_SHIFTS,
    check_fsq_shift,
    check_levels,
    codebook_size,
    default_levels,
    digits_to_codes,
    digits_to_indices,
    fsq_constants,
    index_basis,
    index_dtype,
    indices_to_digits,
)
from .dropout import draw_active_stages
from .fsq import FSQ, fsq_quantize, round_ste
from .lfq import LFQ
from .rfsq import rfsq_decode_stages, rfsq_forward
from .rfsq_module import RFSQ
from .sentinel import SENTINEL, check_sentinel_layout, split_sentinel
from .strategies import (
    KERNEL_FAMILIES,
    PARAM_ROLES,
    STRATEGIES,
    STRATEGY_TABLE,
    ParamRole,
    ParamSpec,
    Strategy,
    StrategyDefinition,
    get_strategy,
    register_strategy,
    registered_strategy,
    scale_param_init,
    unregister_strategy,
    stage_scales,
)
from .validation import check_eps, check_indices, check_latent, check_side, check_stages
from .vq_ema import VQEMA

__all__ = [
    "DEFAULT_LEVELS", "FSQ", "FSQ_SHIFTS", "check_fsq_shift", "KERNEL_FAMILIES", "LFQ", "PARAM_ROLES", "ParamRole", "ParamSpec", "RFSQ", "SENTINEL", "STRATEGIES", "STRATEGY_TABLE", "Strategy",
    "StrategyDefinition", "register_strategy", "registered_strategy", "unregister_strategy",
    "VQEMA", "get_strategy", "check_eps", "check_indices",
    "check_latent", "check_levels", "check_sentinel_layout", "check_side", "draw_active_stages", "split_sentinel",
    "check_stages", "codebook_size", "default_levels", "digits_to_codes",
    "digits_to_indices", "fsq_constants", "fsq_quantize", "index_basis", "index_dtype",
    "indices_to_digits", "rfsq_decode_stages", "rfsq_forward", "round_ste", "scale_param_init", "stage_scales",
]
