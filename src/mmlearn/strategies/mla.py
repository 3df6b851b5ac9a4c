"""MLA: multimodal learning by alternating unimodal adaptation through a shared head."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

import torch
from torch import Tensor, nn

from mmlearn.batch import MultimodalBatch
from mmlearn.errors import MMLearnError
from mmlearn.strategies import step
from mmlearn.strategies.base import FUSED, MultimodalModule
from mmlearn.strategies.multi_objective import refuse_float16


def entropy_weights(
    log_probs: Mapping[str, Tensor], present: Mapping[str, Tensor] | None, multilabel: bool
) -> Tensor:
    """``w [M, B]``: each sample's fusion weights, ``softmax_m(-H_m)`` over present modalities.

    ``H_m`` is the entropy of modality m's predictive distribution (multi-label: the sum over
    labels of the binary entropies). ``exp(max_j H_j - H_m) / sum_j exp(max_j H_j - H_j)`` of
    the paper is this softmax. An absent modality gets weight 0; a sample with none present
    gets equal weights (its logits are then averaged).
    """
    names = list(log_probs)
    entropies = []
    for m in names:
        lp = log_probs[m]
        p = lp.exp()
        if multilabel:
            log_not = torch.log((-torch.expm1(lp)).clamp_min(1e-12))
            h = -(p * lp + (1 - p) * log_not).sum(-1)
        else:
            h = -(p * lp).sum(-1)
        entropies.append(h)
    score = -torch.stack(entropies)  # [M, B]
    if not present:
        return torch.softmax(score, dim=0)
    mask = torch.stack(
        [present[m] if m in present else torch.ones_like(score[0], dtype=torch.bool) for m in names]
    )
    none = ~mask.any(0, keepdim=True)
    use = mask | none  # a sample with no modality present: all of them, equally
    score = torch.where(none, torch.zeros_like(score), score)
    score = torch.where(use, score, torch.full_like(score, -torch.inf))
    return torch.where(use, torch.softmax(score, dim=0), torch.zeros_like(score))


def project_step(projector: Tensor, r: Tensor, alpha: float) -> Tensor:
    """One update of the gradient-modification projector ``P [D, D]`` by features ``r [D]``.

    Orthogonal weight modification (recursive least squares): ``k = P r``,
    ``P <- P - k k^T / (alpha + r^T k)``, then ``P <- P / |P|_F``. ``W.grad @ P^T`` keeps the
    shared head's update out of the directions of the features already adapted to.
    """
    k = projector @ r
    new = projector - torch.outer(k, k) / (alpha + r @ k)
    return new / new.norm().clamp_min(1e-30)


class MLA(MultimodalModule):
    """Alternating unimodal steps through ONE shared linear head; entropy-weighted fusion.

    Zhang, Latham, Lin, "Multimodal Representation Learning by Alternating Unimodal
    Adaptation", CVPR 2024 (docs/methods.md section 6). Encoders ``phi_m`` (all of feature size
    D) and one head ``h = Linear(D, K)`` shared by every modality. Each batch, for each
    modality m in turn: ``L_m = CE(h(phi_m(x_m)), y)`` (features from the batch's one forward
    pass, the head as the previous modality's step left it), its gradient on ``phi_m`` and
    ``h``, and an optimiser step on those parameters alone: M optimiser steps per batch, so
    ``global_step`` counts M per batch. Gradient modification: before each step but the
    very first, the projector is updated with the mean feature ``r [D]`` of modality m's batch,
    ``alpha_t = 0.1 ** (1 + batch_idx / batches_per_epoch)`` (:func:`project_step`), and the
    head's weight gradient becomes ``grad_W @ P^T``.

    Inference (test-time uncertainty-based fusion): per sample,
    ``z = sum_m w_m z_m`` with ``w = softmax_m(-H(p_m))`` (:func:`entropy_weights`); an absent
    modality is left out of the weights (``drop``). ``outputs`` holds the unimodal logits by
    modality and ``"fused"``, the fused logits of all modalities. (The released code takes the
    entropy over the batch dimension, one weight per modality and batch, and only with its
    ``--dynamic`` option; we follow the paper's per-sample weights. Its projector update divides
    by the matrix ``k r^T`` elementwise where the paper has the scalar ``r^T k``; we follow the
    paper, and its name test never matches, so the released runs do not project at all.)

    Under DDP each step's gradients and ``r`` are averaged over ranks in one collective before
    the projector and the optimiser see them, so 2 ranks train as 1 process on the doubled batch.

    Args:
        gradient_modification: project the shared head's weight gradient (the paper's rule).
            The released code's projection test never matches a parameter name, so its runs
            train without it: ``False`` reproduces them.
        alpha_base: ``alpha_t = alpha_base ** (1 + batch_idx / batches_per_epoch)`` (0.1).
        head_hidden: ``None`` (or 0): the shared head is linear; anything else is refused.
        **kwargs: see :class:`~mmlearn.strategies.base.MultimodalModule`; a ``fusion`` other
            than the default is refused (there is no fusion module).

    Buffers (checkpointed): ``projector [D, D]`` and ``adapted`` (the number of unimodal steps
    taken). Cost: one forward, then per modality a backward through its encoder and the head
    and an optimiser step.
    """

    has_experts = True
    drops_experts = True

    linear_fused_head = True
    optimizer_steps_per_batch = "M (one per modality)"
    supported_fusions = ("concat",)  # the default; there is no fusion module

    def __init__(
        self,
        gradient_modification: bool = True,
        alpha_base: float = 0.1,
        head_hidden: int | None = None,
        **kwargs: Any,
    ) -> None:
        if head_hidden:
            raise MMLearnError(
                f"MLA: head_hidden={head_hidden}; MLA's one head, shared by every modality, is "
                "linear: use head_hidden: null"
            )
        fusion = kwargs.get("fusion", "concat")
        if fusion != "concat":
            raise MMLearnError(
                f"MLA: fusion={fusion!r}; MLA has no fusion module (it fuses the unimodal logits "
                "by their entropy at test time): leave model.fusion unset"
            )
        super().__init__(head_hidden=head_hidden, **kwargs)
        if not 0 < alpha_base < 1:
            raise MMLearnError(f"MLA: alpha_base={alpha_base}; expected 0 < alpha_base < 1")
        self.gradient_modification = bool(gradient_modification)
        self.alpha_base = float(alpha_base)
        self.encoders = nn.ModuleDict({m: self.build_encoder(m) for m in self.modalities})
        dims = {m: int(getattr(e, "out_dim", self.embed_dim)) for m, e in self.encoders.items()}
        if len(set(dims.values())) != 1:
            raise MMLearnError(
                f"MLA: the encoders' feature sizes differ ({dims}); the shared head needs one "
                "size: give every encoder the same out_dim (model.embed_dim)"
            )
        d = next(iter(dims.values()))
        self.head = nn.Linear(d, self.num_classes)
        self.register_buffer("projector", torch.eye(d))
        self.register_buffer("adapted", torch.zeros((), dtype=torch.long))
        self.automatic_optimization = False

    def setup(self, stage: str) -> None:
        super().setup(stage)
        refuse_float16(str(self.trainer.precision), type(self).__name__)

    # ---- the model ------------------------------------------------------------------------
    def forward(self, inputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return self.decode(self.encode(inputs))

    def feature_encoders(self) -> dict[str, tuple[str, nn.Module]]:
        return {f"encoders.{m}": (m, e) for m, e in self.encoders.items()}

    def decode(self, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        out = {m: self.head(features[f"encoders.{m}"]) for m in self.modalities}
        return out | {FUSED: self.fuse(out)}

    def fuse(
        self, outputs: Mapping[str, Tensor], present: Mapping[str, Tensor] | None = None
    ) -> Tensor:
        """``[B, K]``: the entropy-weighted sum of the unimodal logits."""
        uni = {m: outputs[m] for m in self.modalities}
        lp = {m: self.log_proba(z) for m, z in uni.items()}
        w = entropy_weights(lp, present, self.multilabel)
        # an absent modality's logits are left out, not multiplied by 0 (NaN * 0 is NaN)
        terms = [
            torch.where(w[i].unsqueeze(1) > 0, w[i].unsqueeze(1).to(z.dtype) * z, 0.0)
            for i, z in enumerate(uni.values())
        ]
        return torch.stack(terms).sum(0)

    def objectives(self, outputs: Mapping[str, Tensor], target: Tensor) -> dict[str, Tensor]:
        return {m: self.loss(outputs[m], target) for m in self.modalities}

    def predict_log_proba(
        self, outputs: Mapping[str, Tensor], present: Mapping[str, Tensor] | None = None
    ) -> Tensor:
        if not present:
            return self.log_proba(outputs[FUSED])
        return self.log_proba(self.fuse(outputs, present))

    # ---- the alternating steps ------------------------------------------------------------
    @property
    def _projector(self) -> Tensor:
        return cast(Tensor, self.projector)

    def alpha_at(self, batch_idx: int) -> float:
        batches = max(int(getattr(self.trainer, "num_training_batches", 1) or 1), 1)
        if batches == float("inf"):  # an iterable without a length: the epoch's fraction is 0
            return self.alpha_base
        return float(self.alpha_base ** (1 + batch_idx / batches))

    def training_step(self, batch: MultimodalBatch, batch_idx: int) -> None:
        self.check_batch(batch, "train")
        opt = self.optimizers()
        feats = self.encode(batch.inputs)
        losses: dict[str, Tensor] = {}
        for p in self.parameters():  # each step below sees only its own parameters' gradients
            p.grad = None
        world = step.world_size()
        for m in self.modalities:
            params = [*self.encoders[m].parameters(), *self.head.parameters()]
            loss = self.loss(self.head(feats[f"encoders.{m}"]), batch.target)
            losses[m] = loss.detach()
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            # a parameter outside the graph (the same on every rank) keeps grad None, so that
            # momentum and weight decay leave it alone, as a backward pass would
            local = {str(i): g for i, g in enumerate(grads) if g is not None}
            local["r"] = feats[f"encoders.{m}"].detach().mean(0)
            summed = step.reduce_sum(local)
            mean = {k: v / world for k, v in summed.items()} if world > 1 else summed
            if self.gradient_modification and int(cast(Tensor, self.adapted)) > 0:
                p_new = project_step(
                    self._projector, mean["r"].to(self._projector.dtype), self.alpha_at(batch_idx)
                )
                self._projector.copy_(p_new)
                w = str(len(params) - 2)  # the head's weight (then its bias)
                if w in mean:
                    mean[w] = mean[w] @ self._projector.T.to(mean[w].dtype)
            for i, p in enumerate(params):
                p.grad = mean[str(i)].to(p.dtype) if str(i) in mean else None
            if self.clip_grad_norm:
                self.clip_gradients(opt, self.clip_grad_norm, "norm")  # type: ignore[arg-type]
            opt.step()  # type: ignore[union-attr]
            self.adapted.add_(1)  # type: ignore[operator]
            for p in params:
                p.grad = None
        self.log_losses(self.total_loss(losses), losses, batch.size)
        with torch.no_grad():
            outputs = self.decode({k: v.detach() for k, v in feats.items()})
            self._update_metrics("train", outputs, batch)

    def on_train_epoch_end(self) -> None:
        # manual optimisation: Lightning leaves scheduler stepping to us
        if (sch := self.lr_schedulers()) is not None:
            sch.step()  # type: ignore[union-attr]
