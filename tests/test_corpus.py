"""Tests for atlas.corpus: listing the images, decoding every kind of file, fixed-boundary batches."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from atlas import corpus
from atlas.corpus import BadImage, ImageRecord, find_images, iter_batches, load_image
from atlas.errors import AtlasError


def touch_image(path: Path, color=(255, 0, 0), size=(6, 4), fmt=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, fmt)
    return path


def mode_of(path: Path) -> str:
    with Image.open(path) as image:
        return image.mode


def to_tensor(image: Image.Image) -> torch.Tensor:
    """A fixed-size transform: 4 x 4, channels first, in [0, 1]."""
    array = np.asarray(image.resize((4, 4)), dtype=np.float32) / 255
    return torch.from_numpy(array).permute(2, 0, 1)


# ---------------------------------------------------------------------------------------------
# find_images


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    touch_image(root / "n001" / "b.jpg")
    touch_image(root / "n001" / "a.jpg")
    touch_image(root / "cat" / "deep" / "x.png")
    touch_image(root / "cat" / "y.png")
    touch_image(root / "zebra" / "z.png")  # a folder label_of does not know
    touch_image(root / "top.jpg")
    (root / "notes.txt").write_text("not an image, but listed so that it is reported\n")
    touch_image(root / ".hidden.jpg")
    touch_image(root / ".cache" / "c.jpg")
    touch_image(root / "n001" / ".d.jpg")
    (root / "Thumbs.db").write_bytes(b"\0")
    return root


def label_of(name: str) -> int | None:
    return {"n001": 0, "cat": 7, "deep": 9}.get(name)


def test_find_images_lists_every_visible_file_sorted(tree: Path):
    records = find_images(tree)
    assert [r.relpath for r in records] == [
        "cat/deep/x.png", "cat/y.png", "n001/a.jpg", "n001/b.jpg", "notes.txt", "top.jpg",
        "zebra/z.png"]
    assert all(r.path.is_absolute() and r.path == tree / r.relpath for r in records)
    assert all(r.label == -1 for r in records)


def test_find_images_labels_from_parent_folder(tree: Path):
    labels = {r.relpath: r.label for r in find_images(tree, label_of)}
    assert labels == {"cat/deep/x.png": 9, "cat/y.png": 7, "n001/a.jpg": 0, "n001/b.jpg": 0,
                      "notes.txt": -1, "top.jpg": -1, "zebra/z.png": -1}


def test_find_images_limit_takes_the_first_after_sorting(tree: Path):
    assert [r.relpath for r in find_images(tree, label_of, limit=3)] == [
        "cat/deep/x.png", "cat/y.png", "n001/a.jpg"]
    assert len(find_images(tree, limit=100)) == 7


def test_find_images_relative_root_gives_absolute_paths(tree: Path, monkeypatch):
    monkeypatch.chdir(tree.parent)
    records = find_images("images", limit=1)
    assert records == [ImageRecord(tree / "cat" / "deep" / "x.png", "cat/deep/x.png", -1)]


def test_find_images_follows_links_but_not_loops(tree: Path):
    os.symlink(tree, tree / "n001" / "loop")  # back to an ancestor
    os.symlink(tree / "cat", tree / "n001" / "cats")  # elsewhere: followed
    os.symlink(tree / "top.jpg", tree / "link.jpg")
    relpaths = [r.relpath for r in find_images(tree)]
    assert "link.jpg" in relpaths and "n001/cats/deep/x.png" in relpaths
    assert not any(p.startswith("n001/loop/") for p in relpaths)
    assert len(relpaths) == 10


@pytest.mark.parametrize("case", ["missing", "file", "empty", "only hidden"])
def test_find_images_bad_root_is_a_one_line_user_error(tmp_path: Path, case: str):
    root = tmp_path / "images"
    if case == "file":
        root.write_text("x")
    elif case == "empty":
        root.mkdir()
    elif case == "only hidden":
        touch_image(root / ".x.jpg")
    with pytest.raises(AtlasError) as error:
        find_images(root)
    message = str(error.value)
    assert "\n" not in message and str(root) in message and "--set images=DIR" in message
    if case == "missing":
        assert "does not exist" in message


# ---------------------------------------------------------------------------------------------
# load_image: what decodes


def pixel(image: Image.Image, xy=(0, 0)) -> tuple[int, int, int]:
    assert image.mode == "RGB"
    return image.getpixel(xy)


def test_load_image_rgb_and_grayscale(tmp_path: Path):
    path = touch_image(tmp_path / "rgb.png", (10, 20, 30))
    assert pixel(load_image(path)) == (10, 20, 30)
    Image.new("L", (5, 5), 100).save(tmp_path / "gray.jpg")
    assert pixel(load_image(tmp_path / "gray.jpg")) == (100, 100, 100)
    bits = Image.new("1", (5, 5), 0)
    bits.putpixel((1, 1), 1)
    bits.save(tmp_path / "bits.png")
    image = load_image(tmp_path / "bits.png")
    assert pixel(image) == (0, 0, 0) and pixel(image, (1, 1)) == (255, 255, 255)


def test_load_image_cmyk_jpeg(tmp_path: Path):
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")  # pure red
    assert mode_of(tmp_path / "cmyk.jpg") == "CMYK"
    r, g, b = pixel(load_image(tmp_path / "cmyk.jpg"))
    assert r > 240 and g < 15 and b < 15


def test_load_image_transparency_becomes_white(tmp_path: Path):
    rgba = Image.new("RGBA", (4, 2), (255, 0, 0, 0))  # transparent red
    rgba.putpixel((0, 0), (0, 0, 255, 255))
    rgba.save(tmp_path / "rgba.png")
    image = load_image(tmp_path / "rgba.png")
    assert pixel(image, (1, 1)) == (255, 255, 255) and pixel(image) == (0, 0, 255)

    palette = Image.new("P", (4, 2), 1)
    palette.putpalette([0, 255, 0, 255, 0, 0] + [0] * 762)  # 0 green, 1 red
    palette.putpixel((0, 0), 0)
    palette.save(tmp_path / "palette.png", transparency=1)
    assert mode_of(tmp_path / "palette.png") == "P"
    image = load_image(tmp_path / "palette.png")
    assert pixel(image, (1, 1)) == (255, 255, 255) and pixel(image) == (0, 255, 0)


def test_load_image_16_bit_is_scaled_not_clipped(tmp_path: Path):
    gradient = np.linspace(0, 65535, 64 * 16).astype(np.uint16).reshape(16, 64)
    Image.fromarray(gradient).save(tmp_path / "deep.png")
    assert mode_of(tmp_path / "deep.png") == "I;16"
    values = np.asarray(load_image(tmp_path / "deep.png"))[..., 0]
    assert values.min() == 0 and values.max() == 255
    assert abs(values.mean() - 127.5) < 1 and len(np.unique(values)) == 256


def test_load_image_32_bit_and_float_modes(tmp_path: Path):
    wide = Image.fromarray(np.array([[-1000, 0, 3000]], dtype=np.int32))
    wide.save(tmp_path / "wide.tiff")
    assert mode_of(tmp_path / "wide.tiff") == "I"
    assert np.asarray(load_image(tmp_path / "wide.tiff"))[0, :, 0].tolist() == [0, 64, 255]
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    unit.save(tmp_path / "unit.tiff")
    assert np.asarray(load_image(tmp_path / "unit.tiff"))[0, :, 0].tolist() == [0, 128, 255]


@pytest.mark.parametrize("orientation", [6, 8])
def test_load_image_applies_exif_orientation(tmp_path: Path, orientation: int):
    exif = Image.Exif()
    exif[0x0112] = orientation
    image = Image.new("RGB", (40, 20), (200, 0, 0))
    image.paste((0, 0, 200), (0, 0, 20, 20))  # left half blue
    image.save(tmp_path / "rotated.jpg", exif=exif.tobytes())
    loaded = load_image(tmp_path / "rotated.jpg")
    assert loaded.size == (20, 40)
    # 6: rotate 90 clockwise, the left half goes to the top; 8: counter-clockwise, to the bottom.
    top = pixel(loaded, (10, 5))
    assert (top[2] > top[0]) == (orientation == 6)


# ---------------------------------------------------------------------------------------------
# load_image: what fails, and why


def reason_of(path, **kwargs) -> str:
    with pytest.raises(BadImage) as error:
        load_image(path, **kwargs)
    return error.value.reason


def test_load_image_truncated(tmp_path: Path):
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "whole.jpg", quality=95)
    data = (tmp_path / "whole.jpg").read_bytes()
    (tmp_path / "half.jpg").write_bytes(data[: len(data) // 2])
    assert reason_of(tmp_path / "half.jpg") == "truncated"
    touch_image(tmp_path / "whole.png")
    (tmp_path / "header.png").write_bytes((tmp_path / "whole.png").read_bytes()[:20])
    assert reason_of(tmp_path / "header.png") == "truncated"
    assert not ImageFile.LOAD_TRUNCATED_IMAGES


def test_load_image_refuses_what_is_not_an_image(tmp_path: Path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    assert reason_of(tmp_path / "empty.jpg") == "empty file"
    (tmp_path / "text.jpg").write_text("hello, I am not a JPEG\n")
    assert reason_of(tmp_path / "text.jpg") == "not an image"
    (tmp_path / "folder.jpg").mkdir()
    assert reason_of(tmp_path / "folder.jpg") == "is a directory"
    os.mkfifo(tmp_path / "pipe.jpg")  # opening it would block forever
    assert reason_of(tmp_path / "pipe.jpg") == "not a regular file"
    assert reason_of(tmp_path / "missing.jpg") == "unreadable: No such file or directory"
    os.symlink(tmp_path / "gone.jpg", tmp_path / "broken.jpg")
    assert reason_of(tmp_path / "broken.jpg") == "unreadable: No such file or directory"


def test_load_image_corrupt_png(tmp_path: Path):
    touch_image(tmp_path / "ok.png", size=(32, 32))
    data = bytearray((tmp_path / "ok.png").read_bytes())
    data[40:60] = b"\xff" * 20  # inside IHDR/IDAT: checksum or stream errors
    (tmp_path / "bad.png").write_bytes(bytes(data))
    reason = reason_of(tmp_path / "bad.png")
    assert reason.startswith(("corrupt: ", "truncated", "not an image")), reason


def test_load_image_permission_error(tmp_path: Path, monkeypatch):
    path = touch_image(tmp_path / "secret.png")

    def refuse(*args, **kwargs):  # the tests may run as root, where chmod 000 changes nothing
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(corpus, "open", refuse, raising=False)
    error = pytest.raises(BadImage, load_image, path).value
    assert error.reason == "unreadable: Permission denied" and str(path) in str(error)


def test_load_image_decompression_bomb(tmp_path: Path):
    limit_before = Image.MAX_IMAGE_PIXELS
    Image.new("1", (20000, 20000)).save(tmp_path / "bomb.png")  # 48 kB, 400 M pixels
    assert reason_of(tmp_path / "bomb.png") == (
        "too large (decompression bomb: 20000 x 20000 pixels > 89478485)")
    touch_image(tmp_path / "small.png", size=(20, 10))
    assert reason_of(tmp_path / "small.png", max_pixels=199) == (
        "too large (decompression bomb: 20 x 10 pixels > 199)")
    assert load_image(tmp_path / "small.png", max_pixels=200).size == (20, 10)
    assert Image.MAX_IMAGE_PIXELS == limit_before


def test_load_image_max_pixels_above_pil_limit(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    touch_image(tmp_path / "big.png", size=(100, 100))  # 10 x PIL's (patched) limit
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL's DecompressionBombWarning must not escape either
        assert load_image(tmp_path / "big.png", max_pixels=10_000).size == (100, 100)
    assert Image.MAX_IMAGE_PIXELS == 1000
    assert reason_of(tmp_path / "big.png", max_pixels=9_999).startswith("too large")


# ---------------------------------------------------------------------------------------------
# iter_batches


def make_corpus(root: Path, n: int, bad: dict[int, str]) -> list[ImageRecord]:
    """n images of distinct colours; the indices in `bad` get broken files of that kind."""
    for i in range(n):
        path = root / f"{i:03d}.png"
        if bad.get(i) == "text":
            path.write_text("nope")
        elif bad.get(i) == "empty":
            path.write_bytes(b"")
        else:
            size = (9, 9) if bad.get(i) == "odd size" else (6, 4)
            touch_image(path, (10 * i, 255 - 10 * i, 3 * i), size=size)
    return find_images(root)


def fussy_transform(image: Image.Image) -> torch.Tensor:
    if image.size == (9, 9):
        raise ValueError("odd size")
    return to_tensor(image)


def collect(batches) -> list[tuple[int, list[int], torch.Tensor, list[tuple[int, str]]]]:
    return [(b.start, b.indices.tolist(), b.pixels, b.skipped) for b in batches]


def test_iter_batches_fixed_boundaries_around_failures(tmp_path: Path):
    records = make_corpus(tmp_path, 8, {3: "text", 4: "odd size"})
    batches = list(iter_batches(records, fussy_transform, batch_size=3, workers=0))
    assert [b.start for b in batches] == [0, 3, 6]
    assert [b.indices.tolist() for b in batches] == [[0, 1, 2], [5], [6, 7]]
    assert all(b.indices.dtype == np.int64 for b in batches)
    assert batches[1].skipped == [(3, "not an image"),
                                  (4, "transform failed: ValueError: odd size")]
    assert [tuple(b.pixels.shape) for b in batches] == [(3, 3, 4, 4), (1, 3, 4, 4), (2, 3, 4, 4)]
    assert batches[0].pixels.dtype == torch.float32
    # In order: image i is filled with red 10 * i.
    reds = torch.cat([b.pixels[:, 0, 0, 0] for b in batches]) * 255
    assert torch.allclose(reds, torch.tensor([0.0, 10, 20, 50, 60, 70]), atol=0.5)


def test_iter_batches_resume_sees_the_same_batches(tmp_path: Path):
    records = make_corpus(tmp_path, 8, {4: "empty"})
    whole = collect(iter_batches(records, to_tensor, batch_size=3, workers=0))
    resumed = collect(iter_batches(records, to_tensor, batch_size=3, workers=0, start=3))
    assert len(resumed) == 2
    for (s1, i1, p1, k1), (s2, i2, p2, k2) in zip(whole[1:], resumed):
        assert (s1, i1, k1) == (s2, i2, k2) and torch.equal(p1, p2)
    assert resumed[0][3] == [(4, "empty file")]


def test_iter_batches_workers_give_identical_results(tmp_path: Path):
    records = make_corpus(tmp_path, 11, {2: "text", 5: "odd size", 6: "empty", 7: "text"})
    serial = collect(iter_batches(records, fussy_transform, batch_size=2, workers=0))
    parallel = collect(iter_batches(records, fussy_transform, batch_size=2, workers=2))
    assert [s for s, *_ in parallel] == [0, 2, 4, 6, 8, 10]
    assert len(serial) == len(parallel)
    for (s1, i1, p1, k1), (s2, i2, p2, k2) in zip(serial, parallel):
        assert (s1, i1, k1) == (s2, i2, k2) and torch.equal(p1, p2)
    # Batch [6, 8) failed entirely: no images and an empty pixels tensor.
    assert serial[3][1] == [] and serial[3][2].numel() == 0
    assert serial[3][3] == [(6, "empty file"), (7, "not an image")]


def test_iter_batches_nothing_to_do(tmp_path: Path):
    assert list(iter_batches([], to_tensor, batch_size=4, workers=2)) == []
    records = make_corpus(tmp_path, 3, {})
    assert list(iter_batches(records, to_tensor, batch_size=4, start=3)) == []


def test_iter_batches_rejects_a_transform_of_varying_shape(tmp_path: Path):
    records = make_corpus(tmp_path, 2, {1: "odd size"})
    with pytest.raises(AtlasError, match="different shapes"):
        list(iter_batches(records, lambda im: torch.zeros(im.size[0]), batch_size=2,
                          workers=0))
    with pytest.raises(ValueError):
        iter_batches(records, to_tensor, batch_size=0)
