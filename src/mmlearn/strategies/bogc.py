"""BOGC: Bayesian-oriented gradient calibration of the fused and unimodal objectives."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from mmlearn.batch import MultimodalBatch
from mmlearn.errors import MMLearnError
from mmlearn.gradients import BOGCCalibration
from mmlearn.strategies import _jacobian as jac
from mmlearn.strategies.base import FUSED
from mmlearn.strategies.multi_objective import MultiObjective

VARIANCES = ("ema", "microbatch", "last_layer")


def last_layer_moments(
    h: Tensor, logits: Tensor, target: Tensor, multilabel: bool = False
) -> tuple[Tensor, Tensor]:
    """Sums over samples of the per-sample CE gradients of a linear layer, and of their squares.

    For ``z = W h + b`` the per-sample gradient is ``outer(p - onehot(y), [h, 1])`` (multi-label:
    ``(sigmoid(z) - y) / K``, the gradient of the per-sample mean binary CE), so
    ``sum_i g_i = R^T H1`` and ``sum_i g_i^2 = (R^2)^T (H1^2)`` with ``R = p - onehot(y)``
    ``[N, K]`` and ``H1 = [h, 1]`` ``[N, d+1]``: one extra matmul, no per-sample tensors.

    Returns:
        ``(sum_g [K, d+1], sum_g2 [K, d+1])``.
    """
    if multilabel:
        r = (torch.sigmoid(logits.detach().float()) - target.float()) / logits.shape[-1]
    else:
        r = torch.softmax(logits.detach().float(), -1)
        r[torch.arange(len(target)), target] -= 1
    h1 = torch.cat([h.detach().float(), h.new_ones(h.shape[0], 1, dtype=torch.float32)], 1)
    return r.T @ h1, (r * r).T @ (h1 * h1)


class BOGC(MultiObjective):
    """Per-dimension calibration of each encoder's fused and unimodal gradients.

    Guo et al., "Multi-Modal Learning with Bayesian-Oriented Gradient Calibration", arXiv
    2505.23071 (METHODS.md section 5, our reconstruction): the variance of every objective's
    gradient gives per-dimension precision -> evidence -> reduced Dempster-Shafer fusion ->
    weights ``w_k = b_k + u/n``; the update is ``n * sum_k w_k mu_k`` (equal variances: the plain
    sum). See :mod:`mmlearn.gradients.bogc` for the rule.

    Args:
        variance: ``"ema"`` (default; moving moments of each objective's gradient over steps, no
            extra backward), ``"microbatch"`` (the batch split into ``n_chunks``, one gradient per
            chunk, their mean and variance: ``n_chunks`` forward/backward passes) or
            ``"last_layer"`` (the per-sample gradient variance of each objective's last linear
            layer in closed form, see :func:`last_layer_moments`, averaged to one variance per
            objective and used for every dimension of the encoders it reaches: a scalar
            precision per objective; our reconstruction of the paper's last-layer posterior).
        beta: EMA decay (``ema``).
        n_chunks: chunks per step over ALL ranks (``microbatch``); must divide by the world size,
            and each rank's batch by ``n_chunks / world_size``.
        eps: added to the variance before inverting.
        e_max: evidence cap.
        **kwargs: see :class:`MultiObjective` (``clip_grad_norm``) and
            :class:`~mmlearn.strategies.base.MultimodalModule`.

    Cost: per step, the fused backward plus one backward through each encoder for its unimodal
    row (``ema``, ``last_layer``), times ``n_chunks`` for ``microbatch``.
    """

    def __init__(
        self,
        variance: str = "ema",
        beta: float = 0.9,
        n_chunks: int = 4,
        eps: float = 1e-8,
        e_max: float = 1e3,
        **kwargs: Any,
    ) -> None:
        if variance not in VARIANCES:
            raise MMLearnError(f"BOGC: variance={variance!r}; expected one of {list(VARIANCES)}")
        if variance == "microbatch" and n_chunks < 2:
            raise MMLearnError(f"BOGC: n_chunks={n_chunks}; the microbatch variance needs >= 2")
        kwargs["rule"] = BOGCCalibration(beta=beta, eps=eps, e_max=e_max)
        super().__init__(**kwargs)
        self.variance, self.n_chunks = variance, n_chunks
        self._last_inputs: dict[str, Tensor] = {}
        if variance == "last_layer":
            for k in [FUSED, *self.modalities]:
                self.last_linear(k).register_forward_hook(self._capture(k))

    def last_linear(self, objective: str) -> nn.Linear:
        """The final linear layer of ``objective``'s head."""
        head = self.joint.head if objective == FUSED else self.heads[objective]
        return [m for m in head.modules() if isinstance(m, nn.Linear)][-1]

    def _capture(self, objective: str):
        def hook(module: nn.Module, args: tuple[Tensor, ...], out: Tensor) -> None:
            self._last_inputs[objective] = args[0]

        return hook

    def gradient_statistics(self, batch: MultimodalBatch):
        if self.variance == "microbatch":
            return self._microbatch_statistics(batch)
        if self.variance == "last_layer":
            return self._last_layer_statistics(batch)
        return super().gradient_statistics(batch)  # ema: the rule keeps the moments

    def _microbatch_statistics(self, batch: MultimodalBatch):
        world = jac.world_size()
        local = self.n_chunks // world
        if local * world != self.n_chunks or batch.size % local:
            raise MMLearnError(
                f"BOGC: n_chunks={self.n_chunks} does not split {world} rank(s) x batch "
                f"{batch.size} into equal chunks"
            )
        size = batch.size // local
        total: dict[str, Tensor] = {}
        squares: dict[str, Tensor] = {}
        outs: list[dict[str, Tensor]] = []
        loss_sum: dict[str, Tensor] = {}
        for c in range(local):
            part = slice(c * size, (c + 1) * size)
            outputs = self({m: x[part] for m, x in batch.inputs.items()})
            losses = self.objectives(outputs, batch.target[part])
            rows = jac.objective_rows(losses, self.groups)
            for g, r in rows.items():
                total[g] = total.get(g, 0) + r
                squares[g] = squares.get(g, 0) + r * r
            outs.append({k: v.detach() for k, v in outputs.items()})
            for k, v in losses.items():
                loss_sum[k] = loss_sum.get(k, 0) + v.detach() / local
        # ONE collective for both moments of every group
        moments = jac.reduce_rows(
            {
                **{f"s:{g}": t for g, t in total.items()},
                **{f"q:{g}": q for g, q in squares.items()},
            },
            mean=False,
        )
        n = self.n_chunks
        mean = {g: moments[f"s:{g}"] / n for g in total}
        var = {g: (moments[f"q:{g}"] / n - mean[g] ** 2).clamp_min(0) * n / (n - 1) for g in total}
        outputs = {k: torch.cat([o[k] for o in outs]) for k in outs[0]}
        return outputs, loss_sum, mean, var

    def _last_layer_statistics(self, batch: MultimodalBatch):
        outputs = self(batch.inputs)
        losses = self.objectives(outputs, batch.target)
        rows = jac.objective_rows(losses, self.groups)
        stats = {f"row:{g}": r for g, r in rows.items()}
        for k in losses:
            s1, s2 = last_layer_moments(
                self._last_inputs[k], outputs[k], batch.target, self.multilabel
            )
            stats |= {f"s1:{k}": s1, f"s2:{k}": s2}
        stats["n"] = torch.tensor([float(batch.size)], device=batch.target.device)
        stats = jac.reduce_rows(stats)  # ONE collective: rows and per-sample moments
        n = stats["n"]
        var_k = {
            k: (stats[f"s2:{k}"] / n - (stats[f"s1:{k}"] / n) ** 2).clamp_min(0).mean()
            for k in losses
        }
        mean = {g: stats[f"row:{g}"] for g in rows}
        var = {
            g.name: torch.stack([var_k[k].expand(g.numel) for k in g.objectives])
            for g in self.groups
        }
        return outputs, losses, mean, var
