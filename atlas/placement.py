"""Placing new samples on an existing layout: each goes to the weighted mean of its nearest fit samples.

A pure function over arrays, for any backend: the layout stage places the samples it did not fit
on (torchdr has no transform of its own that we could keep between runs), and the same call places
a user's new images' samples onto an atlas that is already made, from the fit samples' activations
and positions alone.

Method (umap-learn's `transform` uses the same as its starting point): the k nearest fit samples of
each new sample in the layout's metric, found exactly by blocked top-k on the chosen device; their
UMAP membership strengths exp(-d / sigma), with sigma set per sample so the strengths sum to
log2(k) (rho = 0, as in umap-learn's transform); the position is the strength-weighted mean of the
neighbours' positions, so it always lies in their convex hull.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .config import TORCHDR_METRICS as PLACE_METRICS  # one list, kept in config so configs are checked without torch

PLACE_BLOCK_BYTES = 1 << 28  # the (new, fit) score block computed at once, 256 MiB of float32 (64 MiB: 1.3x slower)
PLACE_QUERY_ROWS = 4096  # new samples per block; fixed, so blocks and results do not depend on the caller's
SIGMA_STEPS = 60  # bisection steps for each sample's bandwidth (float64: converged long before)


def metric_rows(x: np.ndarray | torch.Tensor, metric: str) -> torch.Tensor:
    """Rows in which squared euclidean distance ranks neighbours as `metric` does, as float32.

    cosine: rows scaled to unit length (|a - b|^2 = 2 (1 - cos)); correlation: rows centred, then
    scaled to unit length; euclidean: unchanged. A zero row stays zero (at distance 1 from every
    unit row, 0 from another zero row).
    """
    if metric not in PLACE_METRICS:
        raise ValueError(f"metric must be one of {', '.join(PLACE_METRICS)}, got {metric!r}")
    rows = torch.as_tensor(x).to(torch.float32)
    if metric == "correlation":
        rows = rows - rows.mean(dim=1, keepdim=True)
    if metric in ("cosine", "correlation"):
        rows = rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return rows


def nearest_rows(reference: torch.Tensor, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k reference rows nearest each query by squared euclidean distance, nearest first.

    Memory stays bounded: references are taken PLACE_BLOCK_BYTES of (query, reference) scores at
    a time and each block's k best merged into the running k best. The cost is one matrix product
    and one top-k per block: 2 C flops per (query, reference) pair, which is what placing many
    samples against many fit samples costs.

    Args:
        reference: (m, C) float32 tensor, m >= k.
        queries: (b, C) float32 tensor on the same device.
        k: neighbours per query, 1 <= k <= m.

    Returns:
        (b, k) float32 squared distances (>= 0) and (b, k) int64 reference rows.
    """
    if not 1 <= k <= len(reference):
        raise ValueError(f"k must be in [1, {len(reference)}], got {k}")
    ref_sq = (reference * reference).sum(dim=1)
    step = max(k, PLACE_BLOCK_BYTES // (4 * max(1, len(queries))))
    best_score = best_i = None
    for start in range(0, len(reference), step):
        chunk = reference[start:start + step]
        # |q - r|^2 = |q|^2 - (2 q.r - |r|^2): the larger the score, the nearer; |q|^2 is added after the search
        score = torch.addmm(-ref_sq[start:start + step].unsqueeze(0), queries, chunk.T, alpha=2)
        value, i = torch.topk(score, min(k, len(chunk)), dim=1)
        i += start
        if best_score is not None:
            value, order = torch.topk(torch.cat([best_score, value], dim=1), k, dim=1)
            i = torch.gather(torch.cat([best_i, i], dim=1), 1, order)
        best_score, best_i = value, i
    return ((queries * queries).sum(dim=1, keepdim=True) - best_score).clamp_min(0), best_i


def membership_weights(dist: torch.Tensor) -> torch.Tensor:
    """UMAP's membership strengths exp(-d / sigma) of each row's neighbours, summing to log2(k) per row.

    sigma is found per row by bisection (rho = 0, as umap-learn's transform uses). Distances of
    exactly 0 weigh 1 whatever sigma is: a row with log2(k) or more exact matches keeps only them.

    Args:
        dist: (b, k) non-negative distances, k >= 1.

    Returns:
        (b, k) float64 weights; k = 1 or 2 rows without spread get equal weights.
    """
    d = dist.to(torch.float64)
    k = d.shape[1]
    target = math.log2(k)
    if k < 2:
        return torch.ones_like(d)
    # at sigma = hi every weight is >= exp(-ln(k / target)) = target / k, so the sum is >= target
    hi = d.amax(dim=1).clamp_min(1e-12) / math.log(k / target)
    lo = torch.zeros_like(hi)
    for _ in range(SIGMA_STEPS):
        mid = (lo + hi) / 2
        total = torch.exp(-d / mid.clamp_min(1e-300).unsqueeze(1)).sum(dim=1)
        too_wide = total > target
        hi = torch.where(too_wide, mid, hi)
        lo = torch.where(too_wide, lo, mid)
    return torch.exp(-d / hi.clamp_min(1e-300).unsqueeze(1))


def place_samples(fit_acts: np.ndarray, fit_xy: np.ndarray, new_acts: np.ndarray, *, n_neighbors: int = 20,
                  metric: str = "cosine", device: str | torch.device = "cpu") -> np.ndarray:
    """Positions for new samples on a layout, from the layout's fit samples and their positions.

    Each new sample goes to the membership-weighted mean (`membership_weights`) of the positions
    of its `n_neighbors` nearest fit samples in `metric` (`nearest_rows`), computed on `device`
    PLACE_QUERY_ROWS new samples at a time. Same input, same output (on the CPU).

    Args:
        fit_acts: (m, C) float array, the samples the layout was fitted on (as the layout saw
            them: after its PCA, if any).
        fit_xy: (m, d) float positions of the fit samples (raw or normalised; the mean of
            positions commutes with any affine map, so either gives the matching result).
        new_acts: (n, C) float array, the samples to place.
        n_neighbors: fit samples averaged per new sample; lowered to m when m is smaller.
        metric: "cosine", "correlation" or "euclidean" (the layout's metric).
        device: where the distances are computed ("cpu", "cuda", "cuda:N" or a torch.device).

    Returns:
        (n, d) float32 positions.
    """
    fit_xy = np.asarray(fit_xy)
    if len(fit_acts) != len(fit_xy) or len(fit_acts) == 0:
        raise ValueError(f"fit_acts has {len(fit_acts)} rows and fit_xy {len(fit_xy)}; need the same, at least one")
    if np.shape(new_acts)[1:] != np.shape(fit_acts)[1:]:
        raise ValueError(f"new_acts has {np.shape(new_acts)[1:]} columns, fit_acts {np.shape(fit_acts)[1:]}")
    if n_neighbors < 1:
        raise ValueError(f"n_neighbors must be >= 1, got {n_neighbors}")
    device = torch.device(device)
    k = min(n_neighbors, len(fit_acts))
    reference = metric_rows(np.asarray(fit_acts), metric).to(device)
    positions = torch.as_tensor(fit_xy, dtype=torch.float64, device=device)
    out = np.empty((len(new_acts), fit_xy.shape[1]), np.float32)
    with torch.no_grad():
        for start in range(0, len(new_acts), PLACE_QUERY_ROWS):
            queries = metric_rows(np.asarray(new_acts[start:start + PLACE_QUERY_ROWS]), metric).to(device)
            d2, idx = nearest_rows(reference, queries, k)
            # cosine and correlation: 1 - cos = |a - b|^2 / 2 on unit rows; euclidean: |a - b|
            dist = d2 / 2 if metric in ("cosine", "correlation") else d2.sqrt()
            weights = membership_weights(dist)
            mean = (weights.unsqueeze(2) * positions[idx]).sum(dim=1) / weights.sum(dim=1, keepdim=True)
            out[start:start + len(queries)] = mean.cpu().numpy()
    return out
