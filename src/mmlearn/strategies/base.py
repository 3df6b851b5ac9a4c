"""The shared LightningModule: encoders, heads, metrics, optimiser set-up, evaluation logic.

A strategy is a thin subclass that says what its forward pass outputs (logits by expert name:
``"fused"`` for the joint model, a modality name for a unimodal expert), which objectives it
trains, and how it combines the outputs at inference.
"""

from __future__ import annotations

import functools
import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any, cast

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics import MetricCollection

from mmlearn.batch import MultimodalBatch
from mmlearn.encoders import Encoder, build_encoder
from mmlearn.errors import MMLearnError, is_int, is_probability
from mmlearn.fusion import FUSIONS, Fusion, build_fusion
from mmlearn.heads import make_head
from mmlearn.likelihood import Likelihood, likelihood
from mmlearn.metrics import key, stage_metrics
from mmlearn.strategies.step import sync_batchnorm

FUSED = "fused"


class JointModel(nn.Module):
    """Inter-modality model: per-modality encoders, a fusion and the fused head.

    ``forward({m: [B, *shape_m]}) -> z_J [B, K]``.
    """

    def __init__(self, encoders: Mapping[str, Encoder], fusion: Fusion, head: nn.Module) -> None:
        super().__init__()
        self.encoders = nn.ModuleDict(dict(encoders))
        self.fusion = fusion
        self.head = head

    def features(self, inputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Per-modality features ``{m: [B, d_m]}``."""
        return {m: enc(inputs[m]) for m, enc in self.encoders.items()}

    def decode(self, features: Mapping[str, Tensor]) -> Tensor:
        """The fusion and the head on given features ``{m: [B, d_m]}`` -> ``z_J [B, K]``."""
        return self.head(self.fusion(features))

    def forward(self, inputs: Mapping[str, Tensor]) -> Tensor:
        return self.decode(self.features(inputs))


class UnimodalExpert(nn.Module):
    """Intra-modality model of one modality: ``[B, *shape] -> z_m [B, K]``."""

    def __init__(self, encoder: Encoder, head: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.encoder(x))


class MultimodalModule(pl.LightningModule):
    """Base of every strategy.

    Args:
        input_shapes: modality -> shape of one sample (no batch dim). Linked from the DataModule
            by the CLI; its key order is the modality order.
        num_classes: K. Linked from the DataModule by the CLI.
        multilabel: targets are multi-hot ``[B, K]`` (several labels per sample): every head is
            K independent Bernoulli logits, trained with binary cross-entropy; "log-probabilities"
            are ``log sigmoid(z)`` per label. Linked from the DataModule. It picks
            :attr:`likelihood` (:class:`~mmlearn.likelihood.Bernoulli`, else
            :class:`~mmlearn.likelihood.Categorical`), which every loss, log-probability,
            decision and metric of the model goes through.
        encoders: modality -> ``{"name": <encoder>, **options}``. A modality left out gets the
            default for its input shape (MLP for vectors, CNN for images, GRU for sequences).
        embed_dim: feature size every encoder outputs (>= 1).
        fusion: ``concat``, ``sum`` or ``lrtf`` (joint model only).
        fusion_rank: rank of ``lrtf`` (>= 1).
        head_hidden: hidden width of the fused head (``None`` or 0: linear). Unimodal heads are
            linear.
        dropout: dropout in the fused head, in ``[0, 1)``.
        optimizer: optimiser factory, e.g. ``{class_path: torch.optim.SGD, init_args: {lr: 0.1}}``;
            built once on a dummy parameter in the constructor, so that a value torch refuses
            (a negative ``lr``) is an error naming the option before anything runs.
        lr_scheduler: optional scheduler factory, stepped every epoch.
        clip_grad_norm: clip the global gradient norm (over all parameters, after a
            gradient-level strategy has combined its objectives) to this value before every
            optimiser step; the one clipping option of every strategy, automatic or manual
            (``trainer.gradient_clip_val`` is refused, so a config cannot clip twice).
    """

    #: Whether the forward pass returns unimodal logits, measured as ``{stage}/acc/{modality}``.
    has_experts: bool = False
    #: Whether the inference rule leaves absent modalities' experts out of a product (``drop``,
    #: docs/methods.md section 8); the others can only be given imputed inputs or features.
    drops_experts: bool = False
    #: the fusions the strategy can be built with (``None``: every one in ``FUSIONS``)
    supported_fusions: tuple[str, ...] | None = None
    #: whether the strategy's head must be linear (``head_hidden`` null or 0: OGM-GE, MLA)
    linear_fused_head: bool = False
    #: optimiser steps per training batch, as the training protocol states it (MLA: one per
    #: modality)
    optimizer_steps_per_batch: str = "1"

    def __init__(
        self,
        input_shapes: Mapping[str, Sequence[int]] | None = None,
        num_classes: int | None = None,
        multilabel: bool = False,
        encoders: Mapping[str, Mapping[str, Any]] | None = None,
        embed_dim: int = 128,
        fusion: str = "concat",
        fusion_rank: int = 4,
        head_hidden: int | None = 128,
        dropout: float = 0.0,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        clip_grad_norm: float | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler", "rule", "moments"])
        if not input_shapes:
            raise MMLearnError(
                f"{type(self).__name__}: input_shapes is empty; expected modality -> sample shape "
                "(the CLI links it from the DataModule's `input_shapes`)"
            )
        if num_classes is None or int(num_classes) < 2:
            raise MMLearnError(f"{type(self).__name__}: num_classes={num_classes!r}; expected >= 2")
        self.input_shapes = {m: [int(s) for s in shape] for m, shape in input_shapes.items()}
        self.modalities = list(self.input_shapes)
        self.num_classes = int(num_classes)
        self.multilabel = bool(multilabel)
        self.likelihood: Likelihood = likelihood(self.multilabel)
        self.encoder_specs = dict(encoders or {})
        unknown = sorted(set(self.encoder_specs) - set(self.modalities))
        if unknown:
            raise MMLearnError(
                f"model.encoders names modalities {unknown} that the data does not have; "
                f"the data's modalities are {self.modalities}"
            )
        name = type(self).__name__
        check_size(f"{name}: model.embed_dim", embed_dim, 1, "the feature size of every encoder")
        if fusion not in FUSIONS:
            raise MMLearnError(
                f"model.fusion: unknown fusion {fusion!r}; valid fusions: {sorted(FUSIONS)}"
            )
        check_size(f"{name}: model.fusion_rank", fusion_rank, 1, "the rank of the lrtf fusion")
        if head_hidden is not None:
            check_size(
                f"{name}: model.head_hidden",
                head_hidden,
                0,
                "the fused head's hidden width; null or 0: a linear head",
            )
        check_probability(f"{name}: model.dropout", dropout)
        check_optimizer(optimizer, f"{name}: model.optimizer")
        self.embed_dim = embed_dim
        self.fusion_name, self.fusion_rank = fusion, fusion_rank
        self.head_hidden, self.dropout = head_hidden, dropout
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler
        if clip_grad_norm is not None and not clip_grad_norm > 0:
            raise MMLearnError(
                f"{type(self).__name__}: clip_grad_norm={clip_grad_norm}; expected > 0 (or null)"
            )
        self.clip_grad_norm = clip_grad_norm
        self._metrics_logged: set[str] = set()  # stages whose metrics this epoch has logged
        self.final_metrics, self.expert_metrics = stage_metrics(
            self.num_classes, self.modalities, self.has_experts, self.multilabel
        )

    # ---- builders shared by the strategies -------------------------------------------------
    def build_encoder(self, modality: str) -> Encoder:
        """A fresh encoder for ``modality`` from ``encoders`` or the shape default."""
        return build_encoder(
            self.encoder_specs.get(modality),
            self.input_shapes[modality],
            self.embed_dim,
            where=f"model.encoders.{modality}",
        )

    def build_joint(self) -> JointModel:
        """The inter-modality model over all modalities."""
        encoders = {m: self.build_encoder(m) for m in self.modalities}
        fusion = build_fusion(
            self.fusion_name,
            {m: e.out_dim for m, e in encoders.items()},
            out_dim=self.embed_dim,
            rank=self.fusion_rank,
        )
        head = make_head(fusion.out_dim, self.num_classes, self.head_hidden, self.dropout)
        return JointModel(encoders, fusion, head)

    def build_expert(self, modality: str) -> UnimodalExpert:
        """The intra-modality model of ``modality`` (own encoder, linear head)."""
        encoder = self.build_encoder(modality)
        return UnimodalExpert(encoder, nn.Linear(encoder.out_dim, self.num_classes))

    # ---- what a strategy defines -----------------------------------------------------------
    def forward(self, inputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Logits ``[B, K]`` by expert name (``"fused"`` and/or modality names)."""
        raise NotImplementedError

    def objectives(self, outputs: Mapping[str, Tensor], target: Tensor) -> dict[str, Tensor]:
        """Scalar losses by objective name; training minimises their sum."""
        raise NotImplementedError

    def predict_log_proba(
        self, outputs: Mapping[str, Tensor], present: Mapping[str, Tensor] | None = None
    ) -> Tensor:
        """The strategy's inference rule: log-probabilities ``[B, K]``."""
        raise NotImplementedError

    # ---- the model split at its features: what `mmlearn evaluate` runs once per sample --------
    def feature_encoders(self) -> dict[str, tuple[str, nn.Module]]:
        """Every encoder of the model by name: ``name -> (modality, encoder)``.

        Names are module paths (``joint.m0`` for the joint model's encoder of ``m0``,
        ``experts.m0`` for the unimodal expert's own). A strategy lists each encoder once;
        :meth:`decode` of :meth:`encode` is :meth:`forward` (tested for every strategy).
        """
        raise NotImplementedError

    def encode(self, inputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Features ``{encoder name: [B, D]}`` of every encoder on its modality's input."""
        return {name: enc(inputs[m]) for name, (m, enc) in self.feature_encoders().items()}

    def decode(self, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """What :meth:`forward` returns, from the features :meth:`encode` gives."""
        raise NotImplementedError

    # ---- one label (softmax) or several (independent sigmoids): see mmlearn.likelihood ------
    def loss(self, logits: Tensor, target: Tensor) -> Tensor:
        """Cross-entropy of ``logits [B, K]``: softmax CE, or mean binary CE per label."""
        return self.likelihood.loss(logits, target)

    def log_proba(self, logits: Tensor) -> Tensor:
        """``log_softmax(z)``, or ``log sigmoid(z)`` (log p(label present)) when multi-label."""
        return self.likelihood.log_proba(logits)

    def nll(self, log_probs: Tensor, target: Tensor) -> Tensor:
        """Negative log-likelihood of ``target`` under :meth:`log_proba`-style output."""
        return self.likelihood.nll(log_probs, target)

    def predicted(self, log_probs: Tensor) -> Tensor:
        """Class indices ``[B]``, or a multi-hot ``[B, K]`` (p > 0.5) when multi-label."""
        return self.likelihood.predicted(log_probs)

    def total_loss(self, losses: Mapping[str, Tensor]) -> Tensor:
        """The objective the strategy minimises, logged as ``train/loss``: the sum by default.

        Automatic optimisation back-propagates it; gradient-level strategies log it and follow
        their rule's combination of the objectives' gradients instead.
        """
        return torch.stack(list(losses.values())).sum()

    def log_losses(self, total: Tensor, losses: Mapping[str, Tensor], batch_size: int) -> None:
        """``train/loss`` (:meth:`total_loss`) and every objective as ``train/loss/{name}``."""
        log = {"train/loss": total.detach()}
        log |= {f"train/loss/{k}": v.detach() for k, v in losses.items()}
        self.log_dict(log, on_step=True, on_epoch=True, batch_size=batch_size)

    # ---- checks ----------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if self._trainer is not None:
            self._setup_trainer()
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        self.check_data(dm)

    def check_data(self, dm: object) -> None:
        """Refuse data of other modalities, input shapes, class count or label kind than the
        model's (nothing to check without a DataModule that knows its shapes)."""
        shapes = getattr(dm, "input_shapes", None)
        if shapes is None:
            return
        check_modalities(list(shapes), self.modalities, f"the data ({type(dm).__name__})")
        for m in self.modalities:
            if list(shapes[m]) != self.input_shapes[m]:
                raise MMLearnError(
                    f"input shape mismatch for modality {m!r}: the data gives {list(shapes[m])}, "
                    f"the model expects {self.input_shapes[m]}"
                )
        k = getattr(dm, "num_classes", self.num_classes)
        if k != self.num_classes:
            raise MMLearnError(
                f"the data has {k} classes, the model was built for {self.num_classes}"
            )
        data_multilabel = bool(getattr(dm, "multilabel", False))
        if data_multilabel != self.multilabel:
            raise MMLearnError(
                f"the data is {'multi' if data_multilabel else 'single'}-label, the model was "
                f"built with multilabel={self.multilabel}"
            )

    def _refuse_trainer_clipping(self) -> None:
        clip = getattr(self.trainer, "gradient_clip_val", None)
        if clip is not None:
            raise MMLearnError(
                f"trainer.gradient_clip_val={clip}: clip with model.clip_grad_norm={clip} instead "
                "(the one clipping option of every strategy, automatic or manual)"
            )

    def configure_callbacks(self) -> list[pl.Callback]:
        # the first hook of every Trainer run, before Lightning's own check of manual
        # optimisation (which would refuse gradient_clip_val without naming the option to use)
        if self._trainer is not None:
            self._refuse_trainer_clipping()
            self._refuse_accumulation()
        return []

    def accumulation_refusal(self, accumulate: int) -> str | None:
        """Why the strategy cannot fit with ``trainer.accumulate_grad_batches=accumulate``
        (``None``: it can). Manual optimisation takes its own steps, which Lightning cannot
        accumulate (and would refuse with a traceback); OGM-GE says why it cannot either."""
        if self.automatic_optimization:
            return None
        return (
            f"trainer.accumulate_grad_batches={accumulate}: {type(self).__name__} takes its "
            "own optimiser steps (manual optimisation), which cannot be accumulated; use a "
            "larger data.batch_size instead"
        )

    def _refuse_accumulation(self) -> None:
        accumulate = int(getattr(self.trainer, "accumulate_grad_batches", 1) or 1)
        fitting = self.trainer.state.fn == "fit"
        refusal = self.accumulation_refusal(accumulate) if accumulate > 1 and fitting else None
        if refusal is not None:
            raise MMLearnError(refusal)

    def _setup_trainer(self) -> None:
        self._refuse_trainer_clipping()
        if self.trainer.world_size > 1:
            # each rank's BatchNorm would normalise with its own half of the batch: synchronise,
            # so that 2 ranks of batch B train as 1 process of batch 2B
            sync_batchnorm(self, self.trainer.strategy.root_device.type == "cuda")

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        if self.clip_grad_norm:
            self.clip_gradients(optimizer, self.clip_grad_norm, "norm")

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint trained on other modalities, before its weights are loaded."""
        shapes = checkpoint.get("hyper_parameters", {}).get("input_shapes")
        if shapes is not None:
            check_modalities(self.modalities, list(shapes), "the data", "the checkpoint's model")

    def check_batch(self, batch: MultimodalBatch, stage: str) -> None:
        """Raise a clear error when a batch does not match the model (cheap: keys and shapes)."""
        got = set(batch.inputs)
        if got != set(self.modalities):
            raise MMLearnError(
                f"{stage} batch has modalities {sorted(got)}, the model knows {self.modalities}"
            )
        for m, x in batch.inputs.items():
            if not _shape_matches(self.input_shapes[m], x):
                raise MMLearnError(
                    f"{stage} batch: modality {m!r} has sample shape {list(x.shape[1:])}, "
                    f"expected {self.input_shapes[m]}"
                )

    # ---- Lightning hooks -------------------------------------------------------------------
    def training_step(self, batch: MultimodalBatch, batch_idx: int) -> Tensor | None:
        self.check_batch(batch, "train")
        outputs = self(batch.inputs)
        losses = self.objectives(outputs, batch.target)
        loss = self.total_loss(losses)
        self.log_losses(loss, losses, batch.size)
        with torch.no_grad():
            self._update_metrics("train", outputs, batch)
            self.on_train_outputs(outputs, batch)
        return loss

    def on_train_outputs(self, outputs: Mapping[str, Tensor], batch: MultimodalBatch) -> None:
        """Hook after an automatic-optimisation forward pass (no grad), before the backward:
        OGM-GE reads its confidence scores here."""

    def validation_step(self, batch: MultimodalBatch, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: MultimodalBatch, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def predict_step(self, batch: MultimodalBatch, batch_idx: int) -> dict[str, Tensor]:
        self.check_batch(batch, "predict")
        outputs = self(impute_missing(batch))
        log_probs = self.predict_log_proba(outputs, batch.present)
        return {"log_probs": log_probs, "pred": self.predicted(log_probs), "target": batch.target}

    def _evaluate(self, batch: MultimodalBatch, stage: str) -> None:
        self.check_batch(batch, stage)
        outputs = self(impute_missing(batch))
        log_probs = self._update_metrics(stage, outputs, batch)
        loss = self.nll(log_probs, batch.target)
        self.log(f"{stage}/loss", loss, on_epoch=True, batch_size=batch.size, sync_dist=True)

    def _update_metrics(
        self, stage: str, outputs: Mapping[str, Tensor], batch: MultimodalBatch
    ) -> Tensor:
        log_probs = self.predict_log_proba(outputs, batch.present)
        final = cast(MetricCollection, self.final_metrics[key(stage)])
        final.update(self.likelihood.metric_input(log_probs), batch.target)
        # the Metric objects are logged once per epoch: Lightning keeps the reference and
        # computes them at the epoch's end, and each self.log call costs ~0.7 ms of bookkeeping
        # (a quarter of the framework's overhead per training step on 2 CPU cores)
        register = stage not in self._metrics_logged
        self._metrics_logged.add(stage)
        if register:
            self.log_dict(final, on_step=False, on_epoch=True, batch_size=batch.size, prog_bar=True)
        if self.has_experts:
            experts = cast(MetricCollection, self.expert_metrics[key(stage)])
            for m in self.modalities:
                # multi-label metrics take probabilities: logits that all lie in [0, 1] would be
                # taken for probabilities and thresholded at 0.5
                scores = self.likelihood.metric_input(self.log_proba(outputs[m]))
                target = batch.target
                mask = batch.mask(m)
                if mask is not None:
                    # an expert is measured on the samples that have its modality: on the others
                    # it saw imputed zeros, which says nothing about the modality
                    if not bool(mask.any()):
                        continue
                    scores, target = scores[mask], target[mask]
                experts[m].update(scores, target)
            if register:
                self.log_dict(experts, on_step=False, on_epoch=True, batch_size=batch.size)
        return log_probs

    def on_train_epoch_start(self) -> None:
        self._metrics_logged.discard("train")

    def on_validation_epoch_start(self) -> None:
        self._metrics_logged.discard("val")

    def on_test_epoch_start(self) -> None:
        self._metrics_logged.discard("test")

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": self.scheduler_factory(optimizer)}


def check_size(where: str, value: object, minimum: int, what: str) -> None:
    """Refuse ``value`` unless it is an integer ``>= minimum``; ``where`` names the option."""
    if not is_int(value, minimum):
        raise MMLearnError(f"{where}={value!r}; expected an integer >= {minimum} ({what})")


def check_probability(where: str, value: object) -> None:
    """Refuse a dropout probability outside ``[0, 1)`` (1 would zero every feature)."""
    if not is_probability(value):
        raise MMLearnError(f"{where}={value!r}; expected a probability in [0, 1)")


#: torch's messages for a refused optimiser option -> (option, what it expects)
OPTIMIZER_CHECKS: tuple[tuple[str, str, str], ...] = (
    (r"Invalid learning rate: (?P<v>.+)", "lr", "lr >= 0"),
    (r"Invalid epsilon value: (?P<v>.+)", "eps", "eps >= 0"),
    (r"Invalid beta parameter at index \d+: (?P<v>.+)", "betas", "each beta in [0, 1)"),
    (r"Invalid weight_decay value: (?P<v>.+)", "weight_decay", "weight_decay >= 0"),
    (r"Invalid momentum value: (?P<v>.+)", "momentum", "momentum >= 0"),
)


def check_optimizer(factory: OptimizerCallable, where: str = "model.optimizer") -> None:
    """Build the optimiser once on a dummy parameter, so a bad option fails now, not at fit.

    torch checks an optimiser's values in its constructor (``ValueError("Invalid learning
    rate: -1.0")``); that error becomes one naming the option. Anything else the dummy build
    raises is left to :meth:`MultimodalModule.configure_optimizers`, which builds the real one
    (``fused=True`` may need parameters on a GPU, for instance).
    """
    try:
        factory([nn.Parameter(torch.zeros(1))])
    except ValueError as e:
        cls = _optimizer_name(factory)
        for pattern, option, expected in OPTIMIZER_CHECKS:
            found = re.fullmatch(pattern, str(e))
            if found is not None:
                raise MMLearnError(
                    f"{where}.init_args.{option}={found['v']}: {cls} expects {expected} ({e})"
                ) from e
        raise MMLearnError(f"{where}: {cls} refuses its options: {e}") from e
    except Exception:  # not a bad value: the real build decides
        return


def _optimizer_name(factory: object) -> str:
    """``torch.optim.Adam`` for the class (or jsonargparse's partial of it) ``factory`` builds."""
    found: list[type] = [factory] if isinstance(factory, type) else []
    if isinstance(factory, functools.partial):
        found = [a for a in (factory.func, *factory.args) if isinstance(a, type)]
    if not found:
        return repr(factory)
    cls = found[0]
    parts = cls.__module__.split(".")
    for i in range(1, len(parts) + 1):  # the shortest module that exports it
        module = sys.modules.get(".".join(parts[:i]))
        if module is not None and getattr(module, cls.__name__, None) is cls:
            return f"{'.'.join(parts[:i])}.{cls.__name__}"
    return f"{cls.__module__}.{cls.__qualname__}"


def check_modalities(
    data_mods: Sequence[str], model_mods: Sequence[str], data: str, model: str = "the model"
) -> None:
    """Raise when the data's and the model's modality sets differ, naming both."""
    if set(data_mods) != set(model_mods):
        raise MMLearnError(
            f"modality mismatch: {data} has {sorted(data_mods)}, {model} was built for "
            f"{sorted(model_mods)}; missing in the model: "
            f"{sorted(set(data_mods) - set(model_mods))}, unknown to the data: "
            f"{sorted(set(model_mods) - set(data_mods))}"
        )


def impute_missing(batch: MultimodalBatch) -> dict[str, Tensor]:
    """Inputs with absent modalities replaced by zeros.

    For modalities the DataModule standardises on the training split (mfeat, Fashion-MNIST,
    MIMIC, tables) zero is the training mean, the "impute the training mean" protocol
    (docs/methods.md sections 1 and 8); for the others (images scaled to [0, 1], token ids,
    synthetic data) it is a plain zero input (docs/evaluation.md).
    """
    if batch.present is None:
        return batch.inputs
    out = dict(batch.inputs)
    for m, mask in batch.present.items():
        x = out[m]
        keep = mask.view(-1, *([1] * (x.dim() - 1)))
        out[m] = torch.where(keep, x, torch.zeros_like(x))
    return out


def _shape_matches(expected: Sequence[int], x: Tensor) -> bool:
    """Sample shape check; sequences ``[T, D]`` and token ids ``[L]`` may vary in length."""
    got = list(x.shape[1:])
    if len(got) != len(expected):
        return False
    if len(expected) == 2:
        return got[-1] == expected[-1]
    if not torch.is_floating_point(x) and len(expected) == 1:
        return True
    return got == list(expected)
