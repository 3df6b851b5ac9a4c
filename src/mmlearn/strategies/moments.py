"""Moments estimators: each objective's gradient rows and, where it can, their variance.

The second factor of the manual step (rows x moments x rule, docs/methods.md section 9). An
estimator is chosen on the CLI by class like any LightningCLI argument
(``--model.moments=EMAMoments --model.moments.beta=0.99``). It computes this rank's
forward pass and rows and returns RANK-LOCAL SUMS; the step all-reduces them in one collective
and hands them back to :meth:`Moments.finish`, which every rank runs identically. State (EMA)
lives in module buffers, so Lightning checkpoints it and moves it between devices.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from mmlearn.errors import MMLearnError
from mmlearn.likelihood import likelihood
from mmlearn.strategies import step

if TYPE_CHECKING:
    from mmlearn.batch import MultimodalBatch
    from mmlearn.strategies.multi_objective import MultiObjective

Local = tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Tensor]]
Finished = tuple[dict[str, Tensor], dict[str, Tensor] | None]


class Moments(nn.Module):
    """Base estimator: ``local`` (rank-local sums) then ``finish`` (rows, variance).

    ``local(model, batch) -> (outputs, losses, stats)``: the forward outputs and objective
    losses of this rank's batch, and the tensors to be SUMMED over ranks. ``finish(stats, world)
    -> (rows, var)``: ``{group: [n, P]}`` mean rows and per-dimension variances (``None`` when
    the estimator gives none).
    """

    #: whether :meth:`finish` gives a per-dimension variance
    gives_variance: bool = False
    #: stateless, and its rows are this step's batch gradients (a step may skip it)
    linear: bool = False

    def bind(self, model: MultiObjective) -> None:
        """Check the model and create any state; called once by the strategy's constructor."""

    def local(self, model: MultiObjective, batch: MultimodalBatch) -> Local:
        raise NotImplementedError

    def finish(self, stats: dict[str, Tensor], world: int) -> Finished:
        raise NotImplementedError


def _rows_local(model: MultiObjective, batch: MultimodalBatch) -> Local:
    outputs, losses, feats = model.objective_graph(batch.inputs, batch.target)
    rows = step.objective_rows(losses, model.groups, feats)
    return outputs, losses, {f"row:{g}": r for g, r in rows.items()}


def _mean_rows(stats: dict[str, Tensor], world: int) -> dict[str, Tensor]:
    # each rank's rows are batch means: their mean over ranks is the whole batch's gradient
    return {k[4:]: v if world == 1 else v / world for k, v in stats.items() if k[:4] == "row:"}


class BatchRows(Moments):
    """This step's rows, averaged over ranks; no variance (``Sum``, ``MGDA``).

    Stateless and linear in the rows, so between recomputations of a rule's scalar weights
    (``every > 1``) the step can skip the rows altogether.
    """

    linear = True

    def local(self, model: MultiObjective, batch: MultimodalBatch) -> Local:
        return _rows_local(model, batch)

    def finish(self, stats: dict[str, Tensor], world: int) -> Finished:
        return _mean_rows(stats, world), None


class EMAMoments(Moments):
    """Exponentially weighted moments of every objective's rows over steps (BOGC's default).

    ``mu`` is this step's rows; the variance is the bias-corrected weighted variance of the
    history (decay ``beta``), by the weighted Welford recursion (West, 1979):
    ``S_t = beta S + 1``, ``m_t = m + (g - m) / S_t``, ``M2_t = beta M2 + (g - m)(g - m_t)``,
    ``var = M2_t / S_t``. Forming ``E[g^2] - E[g]^2`` directly cancels catastrophically where the
    gradient is consistent (variance << g^2). The first step has zero variance everywhere.
    Buffers (float32, also under bf16-mixed): ``mean_i``, ``m2_i`` ``[n_i, P_i]`` for every
    group i reached by more than one objective, and ``weight`` (``S_t``). No extra backward.

    Args:
        beta: decay, ``0 <= beta < 1``.
    """

    gives_variance = True

    def __init__(self, beta: float = 0.9) -> None:
        super().__init__()
        if not 0 <= beta < 1:
            raise MMLearnError(f"EMAMoments: beta={beta}; expected 0 <= beta < 1")
        self.beta = beta
        self.tracked: list[str] = []
        self.register_buffer("weight", torch.zeros((), dtype=torch.float32))

    def bind(self, model: MultiObjective) -> None:
        self.tracked = [g.name for g in model.groups if len(g.objectives) > 1]
        for i, g in enumerate(model.groups):
            if len(g.objectives) > 1:
                shape = (len(g.objectives), g.numel)
                self.register_buffer(f"mean_{i}", torch.zeros(shape, dtype=torch.float32))
                self.register_buffer(f"m2_{i}", torch.zeros(shape, dtype=torch.float32))
        self.index = {g.name: i for i, g in enumerate(model.groups)}

    def local(self, model: MultiObjective, batch: MultimodalBatch) -> Local:
        return _rows_local(model, batch)

    def finish(self, stats: dict[str, Tensor], world: int) -> Finished:
        rows = _mean_rows(stats, world)
        weight: Tensor = self.weight  # type: ignore[assignment]
        weight.mul_(self.beta).add_(1.0)
        s = float(weight)
        var = {}
        for name, r in rows.items():
            if name not in self.tracked:
                var[name] = torch.zeros_like(r)
                continue
            i = self.index[name]
            mean, m2 = getattr(self, f"mean_{i}"), getattr(self, f"m2_{i}")
            delta = r.float() - mean
            mean.add_(delta, alpha=1.0 / s)
            # g - m_t = delta (1 - 1/S_t): M2_t = beta M2 + (1 - 1/S_t) delta^2, one pass
            m2.mul_(self.beta).addcmul_(delta, delta, value=1.0 - 1.0 / s)
            var[name] = m2 / s
        return rows, var


def _refuse_batchnorm(model: nn.Module, who: str) -> None:
    for name, mod in model.named_modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            raise MMLearnError(
                f"{who}: {name} ({type(mod).__name__}) normalises each chunk with the chunk's own "
                "statistics, so the chunk gradients are not samples of the batch gradient (and "
                "its running statistics would move once per chunk); use EMAMoments or LastLayer, "
                "or an encoder without BatchNorm"
            )


class Microbatch(Moments):
    """Within-batch moments: the batch split into ``n_chunks`` equal chunks over ALL ranks.

    One gradient per chunk; their mean is the batch gradient and their sample variance
    (``n / (n - 1)`` corrected) the per-dimension variance. Costs ``n_chunks`` forward and
    backward passes per step. Refused for models with BatchNorm layers (each chunk would
    normalise with its own statistics; the error names the layer).

    Args:
        n_chunks: chunks per step over all ranks; must divide by the world size, and each
            rank's batch by ``n_chunks / world_size``.
    """

    gives_variance = True

    def __init__(self, n_chunks: int = 4) -> None:
        super().__init__()
        if n_chunks < 2:
            raise MMLearnError(f"Microbatch: n_chunks={n_chunks}; the variance needs >= 2")
        self.n_chunks = n_chunks

    def bind(self, model: MultiObjective) -> None:
        _refuse_batchnorm(model, "Microbatch moments")

    def local(self, model: MultiObjective, batch: MultimodalBatch) -> Local:
        world = step.world_size()
        local = self.n_chunks // world
        if local * world != self.n_chunks or batch.size % local:
            raise MMLearnError(
                f"Microbatch: n_chunks={self.n_chunks} does not split {world} rank(s) x batch "
                f"{batch.size} into equal chunks"
            )
        size = batch.size // local
        stats: dict[str, Tensor] = {}
        outs: list[dict[str, Tensor]] = []
        loss_sum: dict[str, Tensor] = {}
        for c in range(local):
            part = slice(c * size, (c + 1) * size)
            inputs = {m: x[part] for m, x in batch.inputs.items()}
            outputs, losses, feats = model.objective_graph(inputs, batch.target[part])
            for g, r in step.objective_rows(losses, model.groups, feats).items():
                # float64 sums: q/n - mean^2 cancels where the chunks agree, and in float32 one
                # rounding of the sums (their order differs with the number of ranks) moved
                # BOGC's weights by 1e-4
                r64 = r.double()
                if c == 0:
                    stats[f"s:{g}"], stats[f"q:{g}"] = r64, r64 * r64
                else:
                    stats[f"s:{g}"] = stats[f"s:{g}"].add_(r64)
                    stats[f"q:{g}"] = stats[f"q:{g}"].addcmul_(r64, r64)
            outs.append({k: v.detach() for k, v in outputs.items()})
            for k, v in losses.items():
                loss_sum[k] = loss_sum.get(k, 0) + v.detach() / local
        outputs = {k: torch.cat([o[k] for o in outs]) for k in outs[0]}
        return outputs, loss_sum, stats

    def finish(self, stats: dict[str, Tensor], world: int) -> Finished:
        n = self.n_chunks
        groups = [k[2:] for k in stats if k[:2] == "s:"]
        mean = {g: stats[f"s:{g}"] / n for g in groups}
        var = {
            g: ((stats[f"q:{g}"] / n - mean[g] ** 2).clamp_min(0) * (n / (n - 1))).float()
            for g in groups
        }
        return {g: m.float() for g, m in mean.items()}, var


def last_layer_moments(
    h: Tensor, logits: Tensor, target: Tensor, multilabel: bool = False
) -> tuple[Tensor, Tensor]:
    """Sums over samples of the per-sample CE gradients of a linear layer, and of their squares.

    For ``z = W h + b`` the per-sample gradient is ``outer(r_i, [h_i, 1])`` with ``r_i = dL_i/dz_i``
    the likelihood's residual (:meth:`~mmlearn.likelihood.Likelihood.residual`: ``p - onehot(y)``;
    multi-label ``(sigmoid(z) - y) / K``, the gradient of the per-sample mean binary CE), so
    ``sum_i g_i = R^T H1`` and ``sum_i g_i^2 = (R^2)^T (H1^2)`` with ``R`` ``[N, K]`` and
    ``H1 = [h, 1]`` ``[N, d+1]``: one extra matmul, no per-sample tensors.

    Args:
        h: the layer's input ``[N, d]``.
        logits: its output ``[N, K]``.
        target: class indices ``[N]``, or multi-hot ``[N, K]`` when ``multilabel``.
        multilabel: the likelihood (:func:`mmlearn.likelihood.likelihood`).

    Returns:
        ``(sum_g [K, d+1], sum_g2 [K, d+1])``, float32.
    """
    r = likelihood(multilabel).residual(logits.detach(), target)
    h1 = torch.cat([h.detach().float(), h.new_ones(h.shape[0], 1, dtype=torch.float32)], 1)
    return r.T @ h1, (r * r).T @ (h1 * h1)


class LastLayer(Moments):
    """Per-sample gradient variance of each objective's last linear layer, in closed form.

    :func:`last_layer_moments` gives the per-sample variance of the last layer's gradient;
    its mean over the layer's entries is one variance per objective, used for every dimension
    of the groups the objective reaches (a scalar precision per objective: our reconstruction
    of the paper's last-layer posterior). One forward and the rows' backward, no extra pass.
    """

    gives_variance = True

    def bind(self, model: MultiObjective) -> None:
        self._inputs: dict[str, Tensor] = {}
        self._groups = [(g.name, list(g.objectives), g.numel) for g in model.groups]
        for k in model.objective_names:
            model.last_linear(k).register_forward_hook(self._capture(k))

    def _capture(self, objective: str):  # type: ignore[no-untyped-def]
        def hook(module: nn.Module, args: tuple[Tensor, ...], out: Tensor) -> None:
            self._inputs[objective] = args[0]

        return hook

    def local(self, model: MultiObjective, batch: MultimodalBatch) -> Local:
        outputs, losses, stats = _rows_local(model, batch)
        for k in losses:
            s1, s2 = last_layer_moments(self._inputs[k], outputs[k], batch.target, model.multilabel)
            stats |= {f"s1:{k}": s1, f"s2:{k}": s2}
        stats["n"] = torch.tensor([float(batch.size)], device=batch.target.device)
        return outputs, losses, stats

    def finish(self, stats: dict[str, Tensor], world: int) -> Finished:
        n = stats["n"]
        var_k = {
            k[3:]: (stats[k.replace("s1:", "s2:")] / n - (stats[k] / n) ** 2).clamp_min(0).mean()
            for k in stats
            if k[:3] == "s1:"
        }
        var = {
            name: torch.stack([var_k[k].expand(numel) for k in objectives])
            for name, objectives, numel in self._groups
        }
        return _mean_rows(stats, world), var
