"""What storing activations as float16 (collect's default) costs the layout and the icons' targets.

Reads RUN/activations.h5 of a run collected with `collect.dtype = "float32"` and writes nothing.
For each layer, the same samples are taken as stored (float32) and cast to float16 and back, then:

- both are laid out (`atlas.layout.layout_2d`, the run's [layout] settings, the backend given),
  and both layouts' trustworthiness is measured against the float32 samples on the same rows,
  next to a float32 layout with another seed (the differences a layout makes by itself);
- the float32 layout is binned (`atlas.grid.bin_grids`) and each cell's direction (its members'
  mean activation, what render optimises icons towards) is computed from the float32 and from the
  float16 samples of the same members: their cosine bounds what float16 storage can change in an
  icon's objective.

    python -m atlas collect configs/demo.toml --set run_dir=/tmp/demo32 --set collect.dtype=float32 \\
        --set collect.attribution=false --set collect.predict=false      # same samples as the demo, float32
    python benchmarks/float16.py /tmp/demo32                             # torchdr
    python benchmarks/float16.py /tmp/demo32 --backend umap-learn --sizes 10 20 40
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a run directory collected with collect.dtype = \"float32\"")
    parser.add_argument("--backend", default="torchdr", choices=("umap-learn", "torchdr"))
    parser.add_argument("--layers", nargs="+", help="default: every layer of the run")
    parser.add_argument("--sizes", nargs="+", type=int, default=[10, 20], help="grid sizes (default 10 20)")
    args = parser.parse_args()

    from atlas.config import load_config
    from atlas.grid import bin_grids
    from atlas.layout import layout_2d, layout_options, pick_samples, trustworthiness_of
    from atlas.store import Activations

    config = load_config(args.run, warn=lambda _: None)
    options = {**layout_options(config.layout), "backend": args.backend, "device": "cpu"}
    print(f"float16 storage on {args.run} ({args.backend}): layout trustworthiness against the float32 samples, "
          f"and cosine of each cell's direction from float16 vs float32 samples of the same members", flush=True)
    rows = []
    with Activations(args.run / "activations.h5") as acts:
        for name in args.layers or config.layers:
            x32 = acts.layer(name).acts[()]
            if x32.dtype != np.float32:
                raise SystemExit(f"{name} is stored as {x32.dtype}; collect the run with collect.dtype = \"float32\"")
            x16 = x32.astype(np.float16).astype(np.float32)
            _, trust_idx = pick_samples(len(x32), options["fit_samples"], options["trust_samples"], options["seed"])
            trust = {}
            seed = options["seed"]
            for label, x, seed in (("float32", x32, seed), ("float16", x16, seed), ("float32, seed + 1", x32, seed + 1)):
                xy, info = layout_2d(x, **{**options, "seed": seed})
                trust[label] = trustworthiness_of(x32[trust_idx], xy[trust_idx], options["trust_neighbors"],
                                                  options["metric"])
                if label == "float32":
                    xy32 = xy
            relative = np.abs(x16 - x32).max() / np.abs(x32).max()
            for size, grid in bin_grids(xy32, x32, None, args.sizes, min_count=config.grid.min_count).items():
                d16 = bin_grids(xy32, x16, None, [size], min_count=config.grid.min_count)[size].direction
                d32 = grid.direction
                cosine = (d16 * d32).sum(1) / np.maximum(np.linalg.norm(d16, axis=1) * np.linalg.norm(d32, axis=1),
                                                         1e-30)
                rows.append((name, size, len(grid), trust["float32"], trust["float16"], trust["float32, seed + 1"],
                             1 - float(cosine.min()), 1 - float(np.median(cosine)), relative))
            print(f"  {name} done", flush=True)

    print()
    print(f"{'layer':<12} {'grid':>5} {'cells':>6} {'trust f32':>10} {'trust f16':>10} {'f16 - f32':>10} "
          f"{'seed+1 - f32':>13} {'1 - min cos':>12} {'1 - median cos':>15} {'max |err|/max':>14}")
    for name, size, cells, t32, t16, t_seed, low, mid, relative in rows:
        print(f"{name:<12} {size:>5} {cells:>6} {t32:>10.4f} {t16:>10.4f} {t16 - t32:>+10.4f} {t_seed - t32:>+13.4f} "
              f"{low:>12.1e} {mid:>15.1e} {relative:>14.1e}")
    print("(trustworthiness against the float32 samples on the same rows; seed+1: the float32 layout with another "
          "seed, for the size of the differences a layout makes by itself; cos: each cell's direction from "
          "float16 vs float32 samples of the same members of the float32 layout's cells)")


if __name__ == "__main__":
    main()
