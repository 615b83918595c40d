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
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import numpy as np
import torch

from atlas import optvis
from atlas.config import RenderConfig
from atlas.layers import LayerTap
from atlas.models import load_model
from atlas.render import icon_options, optimize_icons
from atlas.runtime import keep_freed_memory


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
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    keep_freed_memory()  # render does this itself; the bare pass must get it too
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    batches = [int(b) for b in args.batches.split(",")]
    config = dataclasses.replace(RenderConfig(), icon_size=args.icon_size, steps=args.steps, pad=8, jitter=8,
                                 scale=0.2, rotate=15.0)
    layouts = [True, False] if args.contiguous else [True]
    rows = []
    for channels_last in layouts:
        model = load_model(args.model, "DEFAULT")
        module = model.module.to(device)
        if channels_last:
            module = module.to(memory_format=torch.channels_last)
        network = optvis.Network(module, [args.layer], normalise=model.preprocess.normalise,
                                 channels_last=channels_last)
        tap = LayerTap(module, [args.layer])
        channels = optvis.evaluate(network, torch.rand(1, 3, args.icon_size, args.icon_size))[args.layer].shape[1]
        for batch in batches:
            warm = dataclasses.replace(config, steps=2)
            render_steps(network, args.layer, batch, warm, channels, device)
            bare_steps(tap, model.preprocess.normalise, batch, args.icon_size, 2, device, channels_last)
            bare, rend = [], []
            for _ in range(args.reps):
                bare.append(bare_steps(tap, model.preprocess.normalise, batch, args.icon_size, args.steps, device,
                                       channels_last))
                rend.append(render_steps(network, args.layer, batch, config, channels, device))
            rows.append(("channels-last" if channels_last else "contiguous", batch, statistics.median(bare),
                         statistics.median(rend), statistics.median(r / b for r, b in zip(rend, bare))))

    print(f"device: {device}, model {args.model} to {args.layer}, {args.icon_size} px icons, {args.steps} timed steps, "
          f"{args.reps} reps, {torch.get_num_threads()} threads")
    header = (f"{'layout':<14}{'batch':>6}{'bare img-steps/s':>18}{'render img-steps/s':>20}{'ratio':>7}"
              f"{'per-icon speed-up':>19}")
    if device.type == "cuda":
        header += f"{'icons/s @' + str(args.icon_steps):>14}"
    print(header)
    for layout, batch, bare, rend, ratio in rows:
        base = next(r for lay, b, _, r, _ in rows if lay == layout and b == batches[0])
        line = f"{layout:<14}{batch:>6}{bare:>18.0f}{rend:>20.0f}{ratio:>7.2f}{rend / base:>18.1f}x"
        if device.type == "cuda":
            line += f"{rend / args.icon_steps:>14.1f}"
        print(line)


if __name__ == "__main__":
    main()
