"""The two UMAP implementations the layout stage can use: umap-learn (numba, CPU) and TorchDR (PyTorch, CPU or GPU).

umap-learn is the reference; TorchDR's UMAP is given the same neighbourhood size, minimum
distance, metric and number of epochs. Both are seeded, so the same input gives the same layout
(TorchDR: on the CPU; a GPU's reductions may differ in the last bits between runs).
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from .errors import AtlasError
from .placement import metric_rows

# TorchDR sums each epoch's gradients and applies them at once, where umap-learn moves the points
# edge by edge; with umap-learn's 5 negative samples per edge its layouts of the demo's layers were
# 0.02-0.03 less trustworthy than umap-learn's, with 10 they were as trustworthy (README, Speed).
TORCHDR_NEGATIVE_SAMPLE_RATE = 10


def umap_epochs(n_fit: int) -> int:
    """umap-learn's default number of optimisation epochs: 500 up to 10,000 samples, else 200."""
    return 500 if n_fit <= 10_000 else 200


def backend_version(backend: str) -> str:
    """The installed version of the package behind a layout backend."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(backend)
    except PackageNotFoundError:
        return ""


def make_umap_learn(n_neighbors: int, min_dist: float, metric: str, seed: int, approximate: bool, dims: int = 2):
    """umap-learn's estimator with the stage's parameters (fit with `fit_transform`, place with `transform`)."""
    import umap

    # random_state makes UMAP single-threaded; that is the price of a reproducible layout
    return umap.UMAP(n_components=dims, n_neighbors=n_neighbors, min_dist=min_dist, metric=metric,
                     random_state=seed, transform_seed=seed, n_jobs=1, force_approximation_algorithm=approximate)


def fit_torchdr(x: np.ndarray, *, n_neighbors: int, min_dist: float, metric: str, seed: int, dims: int,
                device: torch.device) -> tuple[np.ndarray, dict[str, Any]]:
    """Fits TorchDR's UMAP to x and returns its embedding.

    Neighbours are exact (FAISS's flat index, in bounded memory); cosine and correlation are
    squared euclidean distance between unit (centred) rows, which ranks neighbours the same and,
    after UMAP's per-sample bandwidth, gives the same graph. Distinct rows fewer than
    n_neighbors + 2 lower n_neighbors to their number - 2 (TorchDR lays out distinct rows only and
    takes at most that many neighbours).

    Args:
        x: (m, C) float32 samples with at least 4 distinct rows.
        n_neighbors: UMAP's neighbourhood size, including the sample itself, as umap-learn counts.
        min_dist: UMAP's minimum distance.
        metric: one of config.TORCHDR_METRICS (LayoutConfig checks it).
        seed: seeds the initialisation and negative sampling.
        dims: output dimensions.
        device: where TorchDR computes.

    Returns:
        (m, dims) float32 embedding, and info: `n_neighbors` (as used), `epochs`,
        `negative_sample_rate`.
    """
    torchdr = import_torchdr()
    rows = metric_rows(x, metric)
    distinct = len(torch.unique(rows, dim=0))
    k = min(n_neighbors, distinct - 2)  # TorchDR takes 2 <= k <= distinct - 2
    if k < 2:
        raise AtlasError(f"only {distinct} distinct activation vectors among {len(x)} samples, too few for a layout")
    epochs = umap_epochs(len(x))
    with global_random_state_kept():  # TorchDR seeds Python's, NumPy's and torch's global generators
        reducer = torchdr.UMAP(n_components=dims, n_neighbors=k, min_dist=min_dist, max_iter=epochs,
                               negative_sample_rate=TORCHDR_NEGATIVE_SAMPLE_RATE,
                               metric="euclidean" if metric == "euclidean" else "sqeuclidean",
                               device=str(device), backend="faiss", random_state=seed, distributed=False,
                               verbose=False)
        embedding = reducer.fit_transform(rows.to(device))
    out = embedding.detach().cpu().numpy().astype(np.float32)
    return out, {"n_neighbors": k, "epochs": epochs, "negative_sample_rate": TORCHDR_NEGATIVE_SAMPLE_RATE}


def import_torchdr():
    """The torchdr module, or an AtlasError saying how to install it."""
    try:
        import torchdr
    except ImportError as exc:
        raise AtlasError(f"layout.backend = \"torchdr\" needs the torchdr package ({exc}); "
                         "pip install torchdr faiss-cpu matplotlib, or use layout.backend = \"umap-learn\"") from None
    return torchdr


@contextlib.contextmanager
def global_random_state_kept() -> Iterator[None]:
    """Puts back what TorchDR's seeding changes: the global Python, NumPy and torch (CPU and CUDA)
    generators, PYTHONHASHSEED and cuDNN's benchmark/deterministic flags."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    hash_seed = os.environ.get("PYTHONHASHSEED")
    cudnn = torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        if hash_seed is None:
            os.environ.pop("PYTHONHASHSEED", None)
        else:
            os.environ["PYTHONHASHSEED"] = hash_seed
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = cudnn
