"""Environment of ``bench/gpu_validate.py``: the checkout on ``sys.path``, offline wheels, facts.

A lent GPU machine has torch + triton but neither this package nor network access, so
:func:`use_checkout` makes ``rfsq_kernels`` importable from the working tree exactly as
``setup.py`` installs it (``reference/`` is the subpackage ``rfsq_kernels.reference``, via
``package_dir``), and :func:`install_wheels` installs the optional packages that
``bench/gpu_wheels.sh`` downloaded into ``.whl/`` into a temporary target directory
(``pip install --no-index --no-deps``; nothing outside it is touched).
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
WHEEL_DIR = ROOT / ".whl"
#: Import name -> distribution name of the optional packages the validation reports on.
OPTIONAL = {"vector_quantize_pytorch": "vector-quantize-pytorch", "einx": "einx", "lpips": "lpips",
            "constriction": "constriction", "torchvision": "torchvision"}
#: Environment variable through which the parent hands the wheel target to the step processes.
SITE_ENV = "RFSQ_GPU_VALIDATE_SITE"


class _ReferenceFinder(importlib.abc.MetaPathFinder):
    """Resolves ``rfsq_kernels.reference`` to ``<checkout>/reference`` (setup.py's ``package_dir``)."""

    def find_spec(self, fullname, path, target=None):
        if fullname != "rfsq_kernels.reference":
            return None
        init = ROOT / "reference" / "__init__.py"
        return importlib.util.spec_from_file_location(fullname, init, submodule_search_locations=[str(init.parent)])


def use_checkout() -> None:
    """Put the checkout (and ``tests/``, the folder of the shared test helpers ``gpu_correct``
    reuses; the test files themselves are not importable from here) first on ``sys.path`` and map
    ``rfsq_kernels.reference`` to ``reference/``; prepend the wheel target named by ``SITE_ENV``.
    Idempotent; call before anything imports ``rfsq_kernels``."""
    site = os.environ.get(SITE_ENV)
    for p in ([site] if site else []) + [str(ROOT / "tests"), str(ROOT)]:
        if p not in sys.path:
            sys.path.insert(0, p)
    if not any(isinstance(f, _ReferenceFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _ReferenceFinder())


def install_wheels(target: Path, wheel_dir: Path = WHEEL_DIR, timeout_s: float = 120.0) -> Dict:
    """Install every wheel of ``wheel_dir`` into ``target`` offline (``--no-index --no-deps``);
    returns ``{status, reason, wheels}``. Missing folder: status ``skipped``."""
    wheels = sorted(p.name for p in wheel_dir.glob("*.whl")) if wheel_dir.is_dir() else []
    if not wheels:
        return {"status": "skipped", "reason": f"no wheels in {wheel_dir} (run bash bench/gpu_wheels.sh "
                                               "on a machine with a package index and carry .whl)", "wheels": []}
    base = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--no-compile",
            "--disable-pip-version-check", "--quiet", "--find-links", str(wheel_dir), "--target", str(target)]

    def pip(names: List[str]) -> Optional[str]:
        try:
            done = subprocess.run(base + [str(wheel_dir / w) for w in names], capture_output=True, text=True,
                                  timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return f"pip install timed out after {timeout_s:.0f} s"
        return None if done.returncode == 0 else (done.stderr or done.stdout)[-400:]

    why = pip(wheels)
    if why is None:
        return {"status": "ok", "reason": f"installed into {target}", "wheels": wheels}
    # one wheel this interpreter cannot take (another Python) must not cost the others
    failed = {w: err for w in wheels if (err := pip([w])) is not None}
    installed = [w for w in wheels if w not in failed]
    return {"status": "ok" if installed else "error", "wheels": installed, "failed": failed,
            "reason": f"installed {len(installed)} of {len(wheels)} into {target}"}


def optional_packages() -> Dict[str, Dict[str, Optional[str]]]:
    """Import each optional package: ``{name: {version, path, error}}``."""
    from importlib import metadata

    out = {}
    for mod, dist in OPTIONAL.items():
        try:
            m = importlib.import_module(mod)
            try:
                version = metadata.version(dist)
            except metadata.PackageNotFoundError:
                version = getattr(m, "__version__", "?")
            out[mod] = {"version": version, "path": str(Path(m.__file__).parent), "error": None}
        except Exception as exc:  # any failure is a skip of what needs it, with the reason
            out[mod] = {"version": None, "path": None, "error": f"{type(exc).__name__}: {exc}"[:300]}
    return out


def _nvidia_smi() -> Optional[str]:
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                               "--format=csv,noheader"], capture_output=True, text=True, timeout=15)
        return done.stdout.strip() or done.stderr.strip()
    except Exception as exc:
        return f"unavailable: {type(exc).__name__}"


def _versions_and_device(device) -> Dict:
    import torch

    import rfsq_kernels
    import rfsq_kernels.reference as reference
    from bench.report import _versions
    from bench.timing import device_label

    facts = dict(_versions(), cuda_runtime=torch.version.cuda, platform=platform.platform(),
                 triton_interpret=os.environ.get("TRITON_INTERPRET", ""),
                 rfsq_kernels=str(Path(rfsq_kernels.__file__).parent), reference=str(Path(reference.__file__).parent),
                 device=str(device), device_label=device_label(device))
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        free, total = torch.cuda.mem_get_info(device)
        facts.update(device_name=props.name, capability=f"{props.major}.{props.minor}",
                     sm_count=props.multi_processor_count, l2_bytes=getattr(props, "L2_cache_size", None),
                     memory_gib=round(total / 2**30, 1), free_gib=round(free / 2**30, 1), driver=_nvidia_smi())
    return facts


def _copy_bandwidth(device) -> Dict:
    from bench.timing import copy_bandwidth_gbs

    return {"copy_gbs": round(copy_bandwidth_gbs(str(device)), 1),
            "note": "device-to-device copy_, read+write bytes (bench/timing.py)"}


def subcases(ctx) -> List:
    """The ``environment`` step: versions and device facts, optional packages, copy bandwidth."""
    return [("versions+device", lambda: _versions_and_device(ctx.device)),
            ("optional packages", lambda: {"packages": optional_packages()}),
            ("copy bandwidth", lambda: _copy_bandwidth(ctx.device))]
