"""Reported accuracy and macro-F1 against an independent numpy computation.

Macro-F1 is the unweighted mean of per-class (per-label) F1; micro-F1 equals accuracy on
single-label data, so every case here has unequal per-class F1 and a class that is never
predicted, where the two differ by a clear margin.
"""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmlearn.batch import MultimodalBatch
from mmlearn.data import SyntheticMultimodal
from mmlearn.data.base import MultimodalDataModule, Split
from mmlearn.metrics import expert_metrics, final_metrics
from mmlearn.strategies import I2M2, InterOnly, IntraOnly
from mmlearn.strategies.base import impute_missing
from reference import f1_per_class, macro_f1, one_hot  # noqa: I001  (tests/reference.py)

# rows: true class, columns: predicted class. Class 3 is never predicted (its F1 is 0).
CONFUSION = np.array(
    [
        [9, 1, 0, 0],
        [3, 4, 1, 0],
        [0, 2, 2, 0],
        [2, 1, 0, 0],
    ]
)


def labels_from(confusion: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(target, pred) with ``confusion[i, j]`` samples of class i predicted as j, interleaved."""
    pairs = [(i, j) for (i, j), n in np.ndenumerate(confusion) for _ in range(n)]
    order = np.random.default_rng(0).permutation(len(pairs))
    target, pred = np.array(pairs)[order].T
    return target, pred


def test_hand_made_confusion_matrix() -> None:
    """The reference itself, by hand: F1 = 2 tp / (2 tp + fp + fn) per class."""
    target, pred = labels_from(CONFUSION)
    f1 = f1_per_class(one_hot(target, 4), one_hot(pred, 4))
    np.testing.assert_allclose(f1, [18 / 24, 8 / 16, 4 / 7, 0.0])
    accuracy = np.trace(CONFUSION) / CONFUSION.sum()
    assert accuracy == 15 / 25
    assert abs(f1.mean() - accuracy) > 0.1  # macro and micro differ


@pytest.mark.parametrize("batches", [1, 3])
def test_single_label_accuracy_and_macro_f1(batches: int) -> None:
    target, pred = labels_from(CONFUSION)
    # log-probabilities whose argmax is `pred`, as a strategy's inference rule gives them
    logits = torch.randn(len(pred), 4, generator=torch.Generator().manual_seed(1))
    logits[torch.arange(len(pred)), torch.from_numpy(pred)] += 10.0
    log_probs = F.log_softmax(logits, -1)
    metrics = final_metrics(4, "test")
    for lp, y in zip(
        log_probs.chunk(batches), torch.from_numpy(target).chunk(batches), strict=True
    ):
        metrics.update(lp, y)  # accumulated over batches, computed once at the end
    got = {k: float(v) for k, v in metrics.compute().items()}
    assert set(got) == {"test/acc", "test/f1"}
    assert got["test/acc"] == pytest.approx(np.trace(CONFUSION) / CONFUSION.sum())
    assert got["test/f1"] == pytest.approx(macro_f1(target, pred, 4), abs=1e-6)
    assert got["test/f1"] == pytest.approx((18 / 24 + 8 / 16 + 4 / 7 + 0.0) / 4, abs=1e-6)


def test_multilabel_accuracy_and_per_label_macro_f1() -> None:
    # 8 samples, 4 labels; label 3 is never predicted, label 0 is predicted perfectly
    truth = np.array(
        [
            [1, 0, 1, 0],
            [1, 1, 0, 1],
            [0, 1, 1, 0],
            [0, 0, 1, 1],
            [1, 0, 0, 0],
            [0, 1, 1, 1],
            [1, 1, 1, 0],
            [0, 0, 0, 1],
        ]
    )
    probs = np.array(
        [
            [0.90, 0.60, 0.70, 0.10],
            [0.80, 0.40, 0.20, 0.50],  # exactly 0.5 is NOT a positive decision (p > 0.5)
            [0.10, 0.70, 0.30, 0.20],
            [0.20, 0.10, 0.55, 0.40],
            [0.70, 0.20, 0.60, 0.30],
            [0.30, 0.80, 0.45, 0.49],
            [0.95, 0.30, 0.90, 0.00],
            [0.05, 0.51, 0.10, 0.45],
        ]
    )
    decided = (probs > 0.5).astype(np.int64)
    per_label = f1_per_class(truth, decided)
    np.testing.assert_allclose(per_label, [1.0, 4 / 8, 6 / 9, 0.0])  # by hand
    metrics = final_metrics(4, "val", multilabel=True)
    metrics.update(torch.tensor(probs, dtype=torch.float32), torch.from_numpy(truth))
    got = {k: float(v) for k, v in metrics.compute().items()}
    assert got["val/acc"] == pytest.approx((decided == truth).mean())
    assert got["val/f1"] == pytest.approx(per_label.mean(), abs=1e-6)
    # micro-F1 over all (sample, label) decisions would be different
    micro = f1_per_class(truth.reshape(-1, 1), decided.reshape(-1, 1))[0]
    assert abs(micro - per_label.mean()) > 0.05


def test_expert_accuracy_is_per_modality() -> None:
    target = torch.tensor([0, 1, 2, 2, 1, 0])
    good = F.one_hot(target, 3).float() * 5  # always right
    bad = F.one_hot((target + 1) % 3, 3).float() * 5  # always wrong
    metrics = expert_metrics(3, "test", ["a", "b"])
    metrics["a"].update(good, target)
    metrics["b"].update(torch.cat([good[:2], bad[2:]]), target)
    got = {k: float(v) for k, v in metrics.compute().items()}
    assert got == {"test/acc/a": 1.0, "test/acc/b": pytest.approx(2 / 6)}


def _trainer() -> pl.Trainer:
    return pl.Trainer(
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
    )


def test_logged_test_metrics_equal_the_macro_f1_of_the_predictions() -> None:
    """End to end: ``test/f1`` and ``test/acc`` of a run are those of its ``predict`` output."""
    pl.seed_everything(0, verbose=False)
    # 4 classes, 150 test samples in uneven batches of 64: epoch-level metrics, not batch means
    dm = SyntheticMultimodal(num_classes=4, dim=6, n_train=64, n_val=32, n_test=150, seed=0)
    # untrained: skewed predictions, so the per-class F1 differ
    model = I2M2(input_shapes=dm.input_shapes, num_classes=4, embed_dim=8, head_hidden=None)
    trainer = _trainer()
    (logged,) = trainer.test(model, datamodule=dm, verbose=False)
    out = trainer.predict(model, datamodule=dm)
    assert out is not None
    pred = torch.cat([o["pred"] for o in out]).numpy()
    target = torch.cat([o["target"] for o in out]).numpy()
    assert np.array_equal(target, dm.splits["test"].target.numpy())
    assert len(set(pred.tolist())) < 4  # some class is never predicted
    expected_f1, expected_acc = macro_f1(target, pred, 4), float((pred == target).mean())
    assert abs(expected_f1 - expected_acc) > 0.05  # the check below tells macro from micro
    assert logged["test/f1"] == pytest.approx(expected_f1, abs=1e-6)
    assert logged["test/acc"] == pytest.approx(expected_acc, abs=1e-6)
    # each unimodal expert's accuracy, from its own logits
    model.eval()
    with torch.no_grad():
        outputs = model(dm.splits["test"].inputs)
    for m in ("m0", "m1"):
        acc_m = float((outputs[m].argmax(-1).numpy() == target).mean())
        assert logged[f"test/acc/{m}"] == pytest.approx(acc_m, abs=1e-6), m


class _MultiLabelData(MultimodalDataModule):
    """Two modalities, 3 labels, multi-hot targets (label 2 rare)."""

    @property
    def num_classes(self) -> int:
        return 3

    @property
    def multilabel(self) -> bool:
        return True

    def load_splits(self) -> dict[str, Split]:
        g = torch.Generator().manual_seed(0)
        splits = {}
        for name, n in (("train", 32), ("val", 16), ("test", 90)):
            target = (torch.rand(n, 3, generator=g) < torch.tensor([0.6, 0.4, 0.15])).long()
            inputs = {m: torch.randn(n, 5, generator=g) for m in ("a", "b")}
            splits[name] = Split(inputs, target)
        return splits


def test_logged_multilabel_f1_is_the_macro_over_labels_of_the_predictions() -> None:
    pl.seed_everything(0, verbose=False)
    dm = _MultiLabelData(batch_size=32)
    model = InterOnly(
        input_shapes=dm.input_shapes, num_classes=3, multilabel=True, embed_dim=8, head_hidden=None
    )
    trainer = _trainer()
    (logged,) = trainer.test(model, datamodule=dm, verbose=False)
    out = trainer.predict(model, datamodule=dm)
    assert out is not None
    decided = torch.cat([o["pred"] for o in out]).numpy()
    truth = dm.splits["test"].target.numpy()
    probs = torch.cat([o["log_probs"] for o in out]).exp().numpy()
    assert np.array_equal(decided, (probs > 0.5).astype(np.int64))
    per_label = f1_per_class(truth, decided)
    assert per_label.std() > 0.05  # unequal per-label F1
    assert logged["test/f1"] == pytest.approx(per_label.mean(), abs=1e-6)
    assert logged["test/acc"] == pytest.approx((decided == truth).mean(), abs=1e-6)


def test_stage_metrics_build_one_collection_per_stage_and_experts_only_when_asked() -> None:
    from mmlearn.metrics import key, stage_metrics

    final, experts = stage_metrics(4, ["a", "b"], with_experts=False)
    assert set(final) == {"stage_train", "stage_val", "stage_test"} and len(experts) == 0
    assert key("val") == "stage_val"
    assert set(final["stage_val"].keys(keep_base=False)) == {"val/acc", "val/f1"}
    final, experts = stage_metrics(4, ["a", "b"], with_experts=True)
    assert set(experts) == set(final)
    test = experts["stage_test"]
    assert set(test.keys(keep_base=False)) == {"test/acc/a", "test/acc/b"}
    # single-label by default: class indices against argmax of the scores, 4 classes
    y = torch.tensor([0, 1, 2, 3, 3])
    scores = F.one_hot(torch.tensor([0, 1, 2, 3, 0]), 4).float()
    test["a"].update(scores, y)
    assert float(test["a"].compute()) == pytest.approx(0.8)


def test_multilabel_stage_metrics_score_every_label_of_every_expert() -> None:
    from mmlearn.metrics import stage_metrics

    final, experts = stage_metrics(3, ["a"], with_experts=True, multilabel=True)
    target = torch.tensor([[1, 0, 1], [0, 1, 1]])
    probs = torch.tensor([[0.9, 0.2, 0.4], [0.1, 0.8, 0.7]])  # 5 of 6 decisions right
    experts["stage_val"]["a"].update(probs, target)
    assert float(experts["stage_val"]["a"].compute()) == pytest.approx(5 / 6)
    final["stage_val"].update(probs, target)
    got = final["stage_val"].compute()
    assert float(got["val/acc"]) == pytest.approx(5 / 6)
    # per-label F1: label 0: 1, label 1: 1, label 2: tp 1, fn 1 -> 2/3; macro = 8/9
    assert float(got["val/f1"]) == pytest.approx(8 / 9)


# ---- unimodal accuracies count only the samples that have the modality -------------------------
class _Batches:
    """An iterable of ready batches (a list would be taken for a list of dataloaders)."""

    def __init__(self, batches: list[MultimodalBatch]) -> None:
        self.batches = batches

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class _InputsAreLogits(IntraOnly):
    """An IntraOnly whose expert m outputs its input ``x_m [B, K]`` as logits: the test decides
    each expert's prediction, and an imputed (zeroed) modality predicts class 0 (argmax of 0s)."""

    def forward(self, inputs):  # type: ignore[no-untyped-def]
        return {m: inputs[m] for m in self.modalities}


def _half_missing_batch() -> MultimodalBatch:
    """8 samples, 3 classes; 'a' is absent for the odd samples, whose class is never 0, so the
    zeros imputed for 'a' predict a wrong class there; 'a' is right on every present sample.
    'b' is present everywhere and right on 6 of 8."""
    target = torch.tensor([0, 1, 2, 2, 1, 1, 0, 2])
    present_a = torch.tensor([True, False, True, False, True, False, True, False])
    a = F.one_hot(target, 3).float() * 4  # right wherever it is seen
    b_pred = target.clone()
    b_pred[[0, 3]] = (target[[0, 3]] + 1) % 3  # wrong on samples 0 and 3
    b = F.one_hot(b_pred, 3).float() * 4
    present = {"a": present_a, "b": torch.ones(8, dtype=torch.bool)}
    return MultimodalBatch(inputs={"a": a, "b": b}, target=target, present=present)


def test_expert_accuracy_counts_only_samples_where_the_modality_is_present() -> None:
    model = _InputsAreLogits(input_shapes={"a": [3], "b": [3]}, num_classes=3, embed_dim=4)
    batch = _half_missing_batch()
    (logged,) = _trainer().validate(model, dataloaders=_Batches([batch]), verbose=False)
    # 'a' is right on all 4 samples that have it; counting the 4 imputed ones would give 4/8
    assert logged["val/acc/a"] == pytest.approx(1.0)
    assert logged["val/acc/b"] == pytest.approx(6 / 8)


def test_expert_metric_objects_are_updated_with_the_present_samples_only() -> None:
    from mmlearn.metrics import key

    model = _InputsAreLogits(input_shapes={"a": [3], "b": [3]}, num_classes=3, embed_dim=4)
    batch = _half_missing_batch()
    outputs = model(impute_missing(batch))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log without a Trainer
        model._update_metrics("test", outputs, batch)
    experts = model.expert_metrics[key("test")]
    assert float(experts["a"].compute()) == pytest.approx(1.0)
    assert int(experts["a"].tp.sum() + experts["a"].fn.sum()) == 4  # 4 samples, not 8
    assert int(experts["b"].tp.sum() + experts["b"].fn.sum()) == 8
    assert float(experts["b"].compute()) == pytest.approx(6 / 8)


def test_expert_accuracy_skips_a_batch_without_the_modality() -> None:
    model = _InputsAreLogits(input_shapes={"a": [3], "b": [3]}, num_classes=3, embed_dim=4)
    batch = _half_missing_batch()
    absent = MultimodalBatch(
        inputs=batch.inputs,
        target=batch.target,
        present={"a": torch.zeros(8, dtype=torch.bool), "b": torch.ones(8, dtype=torch.bool)},
    )
    (logged,) = _trainer().validate(model, dataloaders=_Batches([absent, batch]), verbose=False)
    assert logged["val/acc/a"] == pytest.approx(1.0)  # the batch without 'a' adds nothing
    assert logged["val/acc/b"] == pytest.approx(12 / 16)
