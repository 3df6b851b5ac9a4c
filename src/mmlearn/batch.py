"""The batch that every DataModule yields and every strategy consumes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass  # not frozen: Lightning's device transfer rebuilds dataclasses field by field
class MultimodalBatch:
    """A batch of B samples with one tensor per modality.

    Attributes:
        inputs: modality name -> tensor ``[B, *input_shape]`` (``[B, D]`` vectors, ``[B, C, H, W]``
            images, ``[B, T, D]`` sequences, ``[B, L]`` token ids).
        target: class indices ``[B]`` (int64).
        present: optional modality name -> bool ``[B]``; ``False`` marks a sample whose modality is
            missing. ``None`` means every modality is present for every sample.
    """

    inputs: dict[str, Tensor]
    target: Tensor
    present: dict[str, Tensor] | None = None

    @property
    def size(self) -> int:
        """Number of samples B."""
        return int(self.target.shape[0])

    def mask(self, modality: str) -> Tensor | None:
        """Bool ``[B]`` of samples that have ``modality``, or ``None`` when all have it."""
        if self.present is None or modality not in self.present:
            return None
        return self.present[modality]


def collate_multimodal(samples: Sequence[tuple[Mapping[str, Tensor], Tensor]]) -> MultimodalBatch:
    """Stack ``(inputs, target)`` samples into a :class:`MultimodalBatch`."""
    if not samples:
        raise ValueError("collate_multimodal got an empty list of samples")
    keys = list(samples[0][0])
    inputs = {k: torch.stack([s[0][k] for s in samples]) for k in keys}
    target = torch.stack([torch.as_tensor(s[1]) for s in samples])
    return MultimodalBatch(inputs=inputs, target=target)
