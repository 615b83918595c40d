"""Render throughput against a bare forward+backward of the same truncated model.

Reads: nothing (random directions; the model's weights from its package). Writes: nothing.

For each batch size, times (a) a bare step: normalise, the model cut at the layer (the same fx
graph render runs), and the gradient of the output with respect to the input; and (b) the
render stage's batch function `optimize_icons` (Fourier parameterisation, transforms, atlas
objective, Adam, and the final 8-bit evaluation) for the same number of steps. (The stage runs a
batch of one as a pair, for bitwise batch independence; the batch-1 row times one icon alone,
the honest baseline of one icon at a time.) Runs alternate
bare and render so that both see the same machine load; the median of the repetitions is shown.
Throughput is in image-steps per second (one image through one optimisation step); the ratio
render / bare is the fraction of the bare speed that rendering keeps, and the last column is how
much faster per icon a batch is than one icon at a time. Absolute icons/s (at --icon-steps steps
per icon) mean something only on a GPU.

    .venv/bin/python benchmarks/render.py [--layer blocks.10] [--icon-size 64] [--batches 1,32] [--steps 24]

With `--quality RUN`, speed at equal quality instead: icons per second of new render settings
against today's, each with the median cosine its icons reach, side by side in one run. Reads
RUN/grid.h5 (a map's cell directions) and RUN/config.toml (the model, and the [render]
transforms). "Today" is the recipe before issue 14: 64 px icons, 256 Adam steps at a constant lr
of 0.05, no early stopping. Each other variant changes some of that (`--variants`, default a
set: the new defaults (the layer's automatic icon size, early stopping), the new defaults at
64 px, the automatic size at a fixed 80 steps, and a cosine schedule at 128 steps). Every variant renders the same cells with the same seeds (one batch
of `--cells`), timed as wall-clock seconds per batch; variants alternate in rounds so that all see
the same machine load, and the median over rounds is shown. Quality is the median over cells of
cos(icon's centre activation, cell direction) on the 8-bit icon, as icons.json records it. The
last line names the fastest variant whose median cosine is at least today's, with its icons/s as
a multiple of today's.

    .venv/bin/python benchmarks/render.py --quality data/runs/demo [--map blocks.10] [--grid 10] [--cells 32]
        [--rounds 2] [--variants 'steps=128,schedule="cosine";steps=96,schedule="cosine"']
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's atlas, not an installed one

from atlas import optvis  # noqa: E402
from atlas.config import RenderConfig, load_config  # noqa: E402
from atlas.config_tables import parse_override  # noqa: E402
from atlas.layers import LayerTap  # noqa: E402
from atlas.models import load_model  # noqa: E402
from atlas.render import auto_icon_size, icon_options, icon_seed, optimize_icons  # noqa: E402
from atlas.runtime import keep_freed_memory  # noqa: E402
from atlas.store import Run  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_steps(tap: LayerTap, normalise, batch: int, size: int, steps: int, device: torch.device,
               channels_last: bool) -> float:
    """Image-steps per second of forward + backward to the input alone."""
    x = torch.rand(batch, 3, size, size, device=device, requires_grad=True)
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        inp = normalise(x)
        if channels_last:
            inp = inp.contiguous(memory_format=torch.channels_last)
        out = tap.front(inp)[0]
        torch.autograd.grad(out.sum(), x)
    sync(device)
    return batch * steps / (time.perf_counter() - start)


def render_steps(network: optvis.Network, layer: str, batch: int, config: RenderConfig, channels: int,
                 device: torch.device) -> float:
    """Image-steps per second of the render stage's batch function."""
    rng = np.random.default_rng(0)
    vectors = rng.random((batch, channels)).astype(np.float32)
    sync(device)
    start = time.perf_counter()
    optimize_icons(network, layer, vectors, vectors, list(range(batch)), None, **icon_options(config))
    sync(device)
    return batch * config.steps / (time.perf_counter() - start)


TODAY = dict(icon_size=64, steps=256, lr=0.05, schedule="constant", warmup=0, stop_window=0, stop_rise=0.0)


def parse_variant(text: str) -> dict:
    """'steps=128,schedule="cosine"' -> {"steps": 128, "schedule": "cosine"} (values read as TOML)."""
    out = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        keys, value = parse_override(item)
        out[keys[-1]] = value
    return out


def quality(args: argparse.Namespace) -> None:
    """--quality: icons/s and median cosine of each variant against today's recipe (see the docstring)."""
    keep_freed_memory()
    config = load_config(args.quality)
    store = Run(config.run_dir, config)
    grid = store.grid(args.map, args.grid)
    cells = slice(args.first, args.first + args.cells)
    directions = grid.direction[cells]
    seeds = [icon_seed(0, grid.size, int(x), int(y), 0) for x, y in grid.cell[cells]]
    layer = store.find_map(args.map).layer
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    model = load_model(config.model, config.weights, config.preprocess)
    module = model.module.to(device).to(memory_format=torch.channels_last)
    network = optvis.Network(module, [layer], normalise=model.preprocess.normalise, channels_last=True)

    # the run's transforms, today's recipe otherwise
    base = dataclasses.replace(RenderConfig(), pad=config.render.pad, jitter=config.render.jitter,
                               scale=config.render.scale, rotate=config.render.rotate)
    variants = {"today (64 px, 256 steps, constant lr)": dataclasses.replace(base, **TODAY)}
    if args.variants:
        for text in args.variants.split(";"):
            variants[text.strip()] = dataclasses.replace(base, **{**TODAY, **parse_variant(text)})
    else:
        defaults = RenderConfig()
        auto = auto_icon_size(network, layer)
        new = dict(icon_size=auto, steps=defaults.steps, lr=defaults.lr, schedule=defaults.schedule,
                   warmup=defaults.warmup, stop_window=defaults.stop_window, stop_rise=defaults.stop_rise)
        variants[f"new defaults ({auto} px, early stopping)"] = dataclasses.replace(base, **new)
        variants["new defaults at 64 px (early stopping alone)"] = dataclasses.replace(base, **{**new, "icon_size": 64})
        variants[f"{auto} px, 80 steps, no early stopping"] = dataclasses.replace(base, **{**TODAY, "icon_size": auto,
                                                                                           "steps": 80})
        variants["64 px, 128 steps, cosine schedule (schedule alone)"] = dataclasses.replace(
            base, **{**TODAY, "steps": 128, "schedule": "cosine", "warmup": 8})

    seconds: dict[str, list[float]] = {name: [] for name in variants}
    result = {}
    # warm the allocator and oneDNN's kernels for each size before timing
    for r in {v.icon_size: v for v in variants.values()}.values():
        optimize_icons(network, layer, directions[:2], directions[:2], seeds[:2], None,
                       **{**icon_options(r), "steps": 2, "stop_window": 0})
    for _ in range(args.rounds):
        for name, r in variants.items():
            start = time.perf_counter()
            result[name] = optimize_icons(network, layer, directions, directions, seeds, None, **icon_options(r))
            seconds[name].append(time.perf_counter() - start)

    print(f"{args.quality} {args.map} {args.grid}x{args.grid}, cells {args.first}-{args.first + len(directions) - 1}, "
          f"{args.rounds} rounds, {torch.get_num_threads()} threads, {device}")
    print(f"{'variant':<60}{'s/batch':>9}{'icons/s':>9}{'vs today':>10}{'steps':>7}{'median cos':>12}"
          f"{'cells >= today':>16}")
    today_name = next(iter(variants))
    today_rate = len(directions) / statistics.median(seconds[today_name])
    today_cos = result[today_name].cosine
    best = None
    for name in variants:
        t = statistics.median(seconds[name])
        rate = len(directions) / t
        cos = result[name].cosine
        mean_steps = float(np.mean(result[name].steps))
        better = float(np.mean(cos >= today_cos - 1e-6))
        print(f"{name:<60}{t:>9.1f}{rate:>9.2f}{rate / today_rate:>9.2f}x{mean_steps:>7.0f}{np.median(cos):>12.3f}"
              f"{better:>16.0%}")
        if name != today_name and np.median(cos) >= np.median(today_cos) and (best is None or rate > best[1]):
            best = (name, rate)
    if best is None:
        print("fastest at today's quality: none of the variants reaches today's median cosine")
    else:
        print(f"fastest at today's quality: {best[0]}: {best[1] / today_rate:.2f}x today's icons/s")



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--layer", default="blocks.10")
    parser.add_argument("--icon-size", type=int, default=64)
    parser.add_argument("--batches", default="1,32", help="comma-separated batch sizes; the first is the baseline "
                        "of the per-icon speed-up")
    parser.add_argument("--steps", type=int, default=24, help="timed steps per measurement")
    parser.add_argument("--reps", type=int, default=3, help="alternating repetitions (median shown)")
    parser.add_argument("--icon-steps", type=int, default=256, help="steps per icon for the icons/s column")
    parser.add_argument("--contiguous", action="store_true", help="also time the model in contiguous layout")
    parser.add_argument("--modes", default="float32", help="comma-separated ways to run the channels-last model: "
                        "float32, bfloat16 (autocast), compile (torch.compile), compile+bfloat16; the bare pass "
                        "stays float32 eager, so the ratio column compares each mode with it")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--quality", type=Path, metavar="RUN", help="icons/s at equal median cosine on RUN's cells")
    parser.add_argument("--map", default="blocks.10", help="with --quality: the map whose cells are rendered")
    parser.add_argument("--grid", type=int, default=10, help="with --quality: its grid size")
    parser.add_argument("--cells", type=int, default=32, help="with --quality: cells rendered per variant")
    parser.add_argument("--first", type=int, default=0, help="with --quality: index of the first cell")
    parser.add_argument("--rounds", type=int, default=2, help="with --quality: alternating rounds (median shown)")
    parser.add_argument("--variants", default="", help="with --quality: ';'-separated render settings to try "
                        "against today's, e.g. 'steps=128,schedule=\"cosine\"'")
    args = parser.parse_args()
    if args.quality is not None:
        return quality(args)

    keep_freed_memory()  # render does this itself; the bare pass must get it too
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    batches = [int(b) for b in args.batches.split(",")]
    config = dataclasses.replace(RenderConfig(), icon_size=args.icon_size, steps=args.steps, pad=8, jitter=8,
                                 scale=0.2, rotate=15.0)
    layouts = [(True, mode) for mode in args.modes.split(",")] + ([(False, "float32")] if args.contiguous else [])
    rows = []
    for channels_last, mode in layouts:
        model = load_model(args.model, "DEFAULT")
        module = model.module.to(device)
        if channels_last:
            module = module.to(memory_format=torch.channels_last)
        network = optvis.Network(module, [args.layer], normalise=model.preprocess.normalise,
                                 channels_last=channels_last, autocast=torch.bfloat16 if "bfloat16" in mode else None,
                                 compile="compile" in mode)
        tap = LayerTap(module, [args.layer])
        channels = optvis.evaluate(network, torch.rand(1, 3, args.icon_size, args.icon_size))[args.layer].shape[1]
        for batch in batches:
            warm = dataclasses.replace(config, steps=2)
            render_steps(network, args.layer, batch, warm, channels, device)  # and compiles, in compile modes
            bare_steps(tap, model.preprocess.normalise, batch, args.icon_size, 2, device, channels_last)
            bare, rend = [], []
            for _ in range(args.reps):
                bare.append(bare_steps(tap, model.preprocess.normalise, batch, args.icon_size, args.steps, device,
                                       channels_last))
                rend.append(render_steps(network, args.layer, batch, config, channels, device))
            label = ("channels-last" if channels_last else "contiguous") + ("" if mode == "float32" else f" {mode}")
            rows.append((label, batch, statistics.median(bare),
                         statistics.median(rend), statistics.median(r / b for r, b in zip(rend, bare))))

    print(f"device: {device}, model {args.model} to {args.layer}, {args.icon_size} px icons, {args.steps} timed steps, "
          f"{args.reps} reps, {torch.get_num_threads()} threads")
    header = (f"{'layout':<30}{'batch':>6}{'bare img-steps/s':>18}{'render img-steps/s':>20}{'ratio':>7}"
              f"{'per-icon speed-up':>19}")
    if device.type == "cuda":
        header += f"{'icons/s @' + str(args.icon_steps):>14}"
    print(header)
    for layout, batch, bare, rend, ratio in rows:
        base = next(r for lay, b, _, r, _ in rows if lay == layout and b == batches[0])
        line = f"{layout:<30}{batch:>6}{bare:>18.0f}{rend:>20.0f}{ratio:>7.2f}{rend / base:>18.1f}x"
        if device.type == "cuda":
            line += f"{rend / args.icon_steps:>14.1f}"
        print(line)


if __name__ == "__main__":
    main()
