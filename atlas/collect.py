"""Collect stage: images -> RUN/activations.h5.

Reads the images of `config.images` and the model; writes `RUN/activations.h5` (schema in
README): for each layer, the activations at k random positions per image away from the border,
the sample's image and position, and its attribution to every class.

Work is committed in parts (`RUN/.collect-parts/part-NNNNNNNNN.npz`, each written atomically), so
an interrupted collect resumes at the last finished part and, because batches have fixed
boundaries and positions are seeded per image, ends bit-identical to an uninterrupted run. The
final file is assembled from the parts and renamed into place only when complete.
"""

from __future__ import annotations

import collections
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch

from . import __version__
from .artifacts import atomic_path, fingerprint, is_up_to_date, prepare_work_dir, to_jsonable, write_provenance
from .config import Config
from .corpus import ImageRecord, find_images, iter_batches
from .errors import AtlasError
from .layers import LayerTap, layer_shapes
from .models import LoadedModel, load_model
from .runtime import keep_freed_memory, pick_device

ACTIVATIONS = "activations.h5"
PARTS = ".collect-parts"
IMAGES_PER_PART = 256  # a kill loses at most this much finished work


# ----------------------------------------------------------------------------- pure core


def image_rng(seed: int, layer_index: int, image_index: int) -> np.random.Generator:
    """The generator for one image and layer: independent of batching, so resume is exact."""
    return np.random.default_rng([seed, layer_index, image_index])


def interior_positions(height: int, width: int, border: int) -> np.ndarray:
    """All (y, x) positions at least `border` away from every edge, row-major, shape (m, 2) int64."""
    ys = np.arange(border, height - border)
    xs = np.arange(border, width - border)
    if len(ys) == 0 or len(xs) == 0:
        # A map too small for the border: fall back to every position rather than none.
        ys, xs = np.arange(height), np.arange(width)
    grid = np.stack(np.meshgrid(ys, xs, indexing="ij"), axis=-1)
    return grid.reshape(-1, 2)


def sample_positions(rng: np.random.Generator, candidates: np.ndarray, k: int | str) -> np.ndarray:
    """Picks k distinct positions from `candidates` (m, 2), or all of them for k="all" or k >= m.

    Returns (min(k, m), 2) int64, sorted row-major so the file reads in map order.
    """
    m = len(candidates)
    if k == "all" or int(k) >= m:
        return candidates.copy()
    chosen = np.sort(rng.choice(m, size=int(k), replace=False))
    return candidates[chosen]


def batch_positions(indices: Sequence[int], layer_index: int, seed: int, candidates: np.ndarray,
                    k: int | str) -> np.ndarray:
    """Positions for every image of a batch: (B, k', 2) int64, seeded by image index."""
    return np.stack([sample_positions(image_rng(seed, layer_index, int(i)), candidates, k)
                     for i in indices]) if len(indices) else np.zeros((0, 0, 2), np.int64)


def gather_samples(acts: torch.Tensor, yx: torch.Tensor) -> torch.Tensor:
    """Activation vectors at positions: acts (B, C, H, W), yx (B, k, 2) -> (B*k, C)."""
    b, k = yx.shape[:2]
    batch = torch.arange(b, device=acts.device).repeat_interleave(k)
    flat = yx.reshape(-1, 2)
    return acts[batch, :, flat[:, 0], flat[:, 1]]


# ----------------------------------------------------------------------------- parts


@dataclass
class _Part:
    """The results for one range of images, accumulated in memory and written as one file."""

    start: int
    stop: int
    status: list[str]
    pred: list[int]
    layers: dict[str, dict[str, list[np.ndarray]]]

    @classmethod
    def empty(cls, start: int, stop: int, layers: Sequence[str]) -> "_Part":
        return cls(start, stop, ["ok"] * (stop - start), [-1] * (stop - start),
                   {layer: collections.defaultdict(list) for layer in layers})

    def save(self, path: Path) -> None:
        arrays = {"range": np.array([self.start, self.stop]), "status": np.array(self.status, dtype=str),
                  "pred": np.array(self.pred, dtype=np.int32)}
        for i, (layer, data) in enumerate(self.layers.items()):
            for key, chunks in data.items():
                arrays[f"{i}/{key}"] = np.concatenate(chunks)
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)


def _part_name(start: int) -> str:
    return f"part-{start:09d}.npz"


def _finished_parts(parts_dir: Path, part_size: int, n_images: int) -> list[Path]:
    """The parts already on disk, contiguous from the first image (a gap ends the list)."""
    found = []
    start = 0
    while start < n_images and (parts_dir / _part_name(start)).is_file():
        found.append(parts_dir / _part_name(start))
        start += part_size
    return found


# ----------------------------------------------------------------------------- run


def collect_fingerprint(config: Config, model: LoadedModel, records: Sequence[ImageRecord]) -> str:
    """Everything that decides the content of activations.h5 (not workers, threads or device)."""
    c = config.collect
    images = []
    for r in records:
        try:
            st = r.path.stat()
            images.append((r.relpath, st.st_size, st.st_mtime_ns))
        except OSError:
            images.append((r.relpath, -1, -1))
    return fingerprint("collect", config.model, config.weights, model.preprocess, config.layers,
                       c.samples_per_image, c.border, c.batch_size, c.attribution, c.attribution_batch, c.predict, c.dtype,
                       c.seed, c.max_images, c.max_image_pixels, images)


@dataclass
class CollectSummary:
    """What a collect run did, for the summary lines and the tests."""

    skipped_up_to_date: bool
    n_images: int
    n_ok: int
    skipped: dict[str, int]
    samples: dict[str, int]
    accuracy: float | None
    seconds: float
    images_per_s: float
    file_size: int
    resumed_from: int
    loop_seconds: float = 0.0  # decoding + model + sampling + writing parts
    assemble_seconds: float = 0.0  # streaming the parts into activations.h5


def run(config: Config, *, force: bool = False, log: Callable[[str], None] = print,
        stop_after_parts: int | None = None) -> CollectSummary:
    """Runs the collect stage for a config, skipping it when activations.h5 is up to date.

    Args:
        config: the run's config.
        force: recollect even when up to date.
        log: receives the summary lines.
        stop_after_parts: for tests: return after writing this many new parts (simulates a kill).
    """
    t_start = time.perf_counter()
    c = config.collect
    run_dir = config.run_dir
    out_path = run_dir / ACTIVATIONS
    if c.threads:
        torch.set_num_threads(c.threads)
    keep_freed_memory()
    device = pick_device(c.device, "collect.device")

    model = load_model(config.model, config.weights, config.preprocess)
    records = find_images(config.images, model.classes.lookup if model.classes else None,
                          limit=c.max_images or None)
    # Channels-last runs the (depthwise) convolutions of the front and of the attribution
    # tangents several times faster on the CPU; on the GPU it is neutral or better.
    module = model.module.to(device).to(memory_format=torch.channels_last)
    tap = LayerTap(module, config.layers, config.model)
    shapes = layer_shapes(module, model.input_shape, config.layers)
    for layer in config.layers:
        if len(shapes.get(layer, ())) != 3:
            raise AtlasError(f"layer {layer!r} outputs shape {shapes.get(layer)}; collect needs a (C, H, W) "
                             "feature map — pick a convolutional layer from `atlas layers`")
    fp = collect_fingerprint(config, model, records)
    if not force and is_up_to_date(out_path, fp):
        log(f"collect: {out_path} is up to date, skipped")
        return CollectSummary(True, len(records), 0, {}, {}, None, 0.0, 0.0, out_path.stat().st_size, 0)

    parts_dir = run_dir / PARTS
    prepare_work_dir(parts_dir, fp)
    part_size = max(1, IMAGES_PER_PART // c.batch_size) * c.batch_size
    done = _finished_parts(parts_dir, part_size, len(records))
    resume = len(done) * part_size
    if resume:
        log(f"collect: resuming after {min(resume, len(records))} of {len(records)} images")

    needs_logits = c.attribution or c.predict
    candidates = {layer: interior_positions(shapes[layer][1], shapes[layer][2], c.border)
                  for layer in config.layers}
    n_new_parts = 0
    t_loop = time.perf_counter()
    progress = _progress(len(records), resume)
    try:
        part = None
        for batch in iter_batches(records, model.preprocess, c.batch_size, workers=c.workers, start=resume,
                                  max_pixels=c.max_image_pixels):
            if part is None:
                part = _Part.empty(batch.start, min(batch.start + part_size, len(records)), config.layers)
            for index, reason in batch.skipped:
                part.status[index - part.start] = reason
            if len(batch.indices):
                pixels = batch.pixels.to(device).contiguous(memory_format=torch.channels_last)
                _collect_batch(tap, batch.indices, pixels, part, candidates, c, needs_logits)
            batch_stop = min(batch.start + c.batch_size, len(records))
            progress.update(batch_stop - batch.start)
            if batch_stop >= part.stop:
                part.save(parts_dir / _part_name(part.start))
                part = None
                n_new_parts += 1
                if stop_after_parts is not None and n_new_parts >= stop_after_parts:
                    return CollectSummary(False, len(records), 0, {}, {}, None, 0.0, 0.0, 0, resume)
    finally:
        progress.close()
    loop_seconds = time.perf_counter() - t_loop

    parts = _finished_parts(parts_dir, part_size, len(records))
    t_assemble = time.perf_counter()
    summary = _assemble(out_path, parts, records, config, model, shapes, fp, log)
    shutil.rmtree(parts_dir, ignore_errors=True)
    summary.seconds = time.perf_counter() - t_start
    summary.loop_seconds = loop_seconds
    summary.assemble_seconds = time.perf_counter() - t_assemble
    summary.resumed_from = resume
    summary.images_per_s = (len(records) - resume) / loop_seconds if loop_seconds > 0 else 0.0
    _log_summary(summary, out_path, log)
    return summary


@torch.no_grad()
def _collect_batch(tap: LayerTap, indices: np.ndarray, pixels: torch.Tensor, part: _Part,
                   candidates: dict[str, np.ndarray], c, needs_logits: bool) -> None:
    """Runs one batch and appends its samples to the part."""
    dtype = np.float16 if c.dtype == "float16" else np.float32
    out = tap.run(pixels, logits=needs_logits)
    if out.logits is not None:
        preds = out.logits.argmax(dim=1).cpu().numpy()
        for i, p in zip(indices, preds):
            part.pred[int(i) - part.start] = int(p)
    for layer_index, layer in enumerate(tap.layers):
        yx_np = batch_positions(indices, layer_index, c.seed, candidates[layer], c.samples_per_image)
        yx = torch.from_numpy(yx_np).to(pixels.device)
        k = yx.shape[1]
        data = part.layers[layer]
        data["acts"].append(gather_samples(out.acts[layer], yx).float().cpu().numpy().astype(dtype))
        data["image"].append(np.repeat(indices.astype(np.int32), k))
        data["yx"].append(yx_np.reshape(-1, 2).astype(np.int16))
        if c.attribution:
            with torch.enable_grad():
                attr = tap.attribute(layer, out, yx, chunk=c.attribution_batch)
            data["attr"].append(attr.reshape(-1, attr.shape[-1]).cpu().numpy().astype(np.float16))


def _progress(total: int, initial: int):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="img", desc="collect", disable=None, dynamic_ncols=True)


def _assemble(out_path: Path, parts: Sequence[Path], records: Sequence[ImageRecord], config: Config,
              model: LoadedModel, shapes: dict[str, tuple[int, ...]], fp: str,
              log: Callable[[str], None]) -> CollectSummary:
    """Streams the parts into activations.h5 (atomically) and returns the counts."""
    n = len(records)
    status = np.empty(n, dtype=object)
    pred = np.full(n, -1, dtype=np.int32)
    str_dt = h5py.string_dtype()
    samples = {layer: 0 for layer in config.layers}
    n_classes = 0
    with atomic_path(out_path) as tmp:
        with h5py.File(tmp, "w") as h5:
            images = h5.create_group("images")
            images.create_dataset("path", data=np.array([r.relpath for r in records], dtype=object), dtype=str_dt)
            images.create_dataset("label", data=np.array([r.label for r in records], dtype=np.int32))
            if model.classes is not None:
                classes = h5.create_group("classes")
                classes.create_dataset("name", data=np.array(model.classes.names, dtype=object), dtype=str_dt)
                if model.classes.wnids is not None:
                    classes.create_dataset("wnid", data=np.array(model.classes.wnids, dtype=object), dtype=str_dt)
            datasets: dict[str, dict[str, h5py.Dataset]] = {}
            for path in parts:
                with np.load(path) as part:
                    start, stop = (int(v) for v in part["range"])
                    status[start:stop] = part["status"].astype(object)
                    pred[start:stop] = part["pred"]
                    for i, layer in enumerate(config.layers):
                        for key in ("acts", "image", "yx", "attr"):
                            name = f"{i}/{key}"
                            if name not in part.files:
                                continue
                            block = part[name]
                            ds = datasets.setdefault(layer, {}).get(key)
                            if ds is None:
                                ds = _create_growing(h5, f"layers/{layer}/{key}", block)
                                datasets[layer][key] = ds
                            else:
                                ds.resize(ds.shape[0] + len(block), axis=0)
                                ds[-len(block):] = block
                            if key == "acts":
                                samples[layer] += len(block)
                            if key == "attr":
                                n_classes = block.shape[1]
            for layer in config.layers:  # layers with no sample at all still get their datasets
                channels = shapes[layer][0]
                empty = {"acts": np.zeros((0, channels), np.float16 if config.collect.dtype == "float16"
                                          else np.float32),
                         "image": np.zeros(0, np.int32), "yx": np.zeros((0, 2), np.int16)}
                for key, block in empty.items():
                    if key not in datasets.get(layer, {}):
                        _create_growing(h5, f"layers/{layer}/{key}", block)
            images.create_dataset("pred", data=pred)
            images.create_dataset("status", data=status.astype(str).astype(object), dtype=str_dt)
            if n_classes == 0 and model.classes is not None and (config.collect.predict or config.collect.attribution):
                n_classes = len(model.classes)
            write_provenance(h5, stage="collect", fingerprint_=fp, config=config, inputs="",
                             model=config.model, weights=config.weights, seed=config.collect.seed,
                             layers=list(config.layers), layer_shapes={k: list(v) for k, v in shapes.items()},
                             preprocess=to_jsonable(model.preprocess), n_classes=n_classes,
                             package_version=__version__)
            h5.attrs["complete"] = True
    labels = np.array([r.label for r in records])
    ok = status == "ok"
    skipped = collections.Counter(s for s in status if s != "ok")
    labelled = ok & (labels >= 0) & (pred >= 0)
    accuracy = float((pred[labelled] == labels[labelled]).mean()) if labelled.any() else None
    return CollectSummary(False, n, int(ok.sum()), dict(skipped), samples, accuracy, 0.0, 0.0,
                          out_path.stat().st_size, 0)


def _create_growing(h5: h5py.File, name: str, block: np.ndarray) -> h5py.Dataset:
    """A chunked dataset resizable along its first axis, holding `block` to begin with."""
    row_bytes = max(1, block.dtype.itemsize * int(np.prod(block.shape[1:], dtype=np.int64)))
    chunk_rows = int(max(1, min(4096, (1 << 20) // row_bytes)))  # ~1 MiB chunks
    return h5.create_dataset(name, data=block, maxshape=(None, *block.shape[1:]),
                             chunks=(chunk_rows, *block.shape[1:]))


def _log_summary(s: CollectSummary, out_path: Path, log: Callable[[str], None]) -> None:
    skipped = sum(s.skipped.values())
    reasons = ", ".join(f"{count} {reason}" for reason, count in sorted(s.skipped.items()))
    log(f"collect: {s.n_images} images read, {s.n_ok} ok, {skipped} skipped" + (f" ({reasons})" if reasons else ""))
    for layer, count in s.samples.items():
        log(f"collect: layer {layer}: {count} samples")
    if s.accuracy is not None:
        log(f"collect: model top-1 accuracy against the folder labels: {100 * s.accuracy:.1f}%")
    log(f"collect: {s.images_per_s:.1f} images/s, {s.seconds:.1f} s in all; wrote {out_path} "
        f"({s.file_size / 2**20:.1f} MiB)")
