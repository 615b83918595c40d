"""Collect throughput against a bare forward pass of the same truncated model.

Reads: the images of --images (default ../shared/imagenet-sample). Writes: a scratch run
directory under a temporary folder (deleted afterwards).

Decodes --images images once into memory, times a bare `torch.no_grad()` forward of the model
cut at the layer (the same fx graph collect runs, channels-last) over those batches, then the
whole collect stage over the same images without and with attribution, alternating bare and
collect runs so that both see the same machine load. Prints each collect run's throughput as a
fraction of the bare pass timed next to it. Absolute images/s mean something only on a GPU.

    .venv/bin/python benchmarks/collect.py [--images DIR] [--n 128] [--layer blocks.10] [--threads 1]
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import torch

from atlas import collect
from atlas.config import Config, CollectConfig
from atlas.corpus import find_images, iter_batches
from atlas.layers import LayerTap
from atlas.models import load_model
from atlas.runtime import keep_freed_memory


def bare_forward(tap: LayerTap, batches: list[torch.Tensor]) -> float:
    """Images per second of the truncated model alone over pre-decoded batches."""
    n = sum(len(b) for b in batches)
    start = time.perf_counter()
    with torch.no_grad():
        for x in batches:
            tap.front(x)
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", default="../shared/imagenet-sample")
    parser.add_argument("--n", type=int, default=128, help="images to use")
    parser.add_argument("--layer", default="blocks.10")
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--samples", type=int, default=16, help="samples per image")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads for the model (0 = torch's default, all cores)")
    parser.add_argument("--no-attribution-only", action="store_true", help="skip the attribution run")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    keep_freed_memory()  # collect does this itself; the bare pass must get it too
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(args.model, "DEFAULT")
    module = model.module.to(device).to(memory_format=torch.channels_last)
    tap = LayerTap(module, [args.layer])
    records = find_images(args.images, limit=args.n)
    batches = [b.pixels.to(device).contiguous(memory_format=torch.channels_last)
               for b in iter_batches(records, model.preprocess, args.batch_size, workers=0)]
    bare_forward(tap, batches[:1])  # warm up

    with tempfile.TemporaryDirectory() as tmp:
        base = Config(run_dir=Path(tmp) / "run", images=Path(args.images), model=args.model,
                      layers=(args.layer,),
                      collect=CollectConfig(samples_per_image=args.samples, batch_size=args.batch_size,
                                            workers=args.workers, max_images=args.n, threads=args.threads))
        rows = []
        runs = (("collect, no attribution", False), ("collect, attribution", True))
        for label, attribution in runs[:1] if args.no_attribution_only else runs:
            config = dataclasses.replace(base, collect=dataclasses.replace(
                base.collect, attribution=attribution, predict=attribution))
            bare = bare_forward(tap, batches)
            summary = collect.run(config, force=True, log=lambda s: None)
            loop = args.n / summary.loop_seconds
            whole = args.n / (summary.loop_seconds + summary.assemble_seconds)
            rows.append((label, bare, loop, whole))
    print(f"device: {device}, model {args.model} to {args.layer}, {args.n} images, batch {args.batch_size}, "
          f"{args.samples} samples/image, {args.workers} loader worker(s), {torch.get_num_threads()} threads")
    print(f"{'run':<26}{'bare img/s':>12}{'collect img/s':>15}{'ratio':>8}{'ratio incl. h5 assembly':>26}")
    for label, bare, loop, whole in rows:
        print(f"{label:<26}{bare:>12.1f}{loop:>15.1f}{loop / bare:>8.2f}{whole / bare:>26.2f}")


if __name__ == "__main__":
    main()
