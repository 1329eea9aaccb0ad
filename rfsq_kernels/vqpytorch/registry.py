"""Make vector-quantize-pytorch's helpers recognise the drop-ins.

The library's ``utils.Sequential`` finds its one quantizer among the layers with
``isinstance(fn, QUANTIZE_KLASSES)``, a tuple of its own classes (plain ``nn.Module`` subclasses,
so no virtual-subclass registration is possible). :func:`register` appends the drop-in classes to
that tuple. It runs when ``rfsq_kernels.vqpytorch`` is imported if the library's ``utils`` is
already loaded, and otherwise when the library's ``utils`` is first imported (an import hook), so
importing ``rfsq_kernels.vqpytorch`` never imports the library (it takes ~2 s, for ``einx``) and
works without it.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from typing import Optional, Sequence

_UTILS = "vector_quantize_pytorch.utils"


def register(classes: Sequence[type], utils=None) -> bool:
    """Append ``classes`` to the library's ``QUANTIZE_KLASSES`` (once); False if it has none."""
    utils = utils if utils is not None else sys.modules.get(_UTILS)
    known = getattr(utils, "QUANTIZE_KLASSES", None)
    if not isinstance(known, tuple):
        return False
    utils.QUANTIZE_KLASSES = known + tuple(c for c in classes if c not in known)
    return True


class _RegisterOnImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: when the library's ``utils`` is imported, wraps its loader so that
    :func:`register` runs right after the module executes."""

    def __init__(self, classes: Sequence[type]):
        self.classes = tuple(classes)

    def find_spec(self, fullname, path, target=None) -> Optional[importlib.machinery.ModuleSpec]:
        if fullname != _UTILS:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
                spec.loader = _Loader(spec.loader, self.classes)
                return spec
        return None


class _Loader(importlib.abc.Loader):
    def __init__(self, inner, classes):
        self.inner, self.classes = inner, classes

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        self.inner.exec_module(module)
        register(self.classes, module)


def install(classes: Sequence[type]) -> None:
    """Register ``classes`` now if the library's ``utils`` is loaded, else when it is imported."""
    if register(classes):
        return
    if not any(isinstance(f, _RegisterOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterOnImport(classes))
