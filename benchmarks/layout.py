"""Layout stage against umap-learn's own fit on the same array, side by side in one run.

Reads and writes only a temporary run directory. Prints one table:

- `umap fit_transform`: bare `umap.UMAP(...).fit_transform` on the float32 array in memory, with
  the parameters the stage uses (n_neighbors, min_dist, metric, random_state, n_jobs=1);
- `atlas layout`: the whole stage (`atlas.layout.run`) on the same samples stored as float16 in
  activations.h5, as collect writes them: reading, checks, UMAP, normalising, trustworthiness,
  writing layout.h5;
- `atlas layout, PCA`: the same with `layout.pca_dims`;
- `atlas layout, fit subsample`: UMAP fitted on a quarter of the samples, the rest placed with
  `transform` (the path for runs too large to fit whole).

Times are wall-clock and this process's CPU time; the ratio is taken on CPU time, which other
work on a shared machine disturbs much less. The one-time JIT cost (numba compiles umap-learn and
pynndescent on first use in every process, partly cached on disk) is measured separately in a
fresh process as first call minus second call, and the main process is warmed up before anything
is timed. The toy activations.h5 is written with `tests/toy_runs.py`, in collect's format.

    python benchmarks/layout.py                # 50,000 x 128 (about 8 minutes on 2 cores)
    python benchmarks/layout.py --n 100000     # 100,000 x 128
    python benchmarks/layout.py --small        # 8,000 x 64, a quick check
    python benchmarks/layout.py --repeats 2    # bare fit and stage twice each, alternating
"""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from toy_runs import toy_config, write_activations  # noqa: E402

from atlas.config import LayoutConfig  # noqa: E402
from atlas.layout import normalize_layout, run, trustworthiness_of  # noqa: E402
from atlas.store import Layout, Run  # noqa: E402

JIT_PROBE = textwrap.dedent("""
    import time, warnings
    warnings.filterwarnings("ignore")
    t = time.perf_counter(); import umap, numpy as np; t_import = time.perf_counter() - t
    rng = np.random.default_rng(0)
    def timed(fn):
        t = time.perf_counter(); fn(); return time.perf_counter() - t
    def fit(n):
        x = np.abs(rng.normal(size=(n, {c}))).astype(np.float32)
        return umap.UMAP(n_neighbors={k}, min_dist={d}, metric="{m}", random_state=0, n_jobs=1).fit(x)
    small = [timed(lambda: fit(500)) for _ in range(2)]
    model = None
    def big():
        global model
        model = fit(5000)
    large = [timed(big) for _ in range(2)]
    extra = np.abs(rng.normal(size=(2000, {c}))).astype(np.float32)
    transform = [timed(lambda: model.transform(extra)) for _ in range(2)]
    print(t_import, *small, *large, *transform)
""")


def synthetic_activations(n: int, channels: int, clusters: int, seed: int) -> np.ndarray:
    """A stand-in for a conv layer's samples: sparse non-negative (ReLU) clusters along curves."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, channels))
    drift = rng.normal(size=(clusters, channels))
    which = rng.integers(0, clusters, n)
    t = rng.random((n, 1)) * 2 - 1
    x = centres[which] + t * drift[which] + rng.normal(size=(n, channels))
    return np.maximum(x, 0).astype(np.float32)


def measure_jit(channels: int, cfg: LayoutConfig) -> list[float]:
    code = JIT_PROBE.format(c=channels, k=cfg.n_neighbors, d=cfg.min_dist, m=cfg.metric)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return [float(v) for v in out.stdout.split()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=50_000, help="samples (default 50,000)")
    parser.add_argument("--channels", type=int, default=128, help="channels C (default 128)")
    parser.add_argument("--small", action="store_true", help="8,000 x 64: a quick check")
    parser.add_argument("--pca-dims", type=int, default=50, help="PCA dimensions of the PCA row (default 50, as Lucid)")
    parser.add_argument("--no-jit", action="store_true", help="skip the fresh-process JIT measurement")
    parser.add_argument("--repeats", type=int, default=1,
                        help="time the bare fit and the plain stage this many times each, alternating, "
                             "and keep the fastest (default 1)")
    args = parser.parse_args()
    n, channels = (8_000, 64) if args.small else (args.n, args.channels)
    cfg = LayoutConfig()  # the stage's defaults: n_neighbors 20, min_dist 0.01, cosine, seed 0
    print(f"layout benchmark: {n} x {channels} synthetic float16 activations; n_neighbors {cfg.n_neighbors}, "
          f"min_dist {cfg.min_dist}, metric {cfg.metric}, seed {cfg.seed}, trustworthiness on "
          f"{cfg.trust_samples} samples (k={cfg.trust_neighbors})", flush=True)

    if not args.no_jit:
        t_import, small1, small2, large1, large2, tr1, tr2 = measure_jit(channels, cfg)
        print(f"one-time JIT in a fresh process: import umap {t_import:.1f} s; first fit of 500 samples "
              f"{small1:.1f} s vs {small2:.2f} s warm; first fit of 5,000 (nearest-neighbour descent) "
              f"{large1:.1f} s vs {large2:.1f} s warm; first transform {tr1:.1f} s vs {tr2:.1f} s warm", flush=True)

    acts16 = synthetic_activations(n, channels, 40, seed=1).astype(np.float16)
    x = acts16.astype(np.float32)  # the bare fit gets exactly the values the stage reads
    import umap

    warm = synthetic_activations(5000, channels, 10, seed=2)  # compile both UMAP paths before timing
    umap.UMAP(n_neighbors=cfg.n_neighbors, random_state=0, n_jobs=1, metric=cfg.metric).fit(warm).transform(warm[:500])

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp)
        write_activations(run_dir, {"layer": acts16})
        trust_idx = np.sort(np.random.default_rng([cfg.seed, 1]).choice(n, min(n, cfg.trust_samples), replace=False))

        def bare_fit() -> tuple[tuple[float, float], np.ndarray]:
            t0, c0 = time.perf_counter(), time.process_time()
            out = umap.UMAP(n_components=2, n_neighbors=cfg.n_neighbors, min_dist=cfg.min_dist, metric=cfg.metric,
                            random_state=cfg.seed, n_jobs=1).fit_transform(x)
            return (time.perf_counter() - t0, time.process_time() - c0), out

        def stage(layout_cfg: LayoutConfig) -> tuple[tuple[float, float], Layout]:
            config = dataclasses.replace(toy_config(run_dir, layers=("layer",)), layout=layout_cfg)
            t0, c0 = time.perf_counter(), time.process_time()
            run(config, force=True, log=lambda _: None)
            return (time.perf_counter() - t0, time.process_time() - c0), Run(run_dir, config).layout()

        bare_times, stage_times = [], []
        for _ in range(max(1, args.repeats)):  # alternate, so drifting load on a shared machine hits both
            t_bare, bare = bare_fit()
            bare_times.append(t_bare)
            t_stage, ours = stage(cfg)
            stage_times.append(t_stage)
        t_bare = min(bare_times, key=lambda t: t[1])
        trust_bare = trustworthiness_of(x[trust_idx], normalize_layout(bare)[trust_idx], cfg.trust_neighbors,
                                        cfg.metric)
        layer = ours.maps["layer"]
        same = np.array_equal(layer.xy, normalize_layout(bare, cfg.clip_percentile, cfg.margin))
        rows.append(("umap fit_transform", n, t_bare, trust_bare))
        rows.append(("atlas layout", layer.info["n_fit"], min(stage_times, key=lambda t: t[1]),
                     layer.info["trustworthiness"]))
        variants = [(f"atlas layout, PCA to {args.pca_dims}", dataclasses.replace(cfg, pca_dims=args.pca_dims)),
                    ("atlas layout, fit subsample", dataclasses.replace(cfg, fit_samples=n // 4))]
        for name, layout_cfg in variants:
            seconds, result = stage(layout_cfg)
            info = result.maps["layer"].info
            rows.append((name, info["n_fit"], seconds, info["trustworthiness"]))

    print()
    print(f"{'variant':<32} {'fitted on':>10} {'wall s':>8} {'CPU s':>8} {'CPU vs bare':>12} {'trustworthiness':>16}")
    for name, n_fit, (wall, cpu), trust in rows:
        print(f"{name:<32} {n_fit:>10} {wall:>8.1f} {cpu:>8.1f} {cpu / t_bare[1]:>12.3f} {trust:>16.3f}")
    print("(CPU s: this process's CPU time, the fairer measure on a shared machine; the fastest of --repeats)")
    print("(bare trustworthiness: umap's embedding after the same normalisation, on the same samples)")
    print(f"atlas layout's positions {'equal' if same else 'DIFFER from'} the normalised bare embedding")


if __name__ == "__main__":
    main()
