"""DataModules, chosen on the CLI with ``--data <Name>``; one file per dataset family."""

from __future__ import annotations

from mmlearn.data.av_clips import AudioVisualClips, prepare_av_clips
from mmlearn.data.avmnist import AVMNIST, prepare_avmnist
from mmlearn.data.base import MultimodalDataModule, Split
from mmlearn.data.fashion import FashionMNISTViews, prepare_fashion_mnist
from mmlearn.data.image_text import ImageText
from mmlearn.data.mfeat import MultipleFeatures, prepare_mfeat
from mmlearn.data.mimic import MIMIC
from mmlearn.data.synthetic import SyntheticMultimodal
from mmlearn.data.table import TableDataModule

#: every DataModule by the name ``--data <Name>`` takes; the CLI's checks and the tests use it
DATA_MODULES: dict[str, type[MultimodalDataModule]] = {
    cls.__name__: cls
    for cls in (
        MultipleFeatures,
        FashionMNISTViews,
        AVMNIST,
        AudioVisualClips,
        ImageText,
        MIMIC,
        SyntheticMultimodal,
        TableDataModule,
    )
}

__all__ = [
    "DATA_MODULES",
    "ImageText",
    "MIMIC",
    "AudioVisualClips",
    "prepare_av_clips",
    "AVMNIST",
    "prepare_avmnist",
    "FashionMNISTViews",
    "prepare_fashion_mnist",
    "MultimodalDataModule",
    "MultipleFeatures",
    "Split",
    "SyntheticMultimodal",
    "TableDataModule",
    "prepare_mfeat",
]
