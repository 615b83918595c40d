"""`atlas compare` on a big synthetic run: time and peak memory, each measured in a fresh process.

Builds (once; reused when present) a run directory under `--root` with the store's writers, as the
stages write it: activations.h5 written a block of images at a time (float16 activations of two
layers, ReLU of a per-image low-rank signal plus per-sample noise, and float16 attribution to
`--classes` classes), layout.h5 with random positions, grid.h5 by the grid stage itself, and a
flat preview picture per layer (compare shows a picture; its content does not matter here). Then
runs `compare_runs` on it in a child process that prints its wall and CPU time, the time spent in
each part, and its peak RSS (`ru_maxrss`); a second child that only imports the same modules gives
the baseline RSS of Python, numpy, h5py and pynndescent (with numba).

    python benchmarks/compare_memory.py --images 62500 --samples 16     # 1M samples, 62.5k images
    python benchmarks/compare_memory.py --images 1000000 --samples 1    # 1M samples, 1M images
    python benchmarks/compare_memory.py --images 20000 --samples 4 --classes 100   # a quick check

A 1M-sample run with 1,000 classes takes about 4.3 GB of disk (attribution: 2 GB per layer).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from toy_runs import toy_config, write_layout  # noqa: E402

from atlas import grid as grid_mod  # noqa: E402
from atlas.config import save_config  # noqa: E402
from atlas.focus import MapSpec  # noqa: E402
from atlas.store import Run  # noqa: E402

LAYERS = ("blocks.10", "blocks.15")
IMAGES_PER_BLOCK = 8192

CHILD = textwrap.dedent("""
    import json, resource, sys, time
    from atlas import compare
    import pynndescent  # noqa: F401  (compare imports it for runs above EXACT_MAX_IMAGES; here for the baseline)
    if sys.argv[1] == "baseline":
        print(json.dumps({"maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
        sys.exit()
    spent = {}
    def timed(name, fn):
        def wrapper(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[name] = spent.get(name, 0.0) + time.perf_counter() - t
        return wrapper
    for name in ("_common_images", "_panel_figures", "_neighbors", "_write_figure"):
        setattr(compare, name, timed(name, getattr(compare, name)))
    wall, cpu = time.perf_counter(), time.process_time()
    result = compare.compare_runs([sys.argv[1]], out=sys.argv[2], log=lambda line: print(line, file=sys.stderr))
    print(json.dumps({"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu,
                      "maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "parts_s": spent, "images": result.images, "knn": result.knn_method,
                      "recall": result.knn_recall, "shared": result.shared.tolist()}))
""")


def build_run(run_dir: Path, n_images: int, samples: int, channels: int, classes: int, seed: int = 0) -> None:
    """Writes the synthetic run (see the module docstring); returns at once if it is already complete."""
    if (run_dir / "grid.h5").is_file() and (run_dir / LAYERS[-1]).is_dir():
        return
    t0 = time.perf_counter()
    config = toy_config(run_dir, layers=LAYERS, grid={"sizes": (20,), "min_count": 3})
    store = Run(run_dir, config)
    rng = np.random.default_rng(seed)
    weights = [rng.standard_normal((32, channels)).astype(np.float32) for _ in LAYERS]
    with store.write_activations() as out:
        out.images([f"n{i // 1000:05d}/img{i:07d}.jpg" for i in range(n_images)], [-1] * n_images)
        out.classes([f"class {c}" for c in range(classes)], None)
        for a in range(0, n_images, IMAGES_PER_BLOCK):
            m = min(IMAGES_PER_BLOCK, n_images - a)
            latent = np.repeat(rng.standard_normal((m, 32)).astype(np.float32), samples, axis=0)
            image = np.repeat(np.arange(a, a + m, dtype=np.int32), samples)  # collect writes an image's samples together
            for layer, w in zip(LAYERS, weights):
                noise = rng.standard_normal((m * samples, channels)).astype(np.float32)
                out.append(layer, "acts", np.maximum(latent @ w + noise, 0).astype(np.float16))
                out.append(layer, "image", image)
                out.append(layer, "yx", rng.integers(1, 13, (m * samples, 2)).astype(np.int16))
                out.append(layer, "attr", rng.standard_normal((m * samples, classes), np.float32).astype(np.float16))
        out.finish(np.full(n_images, -1, np.int32), ["ok"] * n_images, fingerprint=f"synthetic-{n_images}x{samples}",
                   config=config, model=config.model, weights=config.weights, seed=seed, layers=list(LAYERS),
                   layer_shapes={layer: [channels, 14, 14] for layer in LAYERS}, n_classes=classes)
    n = n_images * samples
    write_layout(config, {layer: rng.random((n, 2), np.float32) for layer in LAYERS})
    save_config(config)
    grid_mod.run(config, log=lambda line: None)
    grid_fp = store.grid_fingerprint()
    for layer in LAYERS:
        grid = store.grid(layer, 20)
        store.write_picture(np.full((64, 64, 3), 200, np.uint8), store.preview_png(layer, 20),
                            store.preview_png_fingerprint(MapSpec(layer, layer), grid, grid_fp))
    print(f"built {run_dir} ({n_images} images x {samples} samples x {channels} channels, {classes} classes) "
          f"in {time.perf_counter() - t0:.0f} s")


def child(*args: str) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(done.stderr)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=62_500)
    parser.add_argument("--samples", type=int, default=16, help="samples per image")
    parser.add_argument("--channels", type=int, default=112)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--root", type=Path, default=Path(tempfile.gettempdir()) / "atlas-compare-memory")
    args = parser.parse_args()
    run_dir = args.root / f"{args.images}x{args.samples}x{args.channels}c{args.classes}"
    build_run(run_dir, args.images, args.samples, args.channels, args.classes)
    base = child("baseline")
    got = child(str(run_dir), str(run_dir / "compare-bench.png"))
    parts = ", ".join(f"{name.strip('_')} {s:.1f} s" for name, s in got["parts_s"].items())
    print(f"{args.images} images x {args.samples} samples x {args.channels} channels, {args.classes} classes, "
          f"{len(LAYERS)} layers: compare {got['wall_s']:.1f} s wall, {got['cpu_s']:.1f} s CPU ({parts}); "
          f"peak RSS {got['maxrss_mib']:.0f} MiB (imports alone {base['maxrss_mib']:.0f} MiB); "
          f"k-NN {got['knn']}, recall {', '.join(f'{r:.3f}' for r in got['recall'])}; "
          f"shared neighbours {got['shared'][0][1]:.3f}")


if __name__ == "__main__":
    main()
