"""A million samples through layout and grid: wall time, CPU time and peak memory per stage and backend.

Writes a synthetic run into a temporary folder (or `--dir`): N samples x C channels of one layer,
float16 as collect stores them, in collect's format (through the run store, as tests/toy_runs.py
does), a block at a time so the writer never holds them all. The samples are a mixture of a few
hundred clusters, each a Gaussian around a sparse non-negative centre passed through a ReLU, so a
layout has structure to find. Then, for each backend, `atlas layout RUN --force` (fit on
`layout.fit_samples`, the rest placed) and `atlas grid RUN --force` (sizes 10, 20, 40) run each in
its own fresh process, and this script reports each stage's wall time, CPU time (all threads) and
peak resident memory (the child's ru_maxrss from wait4), and the layout's trustworthiness.

Target on the 2-core, 24 GiB machines this project is built on: 1M x 112 through layout + grid
with peak RSS under 4 GiB and under 15 minutes.

    python benchmarks/scale.py                          # 1,000,000 x 112, both backends (about 30 minutes)
    python benchmarks/scale.py --backend torchdr        # one backend
    python benchmarks/scale.py --n 200000 --fit-samples 20000
    python benchmarks/scale.py --small                  # 50,000 x 32, a quick check
    python benchmarks/scale.py --backend torchdr --device cuda   # TorchDR on a GPU
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from toy_runs import toy_config  # noqa: E402

WRITE_ROWS = 65_536  # samples synthesised and appended at a time


def synthesise(n: int, channels: int, clusters: int, seed: int, rows: int = WRITE_ROWS):
    """Yields float16 blocks of a ReLU Gaussian mixture: (rows, channels) each, n rows in all.

    Cluster centres are sparse (about a third of the channels active) and non-negative, like a
    conv layer's post-ReLU activations; cluster sizes vary (Dirichlet weights).
    """
    rng = np.random.default_rng(seed)
    centres = rng.gamma(2.0, 1.0, size=(clusters, channels)) * (rng.random((clusters, channels)) < 0.35)
    spread = rng.uniform(0.2, 0.6, size=(clusters, 1))
    weights = rng.dirichlet(np.full(clusters, 2.0))
    for start in range(0, n, rows):
        m = min(rows, n - start)
        which = rng.choice(clusters, size=m, p=weights)
        x = centres[which] + spread[which] * rng.standard_normal((m, channels))
        yield np.maximum(x, 0).astype(np.float16)


def write_run(run_dir: Path, n: int, channels: int, clusters: int, seed: int) -> None:
    """RUN/activations.h5 (one layer, "layer") and RUN/config.toml, as collect would leave them."""
    from atlas.config import save_config
    from atlas.store import Run

    config = toy_config(run_dir, layers=("layer",), grid={"sizes": (10, 20, 40)})
    n_images = max(1, n // 16)
    store = Run(run_dir, config)
    with store.write_activations() as out:
        out.images([f"img{i}.jpg" for i in range(n_images)], [-1] * n_images)
        out.classes(None, None)
        start = 0
        for block in synthesise(n, channels, clusters, seed):
            rows = np.arange(start, start + len(block))
            out.append("layer", "acts", block)
            out.append("layer", "image", (rows % n_images).astype(np.int32))
            out.append("layer", "yx", np.ones((len(block), 2), np.int16))
            start += len(block)
        out.finish(np.full(n_images, -1, np.int32), ["ok"] * n_images, fingerprint=f"scale-{n}-{channels}-{seed}",
                   config=config, model=config.model, weights=config.weights, seed=seed, layers=["layer"],
                   layer_shapes={"layer": [channels, 7, 7]}, n_classes=0)
    save_config(config)


def run_stage(args: list[str]) -> dict:
    """Runs `python -m atlas ARGS` in a fresh process; its wall and CPU seconds and peak RSS (GiB)."""
    t = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-m", "atlas", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
    output = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        sys.exit(f"atlas {' '.join(args)} failed ({child.returncode}):\n{output[-3000:]}")
    return {"wall": time.perf_counter() - t, "cpu": usage.ru_utime + usage.ru_stime,
            "rss": usage.ru_maxrss / 2**20, "output": output}  # ru_maxrss is in KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000, help="samples (default 1,000,000)")
    parser.add_argument("--channels", type=int, default=112, help="channels C (default 112, EfficientNet-Lite0 blocks.10)")
    parser.add_argument("--clusters", type=int, default=300, help="mixture components (default 300)")
    parser.add_argument("--backend", choices=("umap-learn", "torchdr", "both"), default="both")
    parser.add_argument("--fit-samples", type=int, default=None, help="layout.fit_samples (default: the config default)")
    parser.add_argument("--small", action="store_true", help="50,000 x 32: a quick check")
    parser.add_argument("--dir", type=Path, help="write the run here and keep it (default: a temporary folder)")
    parser.add_argument("--device", default="cpu",
                        help="layout.device for the torchdr backend: cpu (default), cuda, cuda:N, auto")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    n, channels = (50_000, 32) if args.small else (args.n, args.channels)
    backends = ["umap-learn", "torchdr"] if args.backend == "both" else [args.backend]

    with tempfile.TemporaryDirectory() as tmp:
        run_dir = args.dir or Path(tmp) / "scale"
        t = time.perf_counter()
        write_run(run_dir, n, channels, args.clusters, args.seed)
        size = (run_dir / "activations.h5").stat().st_size / 2**20
        print(f"scale benchmark: {n} x {channels} float16 samples, {args.clusters} clusters, {size:.0f} MiB "
              f"activations.h5 written in {time.perf_counter() - t:.0f} s; {os.cpu_count()} cores", flush=True)
        results = []
        for backend in backends:
            sets = ["--set", f"layout.backend={backend}", "--set", f"layout.device={args.device}"]
            if args.fit_samples is not None:
                sets += ["--set", f"layout.fit_samples={args.fit_samples}"]
            layout = run_stage(["layout", str(run_dir), "--force", *sets])
            print(f"  {backend} layout: {layout['wall']:.0f} s; {layout['output'].strip().splitlines()[0]}", flush=True)
            grid = run_stage(["grid", str(run_dir), "--force"])
            print(f"  {backend} grid: {grid['wall']:.0f} s", flush=True)
            results.append((backend, layout, grid))

    print()
    print(f"{'backend':<11} {'stage':<7} {'wall s':>8} {'CPU s':>8} {'peak RSS GiB':>13}")
    for backend, layout, grid in results:
        for stage, r in (("layout", layout), ("grid", grid)):
            note = ""
            if stage == "layout":
                fitted = re.search(r"fitted on (\d+)", r["output"])
                trust = re.search(r"trustworthiness ([0-9.]+)", r["output"])
                note = (f"  fitted on {fitted.group(1) if fitted else 'all'}, "
                        f"trustworthiness {trust.group(1) if trust else '-'}")
            print(f"{backend:<11} {stage:<7} {r['wall']:>8.0f} {r['cpu']:>8.0f} {r['rss']:>13.2f}{note}")
        total = layout["wall"] + grid["wall"]
        peak = max(layout["rss"], grid["rss"])
        verdict = "meets" if total < 15 * 60 and peak < 4 else "misses"
        print(f"{backend:<11} {'total':<7} {total:>8.0f} {layout['cpu'] + grid['cpu']:>8.0f} {peak:>13.2f}  "
              f"{verdict} the target (< 900 s, < 4 GiB)")
    print("(each stage in a fresh process: interpreter start and imports included; CPU s counts every thread)")


if __name__ == "__main__":
    main()
