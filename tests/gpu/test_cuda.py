"""Every strategy trains on CUDA in bf16, and the CUDA gradient rows (the batched vector-Jacobian
products of ``objective_rows``, used on CUDA only) equal the CPU loop's. Runs on the lent GPU
machine; skipped without CUDA."""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import pytest
import torch

from mmlearn.data import SyntheticMultimodal
from mmlearn.gradients import MGDA
from mmlearn.strategies import (
    BOGC,
    STRATEGIES,
    LastLayer,
    Microbatch,
    MultimodalModule,
    MultiObjective,
    step,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

#: every registered strategy with its defaults (BOGC: EMAMoments), then the variants
CASES: dict[str, tuple[type[MultimodalModule], Callable[[], dict[str, Any]]]] = {
    name: (cls, dict) for name, cls in STRATEGIES.items()
} | {
    "MGDA": (MultiObjective, lambda: {"rule": MGDA()}),
    "MGDA-per_group": (MultiObjective, lambda: {"rule": MGDA(scope="per_group")}),
    "BOGC-microbatch": (BOGC, lambda: {"moments": Microbatch(n_chunks=4)}),
    "BOGC-last_layer": (BOGC, lambda: {"moments": LastLayer()}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_strategy_trains_on_cuda_bf16(name: str) -> None:
    data = SyntheticMultimodal(n_train=256, n_val=64, n_test=64, batch_size=64)
    cls, options = CASES[name]
    model = cls(
        input_shapes=data.input_shapes,
        num_classes=2,
        embed_dim=32,
        optimizer=functools.partial(torch.optim.Adam, lr=1e-3),
        clip_grad_norm=8.0,
        **options(),
    )
    trainer = pl.Trainer(
        accelerator="gpu",
        devices=1,
        precision="bf16-mixed",
        max_epochs=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    trainer.fit(model, datamodule=data)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    result = trainer.test(model, datamodule=data, verbose=False)[0]
    assert result["test/acc"] > 0.6
    assert next(model.parameters()).is_cuda
    if hasattr(model, "moments"):  # the estimator's state moved with the module
        assert all(b.is_cuda for b in model.moments.buffers())


def _rows(model: MultiObjective, inputs: dict, target: torch.Tensor, device: str) -> dict:
    model = model.to(device)
    x = {m: v.to(device) for m, v in inputs.items()}
    _, losses, feats = model.objective_graph(x, target.to(device))
    return {g: r.cpu() for g, r in step.objective_rows(losses, model.groups, feats).items()}


@pytest.mark.parametrize("encoder", ["mlp", "resnet18"])
def test_cuda_batched_rows_equal_the_cpu_loop(encoder: str) -> None:
    torch.manual_seed(0)
    shapes = {"a": [1, 8, 8] if encoder == "resnet18" else [6], "b": [5]}
    specs = {"a": {"name": "resnet18", "width": 4, "blocks": [1, 1]}} if encoder != "mlp" else {}
    model = MultiObjective(input_shapes=shapes, num_classes=3, embed_dim=8, encoders=specs)
    inputs = {m: torch.randn(16, *s) for m, s in shapes.items()}
    target = torch.randint(0, 3, (16,))
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # the comparison is of float32 arithmetic
    try:
        on_cpu = _rows(copy.deepcopy(model), inputs, target, "cpu")
        on_cuda = _rows(model, inputs, target, "cuda")
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    assert on_cpu.keys() == on_cuda.keys()
    for g in on_cpu:
        torch.testing.assert_close(on_cuda[g], on_cpu[g], rtol=1e-4, atol=1e-6, msg=g)
