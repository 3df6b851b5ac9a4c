"""The one place where gradients meet distributed training (METHODS.md section 7).

Per-objective gradients from ``torch.autograd.grad`` are rank-local: DDP syncs only what
``backward()`` accumulates. So the step is: per-objective gradient rows on every rank, ONE
all-reduce of the rows (or of the statistics the rule needs), the same rule on every rank, write
``.grad``. Replicas then stay identical AND the result equals single-process training on the
concatenated batch. Every rank must call these functions the same number of times.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from mmlearn.errors import MMLearnError
from mmlearn.gradients import Rule


@dataclass
class ParamGroup:
    """Parameters that the same objectives reach, e.g. encoder m: ``["fused", m]``."""

    name: str
    params: list[nn.Parameter]
    objectives: list[str]

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params)


def validate_groups(groups: Sequence[ParamGroup], module: nn.Module, objectives: Sequence[str]):
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
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_(flat: Tensor, mean: bool = True) -> Tensor:
    """In-place all-reduce (sum, or mean over ranks) of one flat buffer; a no-op on one rank."""
    n = world_size()
    if n > 1:
        dist.all_reduce(flat)
        if mean:
            flat /= n
    return flat


def objective_rows(losses: Mapping[str, Tensor], groups: Sequence[ParamGroup]) -> dict[str, Tensor]:
    """``{group: [n_objectives, P_group]}``: each objective's gradient on each group it reaches.

    One ``autograd.grad`` per objective, over exactly the parameters that objective reaches,
    so a unimodal loss back-propagates through its own encoder only.
    """
    per_group: dict[str, dict[str, Tensor]] = {g.name: {} for g in groups}
    for k, loss in losses.items():
        reached = [g for g in groups if k in g.objectives]
        params = [p for g in reached for p in g.params]
        got = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        flat = [
            (torch.zeros_like(p) if gr is None else gr).flatten()
            for p, gr in zip(params, got, strict=True)
        ]
        start = 0
        for g in reached:
            per_group[g.name][k] = torch.cat(flat[start : start + len(g.params)])
            start += len(g.params)
    return {g.name: torch.stack([per_group[g.name][k] for k in g.objectives]) for g in groups}


def reduce_rows(rows: Mapping[str, Tensor], mean: bool = True) -> dict[str, Tensor]:
    """All-reduce every group's rows in ONE collective and split them back."""
    names = list(rows)
    flat = all_reduce_(torch.cat([rows[n].flatten() for n in names]), mean=mean)
    out, start = {}, 0
    for n in names:
        size = rows[n].numel()
        out[n] = flat[start : start + size].view_as(rows[n])
        start += size
    return out


def write_grads(groups: Sequence[ParamGroup], combined: Mapping[str, Tensor]) -> None:
    """Write each group's combined row into its parameters' ``.grad``."""
    for g in groups:
        start = 0
        for p in g.params:
            chunk = combined[g.name][start : start + p.numel()].view_as(p).to(p.dtype)
            p.grad = chunk.clone() if p.grad is None else p.grad.copy_(chunk)
            start += p.numel()


def combine(
    rule: Rule,
    groups: Sequence[ParamGroup],
    rows: Mapping[str, Tensor],
    var: Mapping[str, Tensor] | None = None,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Apply ``rule`` to every group: ``({group: row [P]}, {group: weights})``."""
    out, weights = {}, {}
    for g in groups:
        out[g.name], weights[g.name] = rule.combine(
            rows[g.name], g.name, None if var is None else var[g.name]
        )
    return out, weights
