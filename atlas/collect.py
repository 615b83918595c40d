"""Collect stage: images -> RUN/activations.h5.

Reads the images of `config.images` and the model; writes the run's activations (atlas.store):
for each layer, the activations at k random positions per image away from the border, the
sample's image and position, and its attribution to every class; per image its label, the
model's top-1 prediction and whether it could be read.

Work is committed in parts of `collect.images_per_part` images (each a file written atomically
in the run's collect work folder), so an interrupted collect computes only the parts that are not
on disk and, because parts and batches have fixed boundaries and positions are seeded per image,
ends bit-identical to an uninterrupted run. The parts are shared out between processes the same
way (atlas.distributed: torchrun ranks, or `--shard I/N` jobs and a final `--merge`). The final
file is assembled from the parts and appears only when complete.

`collect_activations` is the same sampling in memory, for a list of images in a notebook.
"""

from __future__ import annotations

import collections
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from . import __version__
from .artifacts import atomic_path, to_jsonable
from .config import Config
from .corpus import ImageRecord, find_images, iter_batches
from .distributed import ALONE, Shard
from .errors import AtlasError
from .layer_maps import maps_to_json
from .layers import LayerTap, map_shapes
from .models import LoadedModel, Preprocess, load_model
from .runtime import keep_freed_memory
from .store import Run
from .store.fingerprints import collect_fingerprint, image_stats


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


@dataclass
class Samples:
    """Sampled activations of some images at some layers (what activations.h5 holds, in memory)."""

    acts: dict[str, np.ndarray]  # layer -> (n, C) activation vectors (float16 or float32)
    image: dict[str, np.ndarray]  # layer -> (n,) int32 index of the sample's image
    yx: dict[str, np.ndarray]  # layer -> (n, 2) int16 (row, column) in the layer's map
    attr: dict[str, np.ndarray] = field(default_factory=dict)  # layer -> (n, n_classes) float16 attribution
    pred: np.ndarray | None = None  # (n_images,) int32 top-1 class, -1 where not computed


def sample_batch(tap: LayerTap, indices: np.ndarray, pixels: torch.Tensor, candidates: dict[str, np.ndarray], *,
                 samples_per_image: int | str, seed: int, attribution: bool, attribution_batch: int, predict: bool,
                 dtype: str) -> Samples:
    """Runs one batch of network inputs and samples every layer of `tap` at seeded positions.

    Args:
        tap: the model cut at the layers (`LayerTap`), on the pixels' device.
        indices: (B,) int image indices (they seed the positions: see `image_rng`).
        pixels: (B, 3, H, W) preprocessed network inputs.
        candidates: layer -> (m, 2) positions the samples are drawn from (`interior_positions`).
        samples_per_image: positions per image and layer, or "all".
        seed: the run's seed.
        attribution: compute each sample's attribution to every class.
        attribution_batch: (image, position) tangents pushed through the network at once.
        predict: compute each image's top-1 class.
        dtype: "float16" or "float32", the activations' storage type.

    Returns:
        The batch's Samples (`pred` (B,), -1 without prediction).
    """
    np_dtype = np.float16 if dtype == "float16" else np.float32
    with torch.no_grad():
        out = tap.run(pixels, logits=attribution or predict)
    pred = (out.logits.argmax(dim=1).cpu().numpy().astype(np.int32) if out.logits is not None
            else np.full(len(indices), -1, np.int32))
    samples = Samples({}, {}, {}, {}, pred)
    for layer_index, layer in enumerate(tap.layers):
        yx_np = batch_positions(indices, layer_index, seed, candidates[layer], samples_per_image)
        yx = torch.from_numpy(yx_np).to(pixels.device)
        k = yx.shape[1]
        with torch.no_grad():
            samples.acts[layer] = gather_samples(out.acts[layer], yx).float().cpu().numpy().astype(np_dtype)
        samples.image[layer] = np.repeat(np.asarray(indices).astype(np.int32), k)
        samples.yx[layer] = yx_np.reshape(-1, 2).astype(np.int16)
        if attribution:
            with torch.enable_grad():
                attr = tap.attribute(layer, out, yx, chunk=attribution_batch)
            samples.attr[layer] = attr.reshape(-1, attr.shape[-1]).cpu().numpy().astype(np.float16)
    return samples


def collect_activations(model: nn.Module | LoadedModel, images: torch.Tensor | Sequence[Image.Image],
                        layers: Sequence[str], *, samples_per_image: int | str = 16, border: int = 1,
                        attribution: bool = True, attribution_batch: int = 256, predict: bool = True, seed: int = 0,
                        batch_size: int = 32, dtype: str = "float32", preprocess: Preprocess | None = None,
                        layout: str | Mapping[str, str] = "auto", prefix_tokens: int | str = "auto",
                        device: str | torch.device = "cpu") -> Samples:
    """Samples the activations of some images at some layers, in memory (no files).

    The same sampling as the collect stage: image i's positions are seeded by (seed, layer, i).

    Args:
        model: an `nn.Module` (taking normalised inputs) or a `LoadedModel` (`atlas.load_model`).
        images: (B, 3, H, W) float network inputs, or PIL images (preprocessed with `preprocess`,
            default the LoadedModel's).
        layers: dotted layer names whose outputs are (C, H, W) maps, channels-last (H, W, C) maps
            or (tokens, C) patch tokens (`atlas layers MODEL` lists them with their layouts).
        samples_per_image: random positions per image and layer, or "all"; default 16.
        border: positions closer than this to the map's edge are not sampled; default 1.
        attribution: also compute each sample's attribution to every class (needs the logits);
            default True.
        attribution_batch: tangents per forward-mode pass; default 256.
        predict: also compute each image's top-1 class; default True.
        seed: seeds the positions; default 0.
        batch_size: images per forward pass; default 32.
        dtype: storage type of `acts`, "float32" (default) or "float16".
        preprocess: turns PIL images into inputs (default: the LoadedModel's).
        layout: how the layers' outputs read as maps: "auto", "nchw", "nhwc", "tokens", or a
            table layer -> layout (see `atlas.layer_maps.choose_map`); default "auto".
        prefix_tokens: leading class/register tokens of token layers, or "auto"; default "auto".
        device: where the model runs; default "cpu". The model is moved there.

    Returns:
        Samples: per layer `acts` (n, C), `image` (n,), `yx` (n, 2), `attr` (n, n_classes), and
        `pred` (B,).
    """
    module = model.module if isinstance(model, LoadedModel) else model
    if not isinstance(images, torch.Tensor):
        preprocess = preprocess or (model.preprocess if isinstance(model, LoadedModel) else None)
        if preprocess is None:
            raise AtlasError("PIL images need a preprocess (pass a LoadedModel or preprocess=)")
        images = torch.stack([preprocess(image) for image in images])
    device = torch.device(device)
    module = module.to(device).to(memory_format=torch.channels_last)
    maps, shapes = map_shapes(module, tuple(images.shape[1:]), layers, layout, prefix_tokens)
    tap = LayerTap(module, layers, maps=maps)
    candidates = {layer: interior_positions(*shapes[layer][1:], border) for layer in layers}
    batches = []
    for start in range(0, len(images), batch_size):
        indices = np.arange(start, min(start + batch_size, len(images)))
        pixels = images[start:start + batch_size].to(device).contiguous(memory_format=torch.channels_last)
        batches.append(sample_batch(tap, indices, pixels, candidates, samples_per_image=samples_per_image, seed=seed,
                                    attribution=attribution, attribution_batch=attribution_batch, predict=predict,
                                    dtype=dtype))
    merged = Samples({}, {}, {}, {}, np.concatenate([b.pred for b in batches]) if batches else np.zeros(0, np.int32))
    for what in ("acts", "image", "yx", "attr"):
        for layer in (layers if batches and getattr(batches[0], what) else ()):
            getattr(merged, what)[layer] = np.concatenate([getattr(b, what)[layer] for b in batches])
    return merged


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

    def add(self, indices: np.ndarray, samples: Samples) -> None:
        for i, p in zip(indices, samples.pred):
            self.pred[int(i) - self.start] = int(p)
        for what in ("acts", "image", "yx", "attr"):
            for layer, block in getattr(samples, what).items():
                self.layers[layer][what].append(block)

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


def _finished_parts(parts_dir: Path, part_size: int, n_images: int) -> list[int]:
    """The indices of the parts already on disk (part i covers images [i * part_size, (i + 1) * part_size))."""
    return [i for i in range(-(-n_images // part_size)) if (parts_dir / _part_name(i * part_size)).is_file()]


# ----------------------------------------------------------------------------- run


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
    resumed_from: int  # images of finished parts found on disk at the start
    loop_seconds: float = 0.0  # decoding + model + sampling + writing parts
    assemble_seconds: float = 0.0  # streaming the parts into activations.h5
    assembled: bool = True  # False for a shard that left activations.h5 to rank 0 or to --merge
    parts_done: int = 0  # parts this process computed


@dataclass
class Sampler:
    """A run's model cut at its layers, and where each layer is sampled: what collect runs images
    through, and `atlas place` new images."""

    model: LoadedModel  # the model with its preprocessing and classes
    tap: LayerTap  # the module cut at the run's layers, on the device
    shapes: dict[str, tuple[int, ...]]  # layer -> (C, H, W) map shape
    maps: dict[str, Any]  # layer -> LayerMap (how its output reads as a map)
    candidates: dict[str, np.ndarray]  # layer -> (m, 2) positions samples are drawn from (`interior_positions`)


def load_sampler(config: Config, device: torch.device) -> Sampler:
    """The run's model (`model`, `weights`, `preprocess`) cut at `layers`, on `device`, with the
    positions `collect.border` leaves for sampling."""
    c = config.collect
    model = load_model(config.model, config.weights, config.preprocess)
    # Channels-last runs the (depthwise) convolutions of the front and of the attribution
    # tangents several times faster on the CPU; on the GPU it is neutral or better.
    module = model.module.to(device).to(memory_format=torch.channels_last)
    maps, shapes = map_shapes(module, model.input_shape, config.layers, c.layout, c.prefix_tokens,
                               config.model)
    tap = LayerTap(module, config.layers, config.model, maps)
    candidates = {layer: interior_positions(shapes[layer][1], shapes[layer][2], c.border) for layer in config.layers}
    return Sampler(model, tap, shapes, maps, candidates)


def run(config: Config, *, force: bool = False, log: Callable[[str], None] = print, shard: Shard = ALONE,
        merge: bool = False) -> CollectSummary:
    """Runs the collect stage for a config, skipping it when activations.h5 is up to date.

    Args:
        config: the run's config.
        force: recollect even when up to date.
        log: receives the summary lines.
        shard: this process's share of the parts (atlas.distributed): under torchrun every rank
            computes its parts and rank 0 assembles the file; an independent `--shard I/N` job
            only computes its parts.
        merge: compute nothing; assemble activations.h5 from the parts the shards left.

    Raises:
        AtlasError: for --merge, parts are missing (it names the shards that own them).
    """
    t_start = time.perf_counter()
    c = config.collect
    store = Run(config.run_dir, config)
    out_path = store.activations_path
    if c.threads:
        torch.set_num_threads(c.threads)
    keep_freed_memory()
    device = torch.device("cpu") if merge else shard.device(c.device, "collect.device")  # a merge computes nothing

    sampler = load_sampler(config, device)
    model, tap, shapes, maps = sampler.model, sampler.tap, sampler.shapes, sampler.maps
    records = find_images(config.images, model.classes.lookup if model.classes else None,
                          limit=c.max_images or None)
    stats = image_stats(records)
    fp = collect_fingerprint(config, model.preprocess, records, stats)
    # a merge assembles the parts on disk even over a current file (shards run with --force left them)
    if not force and not (merge and store.collect_parts_dir.exists()) and store.is_current(out_path, fp):
        log(f"collect: {out_path} is up to date, skipped")
        return CollectSummary(True, len(records), 0, {}, {}, None, 0.0, 0.0, out_path.stat().st_size, 0)

    parts_dir = store.collect_parts_dir
    part_size = -(-c.images_per_part // c.batch_size) * c.batch_size
    n_parts = -(-len(records) // part_size)
    # parts are kept for the same content and the same boundaries
    shard.prepare_work_dir(parts_dir, f"{fp} {part_size}", merge=merge, what="collect parts")
    done = _finished_parts(parts_dir, part_size, len(records))
    mine = [] if merge else [i for i in sorted(set(range(n_parts)) - set(done)) if shard.owns(i)]
    if done and mine:
        log(f"collect: {len(done)} of {n_parts} parts ({min(len(done) * part_size, len(records))} images) are "
            f"already on disk; {shard.describe() + ' computes ' if not shard.alone else 'computing '}"
            f"{len(mine)} more")

    t_loop = time.perf_counter()
    n_mine = sum(min(part_size, len(records) - i * part_size) for i in mine)
    if mine:
        _collect_parts(tap, records, model.preprocess, [(i * part_size, min((i + 1) * part_size, len(records)))
                                                        for i in mine], sampler.candidates, config, device, parts_dir,
                       show=shard.leads)
    loop_seconds = time.perf_counter() - t_loop
    rate = n_mine / loop_seconds if loop_seconds > 0 else 0.0
    shard.barrier()  # under torchrun: every rank's parts are written

    if not (shard.writes_result or merge):
        left = n_parts - len(_finished_parts(parts_dir, part_size, len(records)))
        log(f"collect: {shard.describe()}: {len(mine)} part(s), {n_mine} images in {loop_seconds:.1f} s "
            f"({rate:.1f} images/s); " + (f"rank 0 writes {out_path.name}" if shard.group else
                                           f"{left} of {n_parts} parts still missing" if left else
                                           "every part is done") +
            ("" if shard.group else f"; when every shard has finished, run `atlas collect {config.run_dir} --merge`"))
        return CollectSummary(False, len(records), 0, {}, {}, None, time.perf_counter() - t_start, rate, 0,
                              len(done) * part_size, loop_seconds, 0.0, assembled=False, parts_done=len(mine))

    finished = _finished_parts(parts_dir, part_size, len(records))
    missing = sorted(set(range(n_parts)) - set(finished))
    if missing:
        raise AtlasError(_missing_parts(missing, n_parts, config.run_dir))
    t_assemble = time.perf_counter()
    summary = _assemble(store, [parts_dir / _part_name(i * part_size) for i in finished], records, stats, config,
                        model, shapes, maps_to_json(maps), fp)
    shutil.rmtree(parts_dir, ignore_errors=True)
    summary.seconds = time.perf_counter() - t_start
    summary.loop_seconds = loop_seconds
    summary.assemble_seconds = time.perf_counter() - t_assemble
    summary.resumed_from = min(len(done) * part_size, len(records))
    summary.images_per_s = rate
    summary.parts_done = len(mine)
    _log_summary(summary, out_path, log)
    return summary


def _collect_parts(tap: LayerTap, records: Sequence[ImageRecord], preprocess: Preprocess,
                   spans: Sequence[tuple[int, int]], candidates: dict[str, np.ndarray], config: Config,
                   device: torch.device, parts_dir: Path, show: bool) -> None:
    """Samples the images of each (start, stop) span and writes each span as one part file
    (`show`: a progress bar on a terminal)."""
    c = config.collect
    progress = _progress(sum(b - a for a, b in spans), show)
    stops = dict(spans)
    try:
        part = None
        for batch in iter_batches(records, preprocess, c.batch_size, workers=c.workers,
                                  max_pixels=c.max_image_pixels, spans=spans):
            if part is None:
                part = _Part.empty(batch.start, stops[batch.start], config.layers)
            for index, reason in batch.skipped:
                part.status[index - part.start] = reason
            if len(batch.indices):
                pixels = batch.pixels.to(device).contiguous(memory_format=torch.channels_last)
                part.add(batch.indices, sample_batch(
                    tap, batch.indices, pixels, candidates, samples_per_image=c.samples_per_image, seed=c.seed,
                    attribution=c.attribution, attribution_batch=c.attribution_batch, predict=c.predict,
                    dtype=c.dtype))
            batch_stop = min(batch.start + c.batch_size, part.stop)
            progress.update(batch_stop - batch.start)
            if batch_stop >= part.stop:
                part.save(parts_dir / _part_name(part.start))
                part = None
    finally:
        progress.close()


def _missing_parts(missing: Sequence[int], n_parts: int, run_dir: Path) -> str:
    """The one line of a --merge that lacks parts: which, who owns them, what to run."""
    listed = ", ".join(str(i) for i in missing[:8]) + (", ..." if len(missing) > 8 else "")
    return (f"{len(missing)} of {n_parts} collect parts are missing (part {listed}; part i belongs to shard i mod N "
            f"of --shard I/N): run those shards again, or `atlas collect {run_dir}` to compute the rest here")


def _progress(total: int, show: bool):
    """A progress bar on a terminal (one process of a torchrun group shows its own; the others stay quiet)."""
    from tqdm import tqdm

    return tqdm(total=total, unit="img", desc="collect", disable=None if show else True, dynamic_ncols=True)


def _assemble(store: Run, parts: Sequence[Path], records: Sequence[ImageRecord], stats: np.ndarray, config: Config,
              model: LoadedModel, shapes: dict[str, tuple[int, ...]], layer_maps: dict[str, Any], fp: str
              ) -> CollectSummary:
    """Streams the parts into activations.h5 (atomically) and returns the counts."""
    n = len(records)
    status = np.empty(n, dtype=object)
    pred = np.full(n, -1, dtype=np.int32)
    n_classes = 0
    with store.write_activations() as out:
        out.images([r.relpath for r in records], [r.label for r in records], stats)
        if model.classes is not None:
            out.classes(model.classes.names, model.classes.wnids)
        for path in parts:
            with np.load(path) as part:
                start, stop = (int(v) for v in part["range"])
                status[start:stop] = part["status"].astype(object)
                pred[start:stop] = part["pred"]
                for i, layer in enumerate(config.layers):
                    for key in ("acts", "image", "yx", "attr"):
                        if f"{i}/{key}" in part.files:
                            block = part[f"{i}/{key}"]
                            out.append(layer, key, block)
                            if key == "attr":
                                n_classes = block.shape[1]
        act_dtype = np.float16 if config.collect.dtype == "float16" else np.float32
        for layer in config.layers:  # layers with no sample at all still get their datasets
            empty = {"acts": np.zeros((0, shapes[layer][0]), act_dtype), "image": np.zeros(0, np.int32),
                     "yx": np.zeros((0, 2), np.int16)}
            for key, block in empty.items():
                if not out.has(layer, key):
                    out.append(layer, key, block)
        if n_classes == 0 and model.classes is not None and (config.collect.predict or config.collect.attribution):
            n_classes = len(model.classes)
        out.finish(pred, status.astype(str), fingerprint=fp, config=config, model=config.model,
                   weights=config.weights, seed=config.collect.seed, layers=list(config.layers),
                   layer_shapes={k: list(v) for k, v in shapes.items()}, layer_maps=layer_maps, preprocess=to_jsonable(model.preprocess),
                   n_classes=n_classes, package_version=__version__)
        samples = dict(out.samples)
    labels = np.array([r.label for r in records])
    ok = status == "ok"
    skipped = collections.Counter(s for s in status if s != "ok")
    labelled = ok & (labels >= 0) & (pred >= 0)
    accuracy = float((pred[labelled] == labels[labelled]).mean()) if labelled.any() else None
    return CollectSummary(False, n, int(ok.sum()), dict(skipped), samples, accuracy, 0.0, 0.0,
                          store.activations_path.stat().st_size, 0)


def _log_summary(s: CollectSummary, out_path: Path, log: Callable[[str], None]) -> None:
    skipped = sum(s.skipped.values())
    reasons = ", ".join(f"{count} {reason}" for reason, count in sorted(s.skipped.items()))
    log(f"collect: {s.n_images} images read, {s.n_ok} ok, {skipped} skipped" + (f" ({reasons})" if reasons else ""))
    for layer, count in s.samples.items():
        log(f"collect: layer {layer}: {count} samples")
    if s.accuracy is not None:
        log(f"collect: model top-1 accuracy against the folder labels: {100 * s.accuracy:.1f}%")
    rate = f"{s.images_per_s:.1f} images/s" if s.parts_done else "assembled from the parts on disk"
    log(f"collect: {rate}, {s.seconds:.1f} s in all; wrote {out_path} ({s.file_size / 2**20:.1f} MiB)")
