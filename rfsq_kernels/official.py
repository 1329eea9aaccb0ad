"""``from_official``: an :class:`rfsq_kernels.RFSQ` from a model trained with the official RFSQ code.

The paper's code (``quantizers/rfsq.py``: ``RFSQ(num_stages, strategy, fsq_levels, dim=None,
initial_scale=1.0)``) keeps its stages in ``self.stages``; a ``scale`` stage has a scalar
``log_scale`` used as ``softplus(log_scale)``, a ``layernorm`` stage ``layernorm.weight`` /
``layernorm.bias`` of shape ``(C,)``; its FSQ shift is ``tan(offset / half_l)``. Our parameters
mean the same (``a_k = softplus(scale_param[k])``; ``ln_weight[k]``, ``ln_bias[k]``), so the
conversion copies them, and ``fsq_shift='tan'`` reproduces its forward (docs/semantics.md,
"Models trained with the official code", for what is bitwise and what is not).
"""
from __future__ import annotations

import re
from typing import Any, Dict, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from .modules import RFSQ

_STAGE_KEY = re.compile(r"^stages\.(\d+)\.(.+)$")
_PARAM_KEYS = {"scale": ("log_scale",), "layernorm": ("layernorm.weight", "layernorm.bias"), "none": ()}


def _official_levels(module: nn.Module) -> Optional[list]:
    """The FSQ levels of an official module's first stage, if its FSQ exposes them."""
    fsq = getattr(module.stages[0], "fsq", None) if len(module.stages) else None
    for name in ("_levels", "levels"):
        value = getattr(fsq, name, None)
        if value is not None:
            return [int(v) for v in (value.tolist() if torch.is_tensor(value) else value)]
    return None


def _config_from_module(module: nn.Module, config: Dict[str, Any]) -> Dict[str, Any]:
    stages = getattr(module, "stages", None)
    if not isinstance(stages, nn.ModuleList):
        raise TypeError(f"from_official takes the official RFSQ module (with a `stages` ModuleList) or its "
                        f"state_dict, got {type(module).__name__}")
    found = {"num_stages": len(stages), "strategy": getattr(module, "strategy", None),
             "fsq_levels": _official_levels(module)}
    for name, value in found.items():
        if value is None:
            continue
        if config.get(name) is not None and config[name] != value:
            raise ValueError(f"from_official: {name}={config[name]!r} was given but the module has {value!r}")
        config[name] = value
    return config


def _stage_tensors(state: Mapping[str, torch.Tensor], num_stages: int, strategy: str) -> Dict[str, list]:
    """``{official parameter name: [tensor per stage]}``, with every key checked."""
    wanted = _PARAM_KEYS[strategy]
    out: Dict[str, list] = {name: [None] * num_stages for name in wanted}
    for key, value in state.items():
        m = _STAGE_KEY.match(key)
        if m is None or int(m.group(1)) >= num_stages:
            raise ValueError(f"from_official: unexpected key {key!r} in the state_dict of an official "
                             f"RFSQ(num_stages={num_stages}, strategy={strategy!r})")
        k, name = int(m.group(1)), m.group(2)
        if name in out:
            out[name][k] = value
        elif not name.startswith("fsq.") and not name.startswith("layernorm.current_"):
            raise ValueError(f"from_official: unexpected key {key!r} for strategy={strategy!r} "
                             f"(expected {', '.join('stages.<k>.' + w for w in wanted) or 'no parameters'})")
    for name, values in out.items():
        missing = [k for k, v in enumerate(values) if v is None]
        if missing:
            raise ValueError(f"from_official: the state_dict has no stages.{missing[0]}.{name} "
                             f"(strategy={strategy!r} needs it for each of the {num_stages} stages)")
    return out


def from_official(
    obj: Union[nn.Module, Mapping[str, torch.Tensor]],
    *,
    num_stages: Optional[int] = None,
    strategy: Optional[str] = None,
    fsq_levels: Optional[Sequence[int]] = None,
    dim: Optional[int] = None,
    initial_scale: float = 1.0,
    backend: str = "auto",
    **rfsq_kwargs: Any,
) -> RFSQ:
    """An :class:`~rfsq_kernels.RFSQ` with the parameters of an official RFSQ model and its FSQ
    shift (``fsq_shift='tan'``), channel-first ``(B, C, H, W)`` like the official code.

    ``obj``: the official module (``num_stages``, ``strategy`` and, when its FSQ exposes them,
    ``fsq_levels`` are read from it) or its ``state_dict``, with the official constructor arguments
    ``num_stages``, ``strategy``, ``fsq_levels`` (and ``dim``, the layernorm channel count, which
    must be ``len(fsq_levels)``). ``initial_scale`` only matters for the official module's
    initialisation and is ignored here (the trained ``log_scale`` is copied). ``backend`` and any
    other :class:`~rfsq_kernels.RFSQ` keyword (``quantize_dropout``, ...) are passed on. The
    result is on the official parameters' device, in the official module's train/eval mode.
    """
    config = {"num_stages": num_stages, "strategy": strategy, "fsq_levels": None if fsq_levels is None
              else [int(v) for v in fsq_levels]}
    training = True
    if isinstance(obj, nn.Module):
        config = _config_from_module(obj, config)
        training = obj.training
        state = obj.state_dict()
    elif isinstance(obj, Mapping):
        state = obj
    else:
        raise TypeError(f"from_official takes the official RFSQ module or its state_dict, got {type(obj).__name__}")
    for name in ("num_stages", "strategy", "fsq_levels"):
        if config[name] is None:
            raise ValueError(f"from_official needs {name}= (the official constructor argument) when it cannot be "
                             f"read from the object")
    K, strategy, levels = int(config["num_stages"]), config["strategy"], config["fsq_levels"]
    if strategy not in _PARAM_KEYS:
        raise ValueError(f"from_official: strategy must be 'none', 'scale' or 'layernorm', got {strategy!r}")
    if dim is not None and int(dim) != len(levels):
        raise ValueError(f"from_official: the official dim ({dim}) is the layernorm's channel count and must equal "
                         f"len(fsq_levels) = {len(levels)} (the official FSQ has no projections)")
    if "fsq_shift" in rfsq_kwargs or "dim" in rfsq_kwargs:
        raise TypeError("from_official sets fsq_shift='tan' and has no projections; do not pass fsq_shift or dim")
    tensors = _stage_tensors(state, K, strategy)
    ours = RFSQ(stages=K, strategy=strategy, levels=levels, backend=backend, fsq_shift="tan", **rfsq_kwargs)
    first = next(iter(state.values()), None)
    if first is not None:
        ours.to(first.device)
    with torch.no_grad():
        if strategy == "scale":
            ours.scale_param.copy_(torch.stack([t.reshape(()) for t in tensors["log_scale"]]))
        elif strategy == "layernorm":
            for ours_name, name in (("ln_weight", "layernorm.weight"), ("ln_bias", "layernorm.bias")):
                value = torch.stack([t.reshape(-1) for t in tensors[name]])
                if value.shape != getattr(ours, ours_name).shape:
                    raise ValueError(f"from_official: stages.<k>.{name} has shape {tuple(tensors[name][0].shape)}, "
                                     f"expected ({len(levels)},) for fsq_levels={levels}")
                getattr(ours, ours_name).copy_(value)
    return ours.train(training)
