"""``mmlearn prepare <dataset>``: put a dataset's files where its DataModule reads them."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from mmlearn.data.av_clips import prepare_av_clips
from mmlearn.data.avmnist import prepare_avmnist
from mmlearn.data.fashion import prepare_fashion_mnist
from mmlearn.data.mfeat import default_root, prepare_mfeat

PREPARERS = {
    "mfeat": prepare_mfeat,
    "fashion-mnist": prepare_fashion_mnist,
    "avmnist": prepare_avmnist,
    # decode the clips once into the memory-mapped cache (root/<name>/cache)
    "crema-d": lambda root, source: prepare_av_clips(root, "crema-d"),
    "kinetics-sounds": lambda root, source: prepare_av_clips(root, "kinetics-sounds"),
}


def prepare_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="mmlearn prepare", description=__doc__)
    parser.add_argument("dataset", choices=sorted(PREPARERS))
    parser.add_argument(
        "--root", default=default_root(), help="data directory (default: %(default)s)"
    )
    parser.add_argument("--source", default=None, help="local archive or folder to read instead")
    args = parser.parse_args(list(argv))
    out = PREPARERS[args.dataset](args.root, args.source)
    print(f"prepared {args.dataset} in {out}")
    return 0
