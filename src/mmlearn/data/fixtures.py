"""Miniature copies of each supported on-disk layout, for tests, examples and benchmarks.

Every writer produces the exact files and formats a real dataset of that family has, with few
samples and a learnable signal (each modality carries part of the label), and returns the path to
pass to the DataModule.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

TABLE_CLASSES = ("cat", "dog", "eel")


def table_rows(n: int = 240, seed: int = 0) -> tuple[list[str], list[list[object]]]:
    """Header and ``n`` rows: id, split, species (the label), clin_0..3, gene_0..2."""
    rng = np.random.default_rng(seed)
    header = [
        "id",
        "split",
        "species",
        *[f"clin_{j}" for j in range(4)],
        *[f"gene_{j}" for j in range(3)],
    ]
    rows: list[list[object]] = []
    for i in range(n):
        y = int(rng.integers(len(TABLE_CLASSES)))
        clin = rng.normal(size=4) + np.eye(4)[y] * 2.0
        gene = rng.normal(size=3) * 0.5 + np.eye(3)[y] * 1.5
        split = "train" if i % 10 < 7 else ("val" if i % 10 < 8 else "test")
        rows.append([f"s{i}", split, TABLE_CLASSES[y], *clin.round(5), *gene.round(5)])
    return header, rows


def write_table(path: str | Path, n: int = 240, seed: int = 0) -> Path:
    """Write :func:`table_rows` as CSV (``.csv``), Parquet (``.parquet``) or NPZ (``.npz``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header, rows = table_rows(n, seed)
    columns = {h: [r[j] for r in rows] for j, h in enumerate(header)}
    if path.suffix == ".csv":
        with open(path, "w", newline="") as f:
            csv.writer(f).writerows([header, *rows])
    elif path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table(columns), path)
    elif path.suffix == ".npz":
        arrays = {
            k: np.asarray(v) for k, v in columns.items() if not k.startswith(("clin", "gene"))
        }
        arrays["clin"] = np.asarray([r[3:7] for r in rows], dtype=np.float64)  # 2-D: clin_0..3
        arrays["gene"] = np.asarray([r[7:10] for r in rows], dtype=np.float64)
        np.savez(str(path), **arrays)  # type: ignore[arg-type]
    else:
        raise ValueError(f"{path}: choose .csv, .parquet or .npz")
    return path
