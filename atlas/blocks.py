"""Reading large (n, C) arrays in float32 blocks, so memory stays bounded whatever n is.

Every function takes a numpy array or an h5py dataset (activations.h5 keeps the samples as
chunked float16 or float32 datasets that can be larger than memory).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

BLOCK_BYTES = 1 << 26  # rows are read and converted to float32 64 MiB at a time


def block_rows(n_columns: int) -> int:
    """Rows per block so that one float32 block takes about BLOCK_BYTES."""
    return max(1, BLOCK_BYTES // (4 * max(1, n_columns)))


def iter_blocks(values: Any, rows: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """Yields (start, float32 block) over the rows of an (n, C) array or h5py dataset."""
    n = len(values)
    rows = rows or block_rows(values.shape[1] if len(values.shape) > 1 else 1)
    for start in range(0, n, rows):
        yield start, np.asarray(values[start:start + rows], dtype=np.float32)


def take_rows(values: Any, idx: np.ndarray) -> np.ndarray:
    """The rows `idx` (sorted) of an array or h5py dataset as float32, read a block at a time."""
    if isinstance(values, np.ndarray):
        return np.asarray(values[idx], dtype=np.float32)
    out = np.empty((len(idx), values.shape[1]), np.float32)
    rows = block_rows(values.shape[1])
    pos = 0
    while pos < len(idx):  # h5py reads a contiguous slice much faster than a point selection
        start = int(idx[pos])
        stop = min(start + rows, int(idx[-1]) + 1)
        end = int(np.searchsorted(idx, stop))
        out[pos:end] = np.asarray(values[start:stop], dtype=np.float32)[idx[pos:end] - start]
        pos = end
    return out


def iter_selected(values: Any, mask: np.ndarray, chunk: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yields (row indices, float32 rows) of the rows where `mask` is set, exactly `chunk` at a time.

    Chunks do not depend on how the rows are read, so the results of per-chunk work (UMAP's
    transform) are reproducible.
    """
    wanted = np.flatnonzero(mask)
    for a in range(0, len(wanted), chunk):
        idx = wanted[a:a + chunk]
        yield idx, take_rows(values, idx)


def scan_rows(values: Any, picks: Sequence[np.ndarray]) -> tuple[list[np.ndarray], int, int]:
    """Reads the rows of several sorted index arrays in one pass and counts non-finite rows.

    Args:
        values: (n, C) array or h5py dataset.
        picks: sorted int64 index arrays into the rows.

    Returns:
        (one float32 (len(pick), C) array per pick, number of rows with NaN or inf, first such row
        or -1).
    """
    c = values.shape[1]
    out = [np.empty((len(p), c), np.float32) for p in picks]
    n_bad, first_bad = 0, -1
    for start, block in iter_blocks(values):
        bad = ~np.isfinite(block).all(axis=1)
        if bad.any():
            if first_bad < 0:
                first_bad = start + int(np.argmax(bad))
            n_bad += int(bad.sum())
        stop = start + len(block)
        for dest, pick in zip(out, picks):
            a, b = np.searchsorted(pick, [start, stop])
            dest[a:b] = block[pick[a:b] - start]
    return out, n_bad, first_bad


def sum_by_cell(values: Any, slots: Sequence[np.ndarray], n_cells: Sequence[int]) -> list[np.ndarray]:
    """Sums the rows of `values` per cell for several assignments, in one pass over the rows.

    Args:
        values: (n, C) array or h5py dataset.
        slots: per assignment, (n,) int64 cell of each row, -1 for rows in no cell.
        n_cells: per assignment, the number of cells.

    Returns:
        per assignment, (cells, C) float64 sums. Each block's rows are sorted by cell and reduced
        with `np.add.reduceat`, so the cost is a sort and a sum per block whatever the cell count.
    """
    width = values.shape[1]
    sums = [np.zeros((m, width)) for m in n_cells]
    for start, block in iter_blocks(values):
        for slot, total in zip(slots, sums):
            cells = slot[start:start + len(block)]
            rows = np.flatnonzero(cells >= 0)
            if len(rows) == 0:
                continue
            rows = rows[np.argsort(cells[rows], kind="stable")]
            sorted_cells = cells[rows]
            starts = np.flatnonzero(np.r_[True, sorted_cells[1:] != sorted_cells[:-1]])
            total[sorted_cells[starts]] += np.add.reduceat(block[rows].astype(np.float64), starts, axis=0)
    return sums
