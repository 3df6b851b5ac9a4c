"""The manual gradient step, and the one place where gradients meet distributed training.

docs/methods.md sections 7 and 9. Per-objective gradients from ``torch.autograd.grad`` are
rank-local: DDP syncs only what ``backward()`` accumulates. So a step is: per-objective gradient
rows on every rank (:func:`objective_rows`), the moments estimator's rank-local sums
(:mod:`mmlearn.strategies.moments`), ONE all-reduce of all of them (:func:`reduce_sum`), the same
rule on every rank (:func:`combine`), and the result written to ``.grad`` (:func:`write_grads`).
Replicas then stay identical AND the result equals single-process training on the concatenated
batch. Every rank must call these functions the same number of times. No other module of mmlearn
calls :mod:`torch.distributed`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import Tensor, nn

from mmlearn.errors import MMLearnError
from mmlearn.gradients import Block, Rule

if TYPE_CHECKING:
    from mmlearn.batch import MultimodalBatch
    from mmlearn.strategies.multi_objective import MultiObjective


@dataclass
class ParamGroup:
    """Parameters that the same objectives reach, e.g. encoder m: ``["fused", m]``.

    ``boundary`` names the feature tensor (a key of the ``features`` given to
    :func:`objective_rows`) through which every objective reaches this group: encoder m's
    output. Rows for such a group are one vector-Jacobian product per objective from that
    tensor, instead of a backward pass from each loss.
    """

    name: str
    params: list[nn.Parameter]
    objectives: list[str]
    boundary: str | None = None

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params)


def validate_groups(
    groups: Sequence[ParamGroup], module: nn.Module, objectives: Sequence[str]
) -> None:
    """Every trainable parameter in exactly one group; every group's objectives known."""
    owner: dict[int, str] = {}
    for g in groups:
        unknown = sorted(set(g.objectives) - set(objectives))
        if unknown or not g.objectives:
            raise MMLearnError(f"group {g.name!r}: objectives {g.objectives} not in {objectives}")
        for p in g.params:
            if id(p) in owner:
                raise MMLearnError(f"a parameter is in groups {owner[id(p)]!r} and {g.name!r}")
            owner[id(p)] = g.name
    missing = [n for n, p in module.named_parameters() if p.requires_grad and id(p) not in owner]
    if missing:
        raise MMLearnError(f"trainable parameters in no group: {missing[:5]} ({len(missing)})")


def world_size() -> int:
    """The number of ranks (1 outside ``torch.distributed``)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def shutdown() -> None:
    """Destroy the process group after a run that ended normally on every rank.

    Lightning leaves it alive; at interpreter exit gloo's worker threads are then torn down with
    the interpreter, which now and then aborts a rank ("terminate called without an active
    exception", exit 134) after training succeeded. Not after an error: a rank that failed while
    others wait in a collective would hang here.
    """
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def sync_mean(x: Tensor) -> Tensor:
    """The mean over ranks of ``x`` (a copy; ``x`` itself on one rank). One all-reduce."""
    n = world_size()
    if n == 1:
        return x
    out = x.clone()
    dist.all_reduce(out)
    return out / n


class CPUSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are those of the batch over ALL ranks, on the CPU.

    torch's ``SyncBatchNorm`` runs on GPUs only (DDP refuses it on CPU modules), so under gloo
    a BatchNorm encoder would normalise each rank's share with its own statistics and 2 ranks
    would not train as 1 process on the doubled batch. Here the per-channel sums of ``x`` and
    ``x^2`` and the count are summed over ranks by one differentiable all-reduce (its backward
    all-reduces the gradients, as ``SyncBatchNorm``'s does); the biased batch variance
    normalises, the unbiased one updates the running variance, as in ``BatchNorm``. Outside
    training, or on one rank, it is plain BatchNorm. Input ``[B, C, *]``.
    """

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: Tensor) -> Tensor:
        if not (self.training and world_size() > 1):
            return super().forward(input)
        c = input.shape[1]
        dims = [0, *range(2, input.dim())]
        x = input.float()
        local = torch.cat([x.sum(dims), (x * x).sum(dims), x.new_full((1,), x.numel() / c)])
        total = dist_fn.all_reduce(local)
        n = total[-1]
        mean = total[:c] / n
        var = total[c : 2 * c] / n - mean * mean
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)  # type: ignore[union-attr,operator]
                if self.momentum is None:
                    factor = 1.0 / float(self.num_batches_tracked)  # type: ignore[arg-type]
                else:
                    factor = self.momentum
                unbiased = var * (n / (n - 1))
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)  # type: ignore[union-attr]
        shape = [1, c] + [1] * (input.dim() - 2)
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(input.dtype)


def sync_batchnorm(module: nn.Module, on_cuda: bool) -> nn.Module:
    """Replace every BatchNorm of ``module`` by one that uses the statistics of all ranks.

    ``SyncBatchNorm`` on CUDA, :class:`CPUSyncBatchNorm` on the CPU; the parameters are the same
    objects (so parameter groups and optimisers built from them stay valid), buffers copied.
    """
    if on_cuda:
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(
            child, (CPUSyncBatchNorm, nn.SyncBatchNorm)
        ):
            new = CPUSyncBatchNorm(
                child.num_features,
                child.eps,
                child.momentum,
                child.affine,
                child.track_running_stats,
            )
            if child.affine:
                new.weight, new.bias = child.weight, child.bias
            if child.track_running_stats:
                new.running_mean, new.running_var = child.running_mean, child.running_var
                new.num_batches_tracked = child.num_batches_tracked
            new.train(child.training)
            setattr(module, name, new)
        else:
            sync_batchnorm(child, on_cuda)
    return module


def reduce_sum(stats: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Sum every tensor of ``stats`` over ranks in ONE collective and split them back."""
    if world_size() == 1:
        return dict(stats)
    names = list(stats)
    dtype = stats[names[0]].dtype
    for n in names[1:]:
        dtype = torch.promote_types(dtype, stats[n].dtype)
    flat = torch.cat([stats[n].detach().to(dtype).flatten() for n in names])
    dist.all_reduce(flat)
    out, start = {}, 0
    for n in names:
        size = stats[n].numel()
        out[n] = flat[start : start + size].view_as(stats[n])
        start += size
    return out


def _zeros_if_none(grads: Sequence[Tensor | None], like: Sequence[Tensor]) -> list[Tensor]:
    return [torch.zeros_like(t) if g is None else g for g, t in zip(grads, like, strict=True)]


def _flat_into(out: Tensor, tensors: Sequence[Tensor]) -> None:
    # one copy of the gradients into their row (no intermediate flat tensor)
    torch.cat([t.reshape(-1) for t in tensors], out=out)


def _row_buffer(g: ParamGroup) -> Tensor:
    p = g.params[0]
    return torch.empty(len(g.objectives), g.numel, dtype=p.dtype, device=p.device)


def _group_split(
    features: Mapping[str, Tensor] | None, groups: Sequence[ParamGroup]
) -> tuple[Mapping[str, Tensor], list[ParamGroup], list[ParamGroup]]:
    """``(features, groups behind a boundary feature, groups reached directly)``."""
    features = features or {}
    behind = [g for g in groups if g.boundary is not None and g.boundary in features]
    direct = [g for g in groups if all(g is not b for b in behind)]
    return features, behind, direct


def _heads_pass(
    losses: Mapping[str, Tensor],
    direct: Sequence[ParamGroup],
    behind: Sequence[ParamGroup],
    features: Mapping[str, Tensor],
    rows: dict[str, Tensor],
) -> dict[str, dict[str, Tensor]]:
    """Rows of the directly reached groups into ``rows``; the boundary gradients returned."""
    at_boundary: dict[str, dict[str, Tensor]] = {g.name: {} for g in behind}
    for k, loss in losses.items():
        reached = [g for g in direct if k in g.objectives]
        through = [g for g in behind if k in g.objectives]
        params = [p for g in reached for p in g.params]
        inputs = [*params, *(features[str(g.boundary)] for g in through)]
        if not inputs:
            continue
        got = _zeros_if_none(
            torch.autograd.grad(loss, inputs, retain_graph=True, allow_unused=True), inputs
        )
        start = 0
        for g in reached:
            _flat_into(rows[g.name][g.objectives.index(k)], got[start : start + len(g.params)])
            start += len(g.params)
        for i, g in enumerate(through):
            at_boundary[g.name][k] = got[len(params) + i]
    return at_boundary


def objective_rows(
    losses: Mapping[str, Tensor],
    groups: Sequence[ParamGroup],
    features: Mapping[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """``{group: [n_objectives, P_group]}``: each objective's gradient on each group it reaches.

    Two stages. First, one ``autograd.grad`` per objective over the parameters it reaches
    directly (heads, fusion) and over the boundary features of the groups behind one (encoder
    outputs): a backward through the heads only. Second, per boundary group, one
    vector-Jacobian product per objective from its features into its parameters (batched with
    ``is_grads_batched`` on CUDA; a loop on the CPU, where batching measured no faster). So the
    encoders are back-propagated once per objective that reaches them, never once per objective
    for the whole model. Each gradient is copied once, straight into its row.
    """
    features, behind, direct = _group_split(features, groups)
    rows = {g.name: _row_buffer(g) for g in groups}
    at_boundary = _heads_pass(losses, direct, behind, features, rows)
    for g in behind:
        feats = features[str(g.boundary)]
        grads_out = [at_boundary[g.name][k] for k in g.objectives]
        _vjp_rows(feats, g.params, grads_out, rows[g.name])
    return rows


def combined_rows(
    losses: Mapping[str, Tensor],
    groups: Sequence[ParamGroup],
    features: Mapping[str, Tensor],
    coefficients: Mapping[str, Tensor],
) -> dict[str, Tensor]:
    """``{group: [P]}`` = ``sum_k c_{g,k} row_{g,k}`` without forming the encoders' rows.

    For weights that are one scalar per objective (``coefficients[g] [n_g]``) the combination is
    linear, so each encoder needs ONE vector-Jacobian product, of ``sum_k c_k dL_k/df``: a
    plain backward's cost. Used between recomputations (``every > 1``).
    """
    features, behind, direct = _group_split(features, groups)
    rows = {g.name: _row_buffer(g) for g in direct}
    at_boundary = _heads_pass(losses, direct, behind, features, rows)
    out = {g.name: coefficients[g.name].to(rows[g.name].dtype) @ rows[g.name] for g in direct}
    for g in behind:
        c = coefficients[g.name]
        v = sum(c[i] * at_boundary[g.name][k] for i, k in enumerate(g.objectives))
        buf = torch.empty(1, g.numel, dtype=g.params[0].dtype, device=g.params[0].device)
        _vjp_rows(features[str(g.boundary)], g.params, [v], buf)  # type: ignore[list-item]
        out[g.name] = buf[0]
    return out


def _vjp_rows(
    feats: Tensor, params: list[nn.Parameter], grads_out: list[Tensor], out: Tensor
) -> None:
    """Row k of ``out [n, P]`` = ``d<feats, v_k>/d params`` for every ``v_k`` in ``grads_out``."""
    if feats.is_cuda and len(grads_out) > 1:
        try:
            got = torch.autograd.grad(
                feats,
                params,
                torch.stack(grads_out),
                retain_graph=True,
                allow_unused=True,
                is_grads_batched=True,
            )
            for i in range(len(grads_out)):
                _flat_into(
                    out[i],
                    [
                        torch.zeros_like(p) if g is None else g[i]
                        for g, p in zip(got, params, strict=True)
                    ],
                )
            return
        except RuntimeError:  # an operator without a batching rule (vmap): loop instead
            pass
    for i, v in enumerate(grads_out):
        got = torch.autograd.grad(feats, params, v, retain_graph=True, allow_unused=True)
        _flat_into(out[i], _zeros_if_none(got, params))


def write_grads(groups: Sequence[ParamGroup], combined: Mapping[str, Tensor]) -> None:
    """Make each group's combined row its parameters' ``.grad`` (views of the row, no copy)."""
    for g in groups:
        start = 0
        for p in g.params:
            p.grad = combined[g.name][start : start + p.numel()].view_as(p).to(p.dtype)
            start += p.numel()


def combine(
    rule: Rule,
    groups: Sequence[ParamGroup],
    rows: Mapping[str, Tensor],
    var: Mapping[str, Tensor] | None,
    objectives: Sequence[str],
    weights: Mapping[str, Tensor] | None = None,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Apply ``rule`` to every group: ``({group: row [P]}, {group: weights})``.

    With ``weights`` (from an earlier step, ``every > 1``) the rule only re-applies them.
    """
    if weights is not None:
        out = {g.name: rule.apply(rows[g.name], weights[g.name]) for g in groups}
        return out, dict(weights)
    blocks = [
        Block(
            rows[g.name],
            tuple(objectives.index(k) for k in g.objectives),
            None if var is None else var[g.name],
            tuple(p.numel() for p in g.params),
        )
        for g in groups
    ]
    done = rule.combine(blocks)
    return (
        {g.name: row for g, (row, _) in zip(groups, done, strict=True)},
        {g.name: w for g, (_, w) in zip(groups, done, strict=True)},
    )


class ManualStep:
    """One manual optimisation step of a :class:`~mmlearn.strategies.MultiObjective`.

    rows x moments x rule: the moments estimator computes the rows and its rank-local sums,
    :meth:`sync` all-reduces them in one collective, the estimator turns the sums into rows and
    variances, the rule combines them (or re-applies its last weights between recomputations),
    and the rows are written into ``.grad``. The tests subclass :meth:`sync` and
    :meth:`finalize` to build deliberately wrong (rank-local) variants.
    """

    def sync(self, stats: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The sums over ranks of the estimator's rank-local statistics: one collective."""
        return reduce_sum(stats)

    def finalize(self, combined: dict[str, Tensor]) -> dict[str, Tensor]:
        """The combined rows as written to ``.grad`` (hook for the tests' wrong variants)."""
        return combined

    def __call__(self, model: MultiObjective, batch: MultimodalBatch) -> dict[str, Any]:
        """Compute and write the gradients; returns what the strategy logs."""
        cached = model.cached_weights
        if cached is not None and model.global_step % model.every != 0:
            coefficients = {g.name: model.rule.coefficients(cached[g.name]) for g in model.groups}
            if model.moments.linear and all(c is not None for c in coefficients.values()):
                return self._reuse(model, batch, coefficients)  # type: ignore[arg-type]
        else:
            cached = None
        outputs, losses, stats = model.moments.local(model, batch)
        rows, var = model.moments.finish(self.sync(stats), world_size())
        combined, weights = combine(
            model.rule, model.groups, rows, var, model.objective_names, cached
        )
        model.cached_weights = weights
        write_grads(model.groups, self.finalize(combined))
        return {"outputs": outputs, "losses": losses, "rows": rows, "weights": weights}

    def _reuse(
        self, model: MultiObjective, batch: MultimodalBatch, coefficients: dict[str, Tensor]
    ) -> dict[str, Any]:
        """Between recomputations of scalar weights: one backward's cost, no rows."""
        outputs, losses, feats = model.objective_graph(batch.inputs, batch.target)
        local = combined_rows(losses, model.groups, feats, coefficients)
        world = world_size()
        summed = self.sync({f"c:{k}": v for k, v in local.items()})
        combined = {k[2:]: v if world == 1 else v / world for k, v in summed.items()}
        write_grads(model.groups, self.finalize(combined))
        return {"outputs": outputs, "losses": losses, "rows": {}, "weights": model.cached_weights}
