"""``from_vqpytorch``: convert a vector-quantize-pytorch module into ours (same weights)."""
from __future__ import annotations

from typing import Any, Dict

from torch import nn

from .fsq import FSQ
from .residual_fsq import GroupedResidualFSQ, ResidualFSQ

_FSQ_ATTRS = ("num_codebooks", "keep_num_codebooks_dim", "scale", "allowed_dtypes", "channel_first",
              "return_indices", "force_quantization_f32", "preserve_symmetry", "noise_dropout",
              "bound_hard_clamp", "orthogonal_rotation")


def _fsq_kwargs(m: nn.Module) -> Dict[str, Any]:
    kw = {name: getattr(m, name) for name in _FSQ_ATTRS}
    kw["levels"] = [int(v) for v in m._levels.tolist()]
    kw["dim"] = m.dim
    if m.has_projections:
        kw["projection_has_bias"] = m.project_in.bias is not None
    return kw


def _rfsq_kwargs(m: nn.Module) -> Dict[str, Any]:
    layer = m.layers[0]
    kw: Dict[str, Any] = dict(
        levels=[int(v) for v in m.levels], num_quantizers=m.num_quantizers,
        dim=m.project_in.in_features if m.has_projections else len(m.levels),
        is_channel_first=m.is_channel_first, quantize_dropout=bool(m.quantize_dropout),
        quantize_dropout_cutoff_index=m.quantize_dropout_cutoff_index,
        quantize_dropout_multiple_of=m.quantize_dropout_multiple_of,
        bound_hard_clamp=layer.bound_hard_clamp)
    if not layer.bound_hard_clamp and m.soft_clamp_input_value is not None:
        kw["soft_clamp_input_value"] = m.soft_clamp_input_value.clone()
    for name in ("allowed_dtypes", "force_quantization_f32", "scale", "noise_dropout", "orthogonal_rotation"):
        default = {"allowed_dtypes": None, "force_quantization_f32": True, "scale": None, "noise_dropout": 0.,
                   "orthogonal_rotation": False}[name]
        value = getattr(layer, name)
        if value != default and name != "allowed_dtypes":
            kw[name] = value
    return kw


def _finish(ours: nn.Module, theirs: nn.Module) -> nn.Module:
    """Move ``ours`` to ``theirs``' device and dtype, copy the weights, and copy the buffers both
    have (``scales``, ``soft_clamp_input_value``, ...) as they are, dtype included."""
    first = next(theirs.parameters(), None)
    if first is None:
        first = next(theirs.buffers(), None)
    if first is not None:
        ours.to(device=first.device, dtype=first.dtype if first.is_floating_point() else None)
    ours.load_state_dict(theirs.state_dict())
    mine = dict(ours.named_buffers())
    for name, buf in theirs.named_buffers():
        if name in mine and buf is not None:
            owner, _, leaf = name.rpartition(".")
            ours.get_submodule(owner)._buffers[leaf] = buf.detach().clone()
    ours.train(theirs.training)
    return ours


def from_vqpytorch(module: nn.Module, backend: str = "auto") -> nn.Module:
    """Our equivalent of a ``vector_quantize_pytorch`` ``ResidualFSQ``, ``GroupedResidualFSQ`` or
    ``FSQ`` instance, with its weights, device, dtype and train/eval mode."""
    name = type(module).__name__
    if name == "ResidualFSQ":
        ours = ResidualFSQ(backend=backend, **_rfsq_kwargs(module))
    elif name == "GroupedResidualFSQ":
        kw = _rfsq_kwargs(module.rvqs[0])
        kw.pop("dim")
        ours = GroupedResidualFSQ(dim=module.dim, groups=module.groups, accept_image_fmap=module.accept_image_fmap,
                                  backend=backend, **kw)
    elif name == "FSQ":
        ours = FSQ(backend=backend, **_fsq_kwargs(module))
    else:
        raise TypeError(f"from_vqpytorch converts vector_quantize_pytorch's ResidualFSQ, GroupedResidualFSQ or FSQ, "
                        f"got {name}")
    return _finish(ours, module)
