"""``mmlearn prepare <dataset>``: put a dataset's files where its DataModule reads them."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from mmlearn.data.av_clips import prepare_av_clips
from mmlearn.data.avmnist import prepare_avmnist
from mmlearn.data.fashion import prepare_fashion_mnist
from mmlearn.data.mfeat import prepare_mfeat
from mmlearn.data.paths import default_root

PREPARERS = {
    "mfeat": prepare_mfeat,
    "fashion-mnist": prepare_fashion_mnist,
    "avmnist": prepare_avmnist,
    # decode the clips once into the memory-mapped cache (root/<name>/cache)
    "crema-d": lambda root, source: prepare_av_clips(root, "crema-d"),
    "kinetics-sounds": lambda root, source: prepare_av_clips(root, "kinetics-sounds"),
}


def prepare_main(argv: Sequence[str]) -> int:
    """Run ``mmlearn prepare`` on ``argv`` (the arguments after ``prepare``).

    Args:
        argv: ``<dataset> [--root DIR] [--source PATH]``.

    Returns:
        The exit status (0).
    """
    parser = argparse.ArgumentParser(prog="mmlearn prepare", description=__doc__)
    parser.add_argument("dataset", choices=sorted(PREPARERS))
    parser.add_argument(
        "--root", default=None, help="data directory (default: $MMLEARN_DATA, else ./data)"
    )
    parser.add_argument("--source", default=None, help="local archive or folder to read instead")
    args = parser.parse_args(list(argv))
    out = PREPARERS[args.dataset](default_root(args.root), args.source)
    print(f"prepared {args.dataset} in {out}")
    return 0
