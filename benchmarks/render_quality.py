"""Render speed at equal quality: icons per second of new render settings against today's, each
with the median cosine its icons reach, side by side in one run.

Reads: RUN/grid.h5 (a map's cell directions) and RUN/config.toml (the model, and the [render]
transforms). Writes: nothing.

"Today" is the render recipe before issue 14: 64 px icons, 256 Adam steps at a constant lr of
0.05, no early stopping. Each other variant changes some of that (`--variants`, or the built-in
ladder of step counts under the new defaults). Every variant renders the same cells with the same
seeds (one batch of `--cells`), timed as wall-clock seconds per batch; variants alternate in
rounds so that all see the same machine load, and the median over rounds is shown. Quality is the
median over cells of cos(icon's centre activation, cell direction), measured on the 8-bit icon as
icons.json records it. The line "fastest at today's quality" names the cheapest variant whose
median cosine is at least today's, and its icons/s as a multiple of today's.

    .venv/bin/python benchmarks/render_quality.py data/runs/demo [--map blocks.10] [--grid 10] [--cells 32]
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
from atlas.models import load_model  # noqa: E402
from atlas.render import icon_options, icon_seed, optimize_icons  # noqa: E402
from atlas.runtime import keep_freed_memory  # noqa: E402
from atlas.store import Run  # noqa: E402

TODAY = dict(icon_size=64, steps=256, lr=0.05, schedule="constant", warmup=0, stop_window=0, stop_rise=0.0)
LADDER = (64, 96, 128, 192)  # step counts tried under the new defaults


def parse_variant(text: str) -> dict:
    """'steps=128,schedule="cosine"' -> {"steps": 128, "schedule": "cosine"} (values read as TOML)."""
    out = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        keys, value = parse_override(item)
        out[keys[-1]] = value
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--map", default="blocks.10")
    parser.add_argument("--grid", type=int, default=10)
    parser.add_argument("--cells", type=int, default=32, help="cells rendered per variant (one batch)")
    parser.add_argument("--first", type=int, default=0, help="index of the first cell")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--variants", default="", help="';'-separated render settings to try against today's; "
                        "default: the new defaults at steps " + ", ".join(map(str, LADDER)))
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    keep_freed_memory()
    config = load_config(args.run)
    store = Run(config.run_dir, config)
    grid = store.grid(args.map, args.grid)
    cells = slice(args.first, args.first + args.cells)
    directions = grid.direction[cells]
    seeds = [icon_seed(0, grid.size, int(x), int(y), 0) for x, y in grid.cell[cells]]
    layer = store.find_map(args.map).layer
    device = torch.device(args.device)
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
        for steps in LADDER:
            variants[f"new defaults at {steps} steps"] = dataclasses.replace(
                base, icon_size=64, steps=steps, lr=defaults.lr, schedule=defaults.schedule, warmup=defaults.warmup,
                stop_window=defaults.stop_window, stop_rise=defaults.stop_rise)

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

    print(f"{args.run} {args.map} {args.grid}x{args.grid}, cells {args.first}-{args.first + len(directions) - 1}, "
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


if __name__ == "__main__":
    main()
