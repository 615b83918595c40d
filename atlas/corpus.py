"""The image corpus of the collect stage: finding images, decoding them robustly, batching them.

`find_images` lists every file under a folder in a fixed order (the position in that list is the
image index in every artifact downstream) with ImageFolder labels from the parent folder's name.
`load_image` turns any file into a fully decoded RGB image or raises `BadImage` with a short,
stable reason that ends up in the run's image statuses (atlas.store). `iter_batches` decodes and
transforms images in worker processes, in batches whose boundaries do not depend on which images
fail, so a resumed collect sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import os
import re
import stat
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from .errors import AtlasError

__all__ = ["BadImage", "Batch", "ImageRecord", "find_images", "iter_batches", "load_image"]

# Files that operating systems drop into image folders; never data, so they are not listed (and
# not reported as skipped). Hidden names (".DS_Store", "._x.jpg", ".git/") are left out as well.
IGNORED_NAMES = frozenset({"Thumbs.db", "desktop.ini"})

DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own default limit: 1024**3 // 4 // 3


@dataclass(frozen=True)
class ImageRecord:
    """One file of the corpus."""

    path: Path  # absolute path
    relpath: str  # posix path relative to the corpus root (the run's image paths)
    label: int  # class index, -1 when unknown


def find_images(root: str | Path, label_of: Callable[[str], int | None] | None = None,
                limit: int | None = None) -> list[ImageRecord]:
    """Lists every file under `root`, recursively, sorted by relative path.

    Args:
        root: the images folder.
        label_of: maps the name of a file's parent folder (a wnid or a class name) to a class
            index, or None when unknown. Files directly in `root` and folders it returns None
            for get label -1; `label_of=None` labels every image -1.
        limit: keep only the first `limit` records after sorting; None keeps all.

    Every non-hidden file is listed, not only known image extensions, so that a stray file is
    reported as skipped (with its reason) by `load_image` rather than silently dropped. Only
    hidden names (starting with ".") and `IGNORED_NAMES` are left out. Symbolic links are
    followed, except into a folder that is already one of their own ancestors (a loop).

    Raises:
        AtlasError: `root` is missing, not a folder, unreadable or holds no files.
        ValueError: `limit` is not None and < 1.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 or None, got {limit}")
    base = Path(os.path.abspath(root))
    if not base.exists():
        raise AtlasError(f"images folder {base} does not exist; "
                         "set `images` in the config or --set images=DIR")
    if not base.is_dir():
        raise AtlasError(f"images folder {base} is not a folder; "
                         "set `images` in the config or --set images=DIR")
    relpaths = sorted(_walk_files(base, "", frozenset()))
    if not relpaths:
        raise AtlasError(f"images folder {base} contains no files; "
                         "set `images` in the config or --set images=DIR")
    if limit is not None:
        relpaths = relpaths[:limit]

    labels: dict[str, int] = {}  # label_of is called once per folder name

    def label(relpath: str) -> int:
        if label_of is None or "/" not in relpath:
            return -1
        folder = relpath.rsplit("/", 2)[-2]
        if folder not in labels:
            index = label_of(folder)
            labels[folder] = -1 if index is None else int(index)
        return labels[folder]

    return [ImageRecord(base.joinpath(*rel.split("/")), rel, label(rel)) for rel in relpaths]


def _walk_files(folder: Path, prefix: str, ancestors: frozenset[tuple[int, int]]) -> Iterator[str]:
    """Yields the posix relative path of every listed file under `folder`."""
    try:
        info = folder.stat()
        entries = list(os.scandir(folder))
    except OSError as e:
        raise AtlasError(f"cannot read folder {folder} ({e.strerror or e}); "
                         "fix its permissions or move it out of the images folder") from None
    key = (info.st_dev, info.st_ino)
    if key in ancestors:  # a symlink back to a folder we are inside: do not loop
        return
    ancestors = ancestors | {key}
    for entry in entries:
        if entry.name.startswith(".") or entry.name in IGNORED_NAMES:
            continue
        relpath = prefix + entry.name
        try:
            is_dir = entry.is_dir()  # follows symlinks
        except OSError:  # e.g. a symlink loop on itself (ELOOP): list it, load_image reports it
            is_dir = False
        if is_dir:
            yield from _walk_files(Path(entry.path), relpath + "/", ancestors)
        else:
            # Broken links and special files are listed too; load_image says why they fail.
            yield relpath


class BadImage(Exception):
    """A file that cannot be used as an image; `reason` is short and stable (it is counted).

    Reasons: "empty file", "is a directory", "not a regular file", "not an image", "truncated",
    "too large (decompression bomb: W x H pixels > LIMIT)", "unsupported mode M",
    "unreadable: <OS error>", "corrupt: <decoder error>"; and from `iter_batches`
    "transform failed: <exception>".
    """

    def __init__(self, reason: str, path: str | Path | None = None):
        super().__init__(f"{path}: {reason}" if path is not None else reason)
        self.reason = reason
        self.path = path


def load_image(path: str | Path, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Returns the image at `path` fully decoded, EXIF-oriented and converted to RGB.

    Args:
        path: the file.
        max_pixels: images whose header declares more pixels (width x height) are refused before
            decoding, as decompression bombs. PIL's own global limit (`Image.MAX_IMAGE_PIXELS`)
            is replaced by this one for this call and is left as it was. None: no limit.

    Conversions: transparency (RGBA, LA, PA, palette or single-colour transparency) is composited
    on white; grayscale, 1-bit, palette, CMYK and YCbCr go through PIL's conversion; 16-bit
    images are scaled from their type's range (value / 257, so a 16-bit and an 8-bit copy of a
    photo match); 32-bit integer images whose values fit in 0..65535 are treated as 16-bit and
    others, like float images outside 0..1, are stretched from their own min..max (float images
    within 0..1 are scaled by 255). Multi-frame files give their first frame.

    Raises:
        BadImage: for any file that cannot be decoded; never anything else.
    """
    try:
        with _quiet_pil():
            return _load_rgb(Path(path), max_pixels)
    except BadImage as e:
        raise BadImage(e.reason, path) from None
    except Image.DecompressionBombError as e:  # a later frame or tile larger than the header
        numbers = re.findall(r"\d+", str(e))[:2]  # "Image size (N pixels) exceeds limit of M"
        detail = " pixels > ".join(numbers) if len(numbers) == 2 else str(e)
        raise BadImage(f"too large (decompression bomb: {detail})", path) from None
    except Image.UnidentifiedImageError:
        raise BadImage("not an image", path) from None
    except OSError as e:
        raise BadImage(_os_error_reason(e), path) from None
    except EOFError:
        raise BadImage("truncated", path) from None
    except Exception as e:  # PIL raises SyntaxError, ValueError, struct.error, ... on bad data
        raise BadImage(f"corrupt: {_describe(e)}", path) from None


def _load_rgb(path: Path, max_pixels: int | None) -> Image.Image:
    info = os.stat(path)  # OSError: missing, permission denied, broken link
    if stat.S_ISDIR(info.st_mode):
        raise BadImage("is a directory")
    if not stat.S_ISREG(info.st_mode):  # a FIFO would block open() forever
        raise BadImage("not a regular file")
    if info.st_size == 0:
        raise BadImage("empty file")
    with open(path, "rb") as f:
        image = _open_within_limit(f, max_pixels)
        with _pil_limit_lifted() if _pil_limit_too_low(image.size) else nullcontext():
            image.load()  # decodes now, while the file is open, so truncation surfaces here
            try:
                image = ImageOps.exif_transpose(image)
            except Exception:  # broken EXIF: keep the pixels as stored
                pass
            return _to_rgb(image)


def _open_within_limit(f, max_pixels: int | None) -> Image.Image:
    """Opens (header only) and refuses images over `max_pixels` before anything is decoded."""
    try:
        image = Image.open(f)
    except Image.DecompressionBombError:
        # Over twice PIL's global limit: PIL refuses to even open it. Re-read the header with
        # PIL's limit lifted to learn the size, and apply ours.
        f.seek(0)
        with _pil_limit_lifted():
            image = Image.open(f)
    width, height = image.size
    if max_pixels is not None and width * height > max_pixels:
        raise BadImage(f"too large (decompression bomb: {width} x {height} pixels > {max_pixels})")
    return image


def _to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return Image.fromarray(_scale_to_uint8(np.asarray(image), mode)).convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    try:
        return image.convert("RGB")  # a copy even when already RGB: detached from the file
    except ValueError:  # e.g. LAB, which needs a colour profile
        raise BadImage(f"unsupported mode {mode}") from None


def _scale_to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    """Maps a 16/32-bit integer or float image to uint8 (see `load_image` for the rules)."""
    values = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    low, high = (values.min(), values.max()) if values.size else (0.0, 0.0)
    if mode.startswith("I;16") or (mode == "I" and low >= 0 and high <= 65535):
        scaled = values / 257.0
    elif mode == "F" and low >= 0 and high <= 1:
        scaled = values * 255.0
    elif high > low:
        scaled = (values - low) * (255.0 / (high - low))
    else:  # a constant image of unknown range
        scaled = np.zeros_like(values)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _os_error_reason(e: OSError) -> str:
    if e.errno is not None:  # from the system: permission denied, no such file, I/O error
        return f"unreadable: {e.strerror or e}"
    message = str(e)
    if "truncated" in message.lower():  # "image file is truncated (...)", "Truncated File Read"
        return "truncated"
    return f"corrupt: {message}"


def _describe(e: Exception) -> str:
    message = str(e)
    return f"{type(e).__name__}: {message}" if message else type(e).__name__


_pil_limit_lock = threading.Lock()


def _pil_limit_too_low(size: tuple[int, int]) -> bool:
    """Whether PIL's global limit would refuse an image of this size that ours accepted."""
    limit = Image.MAX_IMAGE_PIXELS
    return limit is not None and size[0] * size[1] > 2 * limit


@contextmanager
def _pil_limit_lifted():
    """Disables PIL's global decompression-bomb limit for the block, then restores it.

    Only taken for images beyond PIL's hard limit (2 x MAX_IMAGE_PIXELS), where `max_pixels`
    decides instead; the lock keeps two threads from restoring each other's value.
    """
    with _pil_limit_lock:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


@contextmanager
def _quiet_pil():
    """Silences PIL's per-file warnings: `max_pixels` replaces its decompression-bomb warning,
    and "Corrupt EXIF data"-style warnings (common in ImageNet) would flood a progress bar."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
        yield


@dataclass
class Batch:
    """The decoded images of one fixed range of records."""

    start: int  # index of the first record this batch covers
    indices: np.ndarray  # (b,) int64 record indices of the images decoded ok, ascending
    # (b, *transform output shape) float32; when b == 0 it is torch.empty(0) (shape (0,)):
    # check len(indices), not pixels.shape.
    pixels: torch.Tensor
    skipped: list[tuple[int, str]]  # (record index, reason) for the images of the range that failed


def iter_batches(records: Sequence[ImageRecord], transform: Callable[[Image.Image], torch.Tensor],
                 batch_size: int, workers: int = 1, start: int = 0,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS,
                 spans: Sequence[tuple[int, int]] | None = None) -> Iterator[Batch]:
    """Yields the records from `start` on, decoded and transformed, one `Batch` per range.

    Args:
        records: the corpus, from `find_images`.
        transform: PIL RGB image -> tensor of a fixed shape (the model's preprocessing).
        batch_size: records per batch (>= 1).
        workers: decoding processes; 0 decodes in the calling process. Results are identical
            for any number of workers.
        start: first record index. Batch k covers records [start + k*batch_size,
            start + (k+1)*batch_size), the last one shorter, whichever images fail: a collect
            resumed at a multiple of batch_size sees the same batches as an uninterrupted one.
        max_pixels: passed to `load_image`.
        spans: read only these (start, stop) ranges of records instead of [start, end), each in
            batches from its own start (a collect shard's parts); `start` is then ignored.

    Images that `load_image` refuses, and those whose transform raises, are reported in
    `Batch.skipped`; the iterator itself does not fail on bad images.

    Raises:
        AtlasError: the transform returns tensors of different shapes (it needs a fixed-size
            resize or crop).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    if start < 0:
        raise ValueError(f"start must be >= 0, got {start}")
    spans = [(start, len(records))] if spans is None else list(spans)
    if any(not 0 <= a <= b <= len(records) for a, b in spans):
        raise ValueError(f"spans must be (start, stop) ranges within [0, {len(records)}], got {spans}")
    ranges = [range(s, min(s + batch_size, b)) for a, b in spans for s in range(a, b, batch_size)]
    return _iter_batches(records, transform, workers, ranges, max_pixels)


def _iter_batches(records, transform, workers, ranges, max_pixels) -> Iterator[Batch]:
    if not ranges:
        return
    decode = _DecodeImages(records, transform, max_pixels)
    if workers == 0:
        batches: Iterator[Batch | str] = (_collate([decode[i] for i in r]) for r in ranges)
    else:
        batches = iter(torch.utils.data.DataLoader(
            decode, batch_sampler=ranges, num_workers=min(workers, len(ranges)),
            collate_fn=_collate, worker_init_fn=_init_worker, prefetch_factor=2,
            pin_memory=False))
    for batch in batches:
        if isinstance(batch, str):  # raised here, not in a worker, to stay one clean line
            raise AtlasError(batch)
        yield batch


# (record index, transformed image or None, reason or None)
_Decoded = tuple[int, "torch.Tensor | None", "str | None"]


class _DecodeImages(torch.utils.data.Dataset):
    """Record index -> (index, transformed image, None) or (index, None, reason it failed)."""

    def __init__(self, records: Sequence[ImageRecord], transform, max_pixels: int | None):
        self.records = records
        self.transform = transform
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> _Decoded:
        try:
            image = load_image(self.records[index].path, self.max_pixels)
        except BadImage as e:
            return index, None, e.reason
        try:
            pixels = torch.as_tensor(self.transform(image), dtype=torch.float32)
        except Exception as e:  # one bad image must not end the run
            return index, None, f"transform failed: {_describe(e)}"
        return index, pixels, None


def _collate(items: list[_Decoded]) -> Batch | str:
    """Stacks the images that decoded; returns an error message instead if shapes differ."""
    ok = [(i, x) for i, x, _ in items if x is not None]
    shapes = {tuple(x.shape) for _, x in ok}
    if len(shapes) > 1:
        return (f"the image preprocessing returns tensors of different shapes {sorted(shapes)}; "
                "it must resize or crop every image to one size")
    return Batch(
        start=items[0][0],
        indices=np.array([i for i, _ in ok], dtype=np.int64),
        pixels=torch.stack([x for _, x in ok]) if ok else torch.empty(0),
        skipped=[(i, reason) for i, x, reason in items if x is None],
    )


def _init_worker(_worker_id: int) -> None:
    # One thread per decoding process, so the workers do not compete with the model's threads;
    # a lower priority, so that decoding fills the moments the model leaves a core idle instead
    # of taking time slices from it (prefetching keeps the next batches ready all the same).
    torch.set_num_threads(1)
    try:
        os.nice(10)
    except (AttributeError, OSError):
        pass
