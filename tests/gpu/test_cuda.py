"""Every strategy trains on CUDA in bf16 (runs on the lent GPU machine; skipped without CUDA)."""

from __future__ import annotations

import functools

import lightning.pytorch as pl
import pytest
import torch

from mmlearn.data import SyntheticMultimodal
from mmlearn.strategies import STRATEGIES

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_strategy_trains_on_cuda_bf16(name: str) -> None:
    data = SyntheticMultimodal(n_train=256, n_val=64, n_test=64, batch_size=64)
    kw = {"variance": "ema"} if name == "BOGC" else {}
    model = STRATEGIES[name](
        input_shapes=data.input_shapes,
        num_classes=2,
        embed_dim=32,
        optimizer=functools.partial(torch.optim.Adam, lr=1e-3),
        **kw,
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
    result = trainer.test(model, datamodule=data, verbose=False)[0]
    assert result["test/acc"] > 0.6
    assert next(model.parameters()).is_cuda
