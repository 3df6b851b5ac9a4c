"""MultimodalBatch: collation and Lightning's device/dtype transfer of the dataclass."""

from __future__ import annotations

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning_utilities.core.apply_func import apply_to_collection

from mmlearn.batch import MultimodalBatch, collate_multimodal


def test_collate_stacks_modalities_and_targets() -> None:
    samples = [
        ({"a": torch.full((2,), float(i)), "b": torch.ones(3, 4) * i}, torch.tensor(i))
        for i in range(3)
    ]
    batch = collate_multimodal(samples)
    assert batch.size == 3 and batch.target.tolist() == [0, 1, 2]
    assert batch.inputs["a"].shape == (3, 2) and batch.inputs["b"].shape == (3, 3, 4)
    assert batch.inputs["b"][2].eq(2).all() and batch.present is None and batch.mask("a") is None


def test_lightning_transfers_every_field() -> None:
    present = {"a": torch.tensor([True, False])}
    batch = MultimodalBatch({"a": torch.ones(2, 3)}, torch.tensor([0, 1]), present)
    # to another device (meta: no data, just the device): every tensor of every field moves
    moved = move_data_to_device(batch, torch.device("meta"))
    assert isinstance(moved, MultimodalBatch) and moved.present is not None
    tensors = {
        "inputs.a": moved.inputs["a"],
        "target": moved.target,
        "present.a": moved.present["a"],
    }
    assert {k: t.device.type for k, t in tensors.items()} == dict.fromkeys(tensors, "meta")
    assert moved.size == 2 and moved.inputs["a"].shape == (2, 3)
    assert batch.target.device.type == "cpu"  # the original is left where it was
    doubled = apply_to_collection(
        batch, torch.Tensor, lambda t: t.double() if t.is_floating_point() else t
    )
    assert isinstance(doubled, MultimodalBatch)
    assert doubled.inputs["a"].dtype == torch.float64 and doubled.target.dtype == torch.int64
    assert torch.equal(doubled.mask("a"), present["a"])
