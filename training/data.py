"""Data: ImageNet-style ImageFolders (paper transforms) or the embedded scikit-image photos.

Every sample is a normalized ``(3, S, S)`` float tensor (ImageNet mean/std). Unreadable images in an
ImageFolder are skipped and reported by file (fatal only when a whole epoch yields none). Data order
is a pure function of ``(seed, epoch, rank)`` and random crops of the embedded set of ``(seed, epoch, index)``, so a
resumed run sees exactly the batches an uninterrupted one would have.
"""
from __future__ import annotations

import functools
import os
import zlib
from typing import Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch.utils.data import Dataset, Sampler

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: RGB photographs that ship with scikit-image (no download).
RGB_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry",
              "retina", "stereo_motorcycle", "colorwheel")
#: Greyscale ones (replicated to 3 channels).
GREY_PHOTOS = ("camera", "brick", "grass", "gravel", "moon", "coins", "clock")
#: Other real photographs that ship offline in an installed package (``--extra-photos``): name ->
#: (package, file inside it). Not part of the default embedded set (which the presets train on).
EXTRA_PHOTOS = {"grace_hopper": ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
                "cell": ("skimage", "data/cell.png")}


class DataError(RuntimeError):
    """A data directory is missing, empty or unusable."""


def normalize(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] images -> ImageNet-normalized."""
    mean = x.new_tensor(IMAGENET_MEAN).view(-1, 1, 1)
    std = x.new_tensor(IMAGENET_STD).view(-1, 1, 1)
    return (x - mean) / std


def denormalize(x: torch.Tensor) -> torch.Tensor:
    """ImageNet-normalized -> [0, 1] scale (not clamped); works on ``(C,H,W)`` and ``(B,C,H,W)``."""
    mean = x.new_tensor(IMAGENET_MEAN).view(-1, 1, 1)
    std = x.new_tensor(IMAGENET_STD).view(-1, 1, 1)
    return x * std + mean


# ---------------------------------------------------------------------------------------------
# Reading one image file (the one loader and policy of train.py and training.evaluate)
# ---------------------------------------------------------------------------------------------
#: Pillow modes of integer greyscale images wider than 8 bits (16-bit PNG/TIFF; ``I`` = 32-bit TIFF).
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def _white_level(im, a) -> int:
    """The value that is white in integer greyscale image ``im`` (pixels ``a``): ``2**bits - 1`` for the
    bit depth the file declares (TIFF BitsPerSample 9..16: 4095 for 12-bit data), 65535 for a 16-bit
    mode without one; a 32-bit container (mode ``I``: a 32-bit TIFF) declares no useful depth, so its
    value range decides: at most 255 is 8-bit data, at most 65535 16-bit data, more has no white."""
    bits = None
    tags = getattr(im, "tag_v2", None)
    if tags is not None and 258 in tags:  # TIFF BitsPerSample (one value per sample)
        v = tags[258]
        bits = int(v[0] if isinstance(v, (tuple, list)) else v)
    if bits is not None and 1 <= bits <= 16:
        white = 2 ** bits - 1
    elif im.mode != "I":  # I;16*: 16-bit samples
        white = 65535
    else:
        top = int(a.max()) if a.size else 0
        white = 255 if top <= 255 else 65535
    if a.size and (a.min() < 0 or a.max() > white):
        raise ValueError(f"{im.mode} image with values in [{int(a.min())}, {int(a.max())}], outside "
                         f"[0, {white}] (its {bits or 'undeclared'}-bit depth): no defined white level")
    return white


def read_rgb(path: str):
    """Open an image file as an 8-bit RGB ``PIL.Image``, converting high bit depths by their range.

    Pillow's ``convert("RGB")`` clips a 16-bit greyscale image (mode ``I;16``/``I``) at 255, i.e. to
    saturated white; here integer greyscale is scaled from [0, white] (:func:`_white_level`: the
    declared bit depth, else the value range of a 32-bit container, so 8-bit data in a mode-``I``
    TIFF is not scaled by 1/65535 to black). Images with no defined white level (floating-point mode
    ``F``, or values beyond the white level) raise ``ValueError``; Pillow's own errors (unreadable
    files, decompression bombs) propagate. Callers skip the file, naming the reason
    (:func:`unreadable_reason`).
    """
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        if im.mode in _SIXTEEN_BIT_MODES:
            a = np.asarray(im, dtype=np.int64)
            white = _white_level(im, a)
            grey = np.rint(a * (255.0 / white)).astype(np.uint8)
            return Image.fromarray(grey, mode="L").convert("RGB")
        if im.mode == "F":
            raise ValueError("floating-point image (Pillow mode F): no defined white level")
        return im.convert("RGB")


def unreadable_reason(e: BaseException) -> str:
    """``"ExceptionType: first line"`` of why an image was skipped (logged and counted by the callers)."""
    first = str(e).splitlines()[0][:120] if str(e) else ""
    return f"{type(e).__name__}: {first}"


# ---------------------------------------------------------------------------------------------
# ImageFolder (ImageNet)
# ---------------------------------------------------------------------------------------------
def paper_transform(size: int = 128):
    """Resize(size) + CenterCrop(size) + ToTensor + ImageNet normalization (the paper's, train and val)."""
    from torchvision import transforms as T

    return T.Compose([T.Resize(size), T.CenterCrop(size), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def walk_files(root: str) -> List[str]:
    """Every file under ``root``, following symbolic links but entering each real directory once (so a
    link loop, or a link to a folder already in the tree, does not repeat files) and listing each real
    file once; in the order of ``sorted(os.walk(...))`` (by directory, then file name)."""
    try:
        st = os.stat(root)
    except OSError:
        return []
    return sorted(_walk_once(root, {(st.st_dev, st.st_ino)}, set()), key=_walk_order)


def _walk_order(path: str) -> Tuple[str, str]:
    return os.path.dirname(path), os.path.basename(path)


def _walk_once(top: str, seen_dirs: set, seen_files: set) -> List[str]:
    """The files under directory ``top`` (entered whatever ``seen_dirs`` holds), not entering the
    directories of ``seen_dirs`` (their ``(st_dev, st_ino)``) nor listing the real paths of
    ``seen_files``; both sets are updated with what this walk enters and lists."""
    out: List[str] = []
    stack = [(top, os.path.realpath(top))]
    while stack:
        d, real_d = stack.pop()
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError:  # unreadable directory: os.walk skips it too
            continue
        subdirs = []
        for e in entries:
            try:
                is_dir = e.is_dir()  # follows links
                st = e.stat() if is_dir else None
            except OSError:  # a dangling or looping link
                continue
            real = os.path.realpath(e.path) if e.is_symlink() else os.path.join(real_d, e.name)
            if is_dir:
                if (st.st_dev, st.st_ino) not in seen_dirs:
                    seen_dirs.add((st.st_dev, st.st_ino))
                    subdirs.append((e.path, real))
            elif real not in seen_files:
                seen_files.add(real)
                out.append(e.path)
        stack.extend(reversed(subdirs))
    return out


def _make_dataset_once(directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False):
    """``torchvision``'s ``make_dataset`` over :func:`_walk_once`: the root and every class folder count
    as entered from the start, so a link inside one class to another class's folder (or to the root, or
    a loop) adds no file twice and none under the wrong class. Two class folders that are one directory
    are refused (:class:`DataError`)."""
    from torchvision.datasets.folder import has_file_allowed_extension

    if extensions is not None:
        def is_valid_file(x: str) -> bool:
            return has_file_allowed_extension(x, extensions)

    root_st = os.stat(directory)
    seen_dirs, seen_files = {(root_st.st_dev, root_st.st_ino)}, set()
    class_dirs = {}
    for c in sorted(class_to_idx):
        d = os.path.join(directory, c)
        try:
            st = os.stat(d)
        except OSError:
            continue
        key = (st.st_dev, st.st_ino)
        if key in seen_dirs:
            same = next((o for o, k in class_dirs.items() if k == key), directory)
            raise DataError(f"class folder {d} is the same directory as {same} (a symbolic link): its images "
                            "would be counted twice")
        seen_dirs.add(key)
        class_dirs[d] = key
    instances, empty = [], []
    for c in sorted(class_to_idx):
        d = os.path.join(directory, c)
        valid = [p for p in sorted(_walk_once(d, seen_dirs, seen_files), key=_walk_order) if is_valid_file(p)] if d in class_dirs else []
        if not valid:
            empty.append(c)
        instances += [(p, class_to_idx[c]) for p in valid]
    if empty and not allow_empty:
        msg = f"Found no valid file for the classes {', '.join(sorted(empty))}. "
        if extensions is not None:
            msg += f"Supported extensions are: {extensions if isinstance(extensions, str) else ', '.join(extensions)}"
        raise FileNotFoundError(msg)
    return instances


class SafeImageFolder(Dataset):
    """``torchvision.datasets.ImageFolder`` whose unreadable/corrupt images yield an :class:`Unreadable`
    (file and reason) instead of raising; :func:`collate_skip` drops them and reports them.

    Raises :class:`DataError` with a clear message when ``root`` is missing or holds no images.
    """

    def __init__(self, root: str, size: int = 128):
        from torchvision.datasets import ImageFolder

        if not root or not os.path.isdir(root):
            raise DataError(f"data directory {root!r} does not exist (expected an ImageFolder: "
                            "ROOT/<class>/<image>.JPEG, e.g. ImageNet's train/ or val/ sorted into class folders)")
        class _Folder(ImageFolder):  # symbolic links followed, each real directory and file once
            make_dataset = staticmethod(_make_dataset_once)

        try:
            self.folder = _Folder(root, transform=paper_transform(size), loader=read_rgb)
        except (FileNotFoundError, RuntimeError) as e:
            raise DataError(f"data directory {root!r} holds no images in class sub-folders "
                            f"(expected ROOT/<class>/<image>.JPEG): {e}") from None
        if len(self.folder) == 0:
            raise DataError(f"data directory {root!r} is empty")

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, i: int) -> Union[torch.Tensor, "Unreadable"]:
        try:
            return self.folder[i][0]
        except Exception as e:  # corrupt/truncated/unreadable file: skipped and named by collate_skip
            return Unreadable(self.folder.samples[i][0], unreadable_reason(e))


class Unreadable(NamedTuple):
    """A sample that could not be read: its file and why."""

    path: str
    reason: str


def collate_skip(batch: Sequence[Union[torch.Tensor, Unreadable]]) -> Tuple[torch.Tensor, List[Unreadable]]:
    """Stack the readable samples; return ``(images, unreadable_samples)`` (an empty tensor when none
    is readable)."""
    good = [b for b in batch if isinstance(b, torch.Tensor)]
    bad = [b for b in batch if isinstance(b, Unreadable)]
    if not good:
        return torch.empty(0), bad
    return torch.stack(good), bad


# ---------------------------------------------------------------------------------------------
# Embedded photos (default, offline)
# ---------------------------------------------------------------------------------------------
def _to_photo(a, short_side: int) -> torch.Tensor:
    """A uint8/float HxW or HxWxC array -> ``(3, H', W')`` in [0, 1] with shorter side ``short_side``."""
    import torch.nn.functional as F

    t = torch.from_numpy(a.copy())
    t = t.float() / (255.0 if a.dtype.kind == "u" and a.max() > 1 else 1.0)
    t = t.unsqueeze(0).expand(3, -1, -1) if t.ndim == 2 else t[..., :3].permute(2, 0, 1)
    h, w = t.shape[1:]
    s = short_side / min(h, w)
    t = F.interpolate(t[None].contiguous(), size=(max(short_side, round(h * s)), max(short_side, round(w * s))),
                      mode="bilinear", antialias=True, align_corners=False)[0]
    return t.clamp(0, 1)


@functools.lru_cache(maxsize=4)
def load_extra_photos(names: Tuple[str, ...], short_side: int = 256) -> List[torch.Tensor]:
    """The :data:`EXTRA_PHOTOS` named (in that order), like :func:`load_embedded_photos`."""
    import importlib

    import numpy as np

    unknown = sorted(set(names) - set(EXTRA_PHOTOS))
    if unknown:
        raise DataError(f"--extra-photos: unknown photo(s) {unknown}; choose from {sorted(EXTRA_PHOTOS)}")
    out = []
    for name in names:
        package, rel = EXTRA_PHOTOS[name]
        try:
            root = os.path.dirname(importlib.import_module(package).__file__)
            a = np.asarray(read_rgb(os.path.join(root, rel)))
        except (ImportError, OSError, ValueError) as e:
            raise DataError(f"--extra-photos {name}: cannot read {rel} of package {package} ({e})") from None
        out.append(_to_photo(a, short_side))
    return out


@functools.lru_cache(maxsize=2)
def load_embedded_photos(short_side: int = 256) -> List[torch.Tensor]:
    """The scikit-image photos as ``(3, H, W)`` float tensors in [0, 1], resized so that the shorter
    side is ``short_side`` (so that a 128x128 crop holds a recognisable part of the scene)."""
    from skimage import data

    arrays = []
    for name in RGB_PHOTOS:
        img = getattr(data, name)()
        if name == "stereo_motorcycle":  # (left view, right view, disparity): both RGB views
            arrays += [img[0], img[1]]
        else:
            arrays.append(img)
    for name in GREY_PHOTOS:
        arrays.append(getattr(data, name)())
    return [_to_photo(a, short_side) for a in arrays]


def embedded_photo_names() -> List[str]:
    """Names of :func:`load_embedded_photos`'s tensors, in order (the stereo pair gives two views,
    ``stereo_motorcycle:left`` and ``stereo_motorcycle:right``)."""
    names = []
    for name in RGB_PHOTOS:
        names += [f"{name}:left", f"{name}:right"] if name == "stereo_motorcycle" else [name]
    return names + list(GREY_PHOTOS)


def load_photos(short_side: int, extra: Sequence[str] = ()) -> Tuple[List[torch.Tensor], List[str]]:
    """The embedded photos plus the :data:`EXTRA_PHOTOS` named in ``extra``, and their names (as
    :func:`embedded_photo_names`, extras by their own name)."""
    photos, names = list(load_embedded_photos(short_side=short_side)), embedded_photo_names()
    if extra:
        photos += load_extra_photos(tuple(extra), short_side)
        names += list(extra)
    return photos, names


def split_embedded(photos: List[torch.Tensor], heldout: Sequence[str],
                   names: Optional[Sequence[str]] = None) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """Split the embedded photos *by image* into ``(train, held-out)``.

    ``heldout`` names photos of :data:`RGB_PHOTOS` / :data:`GREY_PHOTOS` (or of ``names``, the
    photos' names when extras were added, see :func:`load_photos`); both views of the stereo
    pair go to the same side (they show the same scene). Raises :class:`DataError` on an unknown name
    or when nothing is left to train on.
    """
    names = list(names) if names is not None else embedded_photo_names()
    known = {n.split(":")[0] for n in names}
    unknown = sorted(set(heldout) - known)
    if unknown:
        raise DataError(f"--holdout-photos: unknown photo(s) {unknown}; choose from {sorted(known)}")
    if len(names) != len(photos):
        raise DataError(f"expected {len(names)} photos, got {len(photos)}")
    is_out = [n.split(":")[0] in set(heldout) for n in names]
    train = [p for p, out in zip(photos, is_out) if not out]
    val = [p for p, out in zip(photos, is_out) if out]
    if not train:
        raise DataError("--holdout-photos holds out every embedded photo; nothing is left to train on")
    return train, val


class TiledCrops(Dataset):
    """Every ``size`` x ``size`` crop of each photo on a grid of step ``stride`` (the last row and
    column are aligned to the far edges, so the whole photo is covered): a fixed evaluation set."""

    def __init__(self, photos: List[torch.Tensor], size: int = 128, stride: Optional[int] = None):
        stride = stride or size
        self.items = []
        for img in photos:
            h, w = img.shape[1:]
            if h < size or w < size:
                raise DataError(f"a {h}x{w} photo is smaller than the {size}x{size} crop")
            ys = sorted(set(list(range(0, h - size + 1, stride)) + [h - size]))
            xs = sorted(set(list(range(0, w - size + 1, stride)) + [w - size]))
            for y in ys:
                for x in xs:
                    self.items.append(normalize(img[:, y:y + size, x:x + size].contiguous()))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.items[i]


def _item_seed(*parts: int) -> int:
    return zlib.crc32(",".join(str(p) for p in parts).encode())


class EmbeddedTrain(Dataset):
    """``length`` random ``size``x``size`` crops (with random horizontal flips) of the embedded photos
    per epoch. Crop ``i`` of epoch ``e`` depends only on ``(seed, e, i)`` (call :meth:`set_epoch`)."""

    def __init__(self, photos: List[torch.Tensor], size: int = 128, length: int = 512, seed: int = 0):
        self.photos, self.size, self.length, self.seed, self.epoch = photos, size, length, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(_item_seed(self.seed, self.epoch, i))
        img = self.photos[int(torch.randint(len(self.photos), (1,), generator=g))]
        y = int(torch.randint(img.shape[1] - self.size + 1, (1,), generator=g))
        x = int(torch.randint(img.shape[2] - self.size + 1, (1,), generator=g))
        crop = img[:, y:y + self.size, x:x + self.size]
        if torch.rand(1, generator=g).item() < 0.5:
            crop = crop.flip(-1)
        return normalize(crop.contiguous())


class EmbeddedVal(Dataset):
    """Fixed crops of the embedded photos: centre and four corners of each RGB photo, the centre of each
    greyscale one (57 crops at 128x128).
    The validation photos are the training photos (different, fixed crops): it measures fit, not
    generalisation; use ``--val-dir`` for a real validation set."""

    def __init__(self, photos: List[torch.Tensor], size: int = 128):
        self.items = []
        for img in photos:
            h, w = img.shape[1:]
            grey = bool((img[0] == img[1]).all() and (img[1] == img[2]).all())
            spots = (((h - size) // 2, (w - size) // 2), (0, 0), (0, w - size), (h - size, 0), (h - size, w - size))
            for y, x in spots[:1] if grey else spots:
                self.items.append(normalize(img[:, y:y + size, x:x + size].contiguous()))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.items[i]


# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------
class ShardedSampler(Sampler):
    """Like ``DistributedSampler`` (works with world size 1 too) and resumable mid-epoch.

    Epoch ``e``'s order is a permutation seeded by ``seed + e`` (or the identity without shuffle),
    split round-robin over ranks. With ``drop_last`` every rank gets ``len(data) // world`` samples;
    otherwise shards may differ by one (fine for evaluation, whose sums are all-reduced).
    :meth:`set_epoch` picks the epoch and how many samples of it this rank already consumed.
    """

    def __init__(self, n: int, rank: int = 0, world: int = 1, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = True):
        self.n, self.rank, self.world = n, rank, world
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def _indices(self) -> List[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        if self.drop_last:
            order = order[: (self.n // self.world) * self.world]
        return order[self.rank::self.world]

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices()[self.skip:])

    def __len__(self) -> int:
        return len(self._indices()) - self.skip

