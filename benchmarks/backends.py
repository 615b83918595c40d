"""Layout backends on a run's real samples: umap-learn against torchdr (CPU), each in a fresh process.

Reads RUN/activations.h5 (read-only) and writes nothing. Each backend lays out the run's layers one
after another in its own fresh Python process, as `atlas layout` would (`atlas.layout.layout_2d`
with the run's [layout] settings: n_neighbors, min_dist, metric, fit_samples, seed, 2,000 trust
samples), so umap-learn's numba JIT, paid on first use in every process, lands in its first layer,
as it does for a user. umap-learn then lays out the first layer again, warm: the difference is
its JIT. torchdr is given umap-learn's n_neighbors, min_dist, metric and epochs. Both measure
trustworthiness on the same rows (`layout.pick_samples`).

Prints per layer and backend: wall seconds, CPU seconds of the process (all threads), and
trustworthiness, and each backend's whole process (imports included). The backends run
alternately, `--repeats` times each, and the fastest run by CPU time is shown, because these
machines are shared and noisy.

    python benchmarks/backends.py /work/runs/new-demo                 # the demo's three layers
    python benchmarks/backends.py RUN --layers blocks.10 --repeats 2
    python benchmarks/backends.py RUN --set n_neighbors=50 --set min_dist=0.05
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path



def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def lay_out_layers(run: Path, layers: list[str], backend: str, options: dict) -> dict:
    """The child: lays out each layer in this (fresh) process and returns the figures; `wall` and
    `cpu` cover the imports and every layer (not umap-learn's warm repeat)."""
    t_start, c_start = time.perf_counter(), cpu_seconds()
    from atlas.layout import layout_2d
    from atlas.store import Activations

    def lay_out(name: str) -> dict:
        t, c = time.perf_counter(), cpu_seconds()
        _, info = layout_2d(acts.layer(name).acts, **options, backend=backend, device="cpu")
        return {"layer": name, "wall": time.perf_counter() - t, "cpu": cpu_seconds() - c,
                "trust": info["trustworthiness"], "n": info["n_samples"], "epochs": info["epochs"]}

    with Activations(run / "activations.h5") as acts:
        rows = [lay_out(name) for name in layers]
        total = {"wall": time.perf_counter() - t_start, "cpu": cpu_seconds() - c_start}
        warm = lay_out(layers[0]) if backend == "umap-learn" else None  # the first layer again, JIT done
    return {"rows": rows, "warm": warm, **total}


def run_child(run: Path, layers: list[str], backend: str, options: dict) -> dict:
    args = [sys.executable, __file__, str(run), "--child", backend, "--layers", *layers,
            "--options", json.dumps(options)]
    out = subprocess.run(args, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"{backend} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a run directory with activations.h5")
    parser.add_argument("--layers", nargs="+", help="layers to lay out (default: every layer of the run)")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each backend, alternating (default 1)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a layout_2d option instead of the run's [layout] value, e.g. n_neighbors=50")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--options", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(lay_out_layers(args.run, args.layers, args.child, json.loads(args.options))))
        return

    from atlas.config import load_config
    from atlas.layout import layout_options

    config = load_config(args.run, warn=lambda _: None)
    options = {k: v for k, v in layout_options(config.layout).items() if k not in ("backend", "device")}
    for item in args.set:
        key, value = item.split("=", 1)
        options[key] = json.loads(value)
    layers = args.layers or list(config.layers)
    print(f"layout backends on {args.run}: layers {', '.join(layers)}; "
          + ", ".join(f"{k} {v}" for k, v in options.items()), flush=True)
    results: dict[str, list[dict]] = {"umap-learn": [], "torchdr": []}
    for _ in range(max(1, args.repeats)):
        for backend in results:
            results[backend].append(run_child(args.run, layers, backend, options))
            print(f"  {backend}: {results[backend][-1]['wall']:.1f} s", flush=True)

    print()
    print(f"{'layer':<12} {'backend':<11} {'samples':>8} {'epochs':>6} {'wall s':>8} {'CPU s':>8} {'trustworthiness':>16}")
    best = {b: min(r, key=lambda x: x["cpu"]) for b, r in results.items()}
    for i, name in enumerate(layers):
        for backend, result in best.items():
            row = result["rows"][i]
            note = " (incl. JIT)" if backend == "umap-learn" and i == 0 else ""
            print(f"{name:<12} {backend:<11} {row['n']:>8} {row['epochs']:>6} {row['wall']:>8.1f} {row['cpu']:>8.1f} "
                  f"{row['trust']:>16.3f}{note}")
        diff = best["torchdr"]["rows"][i]["trust"] - best["umap-learn"]["rows"][i]["trust"]
        print(f"{'':<12} {'difference':<11} {'':>8} {'':>6} {'':>8} {'':>8} {diff:>+16.3f}")
    warm, first = best["umap-learn"]["warm"], best["umap-learn"]["rows"][0]
    print(f"umap-learn {layers[0]} again, warm: {warm['wall']:.1f} s wall, {warm['cpu']:.1f} s CPU; so its JIT "
          f"costs about {first['cpu'] - warm['cpu']:.1f} s CPU")
    for backend, result in best.items():
        print(f"{backend} process, {len(layers)} layer(s) from `import atlas.layout`: {result['wall']:.1f} s wall, "
              f"{result['cpu']:.1f} s CPU")
    print("(fastest of --repeats by CPU time; CPU s counts every thread: umap-learn seeded runs on one, "
          "torchdr on all cores)")
    print("(trustworthiness on the same rows for both: layout.pick_samples(n, fit_samples, trust_samples, seed))")


if __name__ == "__main__":
    main()
