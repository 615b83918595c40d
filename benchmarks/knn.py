"""Compare's image neighbours: exact blocked k-NN against nearest-neighbour descent, side by side.

Reads and writes nothing. For each n, on n synthetic image embeddings (unit rows of C channels,
ReLU of a low-rank signal plus noise, as mean activations look; `--data iid` for isotropic
noise, the hardest case for the descent), prints one row:

- `exact s`: `atlas.neighbors.nearest_neighbors` (numpy matmul + argpartition, a block of rows at a
  time), up to `--exact-max`;
- `torch s`: the same blocks with torch's matmul and top-k (the alternative compare does not use:
  see README), up to `--torch-max`, and whether it found the same neighbours (the first such row
  includes importing torch, as compare would have to);
- `descent s`: `atlas.neighbors.approximate_neighbors` (pynndescent, seeded, single-threaded),
  warm: its one-time numba JIT is measured once, in this process, as first call minus second call on
  2,000 rows, and printed above the table;
- `recall`: the share of the exact neighbours the descent found, against the full exact k-NN when
  it was run (n <= `--exact-max`), and `estimate` the one compare records (1,000 sampled rows).

Times are wall-clock and CPU time of this process; on a shared machine compare them within a row.

    python benchmarks/knn.py                               # n = 10k, 20k, 40k, 80k, K = 10
    python benchmarks/knn.py --n 160000 320000 --exact-max 160000 --torch-max 0
    python benchmarks/knn.py --n 20000 --data iid --k 10 30
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from atlas.neighbors import (RECALL_ROWS, approximate_neighbors, nearest_neighbors, neighbor_recall,
                             unit_rows)


def embeddings(n: int, channels: int, kind: str, seed: int = 0) -> np.ndarray:
    """(n, channels) float32 unit rows: ReLU(z W + noise) with z of 32 dims ("lowrank"), or |noise| ("iid")."""
    rng = np.random.default_rng(seed)
    x = np.empty((n, channels), np.float32)
    w = rng.standard_normal((32, channels)).astype(np.float32)
    for a in range(0, n, 65_536):
        m = min(65_536, n - a)
        noise = rng.standard_normal((m, channels)).astype(np.float32)
        x[a:a + m] = np.abs(noise) if kind == "iid" else np.maximum(
            rng.standard_normal((m, 32)).astype(np.float32) @ w + 0.5 * noise, 0)
    return unit_rows(x)


def torch_topk(x: np.ndarray, k: int) -> np.ndarray:
    """The exact k-NN with torch: matmul and top-k over 64 MiB blocks of similarities."""
    import torch

    u = torch.from_numpy(x)
    n = len(u)
    out = torch.empty((n, k), dtype=torch.int64)
    rows = max(1, (1 << 26) // (4 * n))
    for a in range(0, n, rows):
        sim = u[a:a + rows] @ u.T
        b = a + len(sim)
        sim[torch.arange(b - a), torch.arange(a, b)] = -torch.inf
        out[a:b] = sim.topk(k, dim=1, sorted=False).indices
    return out.numpy()


def overlap(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over rows of |a_i ∩ b_i| / k."""
    hits = 0
    for s in range(0, len(a), 65_536):
        hits += int((a[s:s + 65_536, :, None] == b[s:s + 65_536, None, :]).any(axis=2).sum())
    return hits / a.size


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[10_000, 20_000, 40_000, 80_000])
    parser.add_argument("--k", type=int, nargs="+", default=[10])
    parser.add_argument("--channels", type=int, default=112)
    parser.add_argument("--data", choices=("lowrank", "iid"), default="lowrank")
    parser.add_argument("--exact-max", type=int, default=80_000, help="largest n to run the exact k-NN at")
    parser.add_argument("--torch-max", type=int, default=40_000, help="largest n to run torch's exact k-NN at")
    args = parser.parse_args()

    warm = embeddings(2000, args.channels, args.data, seed=1)
    _, first, _ = timed(lambda: approximate_neighbors(warm, 10))
    _, second, _ = timed(lambda: approximate_neighbors(warm, 10))
    print(f"nn-descent one-time JIT: {first - second:.1f} s (first call {first:.1f} s, second {second:.2f} s)")
    print(f"{'n':>9} {'K':>3}  {'exact s':>13}  {'torch s':>18}  {'descent s':>13}  {'recall':>6}  {'estimate':>8}")
    for n in args.n:
        x = embeddings(n, args.channels, args.data)
        for k in args.k:
            exact, e_wall, e_cpu = timed(lambda: nearest_neighbors(x, k)) if n <= args.exact_max else (None, 0, 0)
            other = ""
            if n <= args.torch_max:
                found, t_wall, t_cpu = timed(lambda: torch_topk(x, k))
                same = "same" if exact is not None and overlap(found, exact) == 1.0 else "diff"
                other = f"{t_wall:6.1f}/{t_cpu:6.1f} {same}"
            approx, a_wall, a_cpu = timed(lambda: approximate_neighbors(x, k))
            estimate, _ = neighbor_recall(x, approx, RECALL_ROWS)
            full = f"{overlap(approx, exact):.4f}" if exact is not None else "-"
            shown = f"{e_wall:6.1f}/{e_cpu:6.1f}" if exact is not None else "-"
            print(f"{n:>9} {k:>3}  {shown:>13}  {other:>18}  {a_wall:6.1f}/{a_cpu:6.1f}  {full:>6}  {estimate:8.4f}",
                  flush=True)
    print("times are wall / CPU seconds of this process")


if __name__ == "__main__":
    main()
