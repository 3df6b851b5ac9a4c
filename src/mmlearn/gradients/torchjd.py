"""Every aggregator of the torchjd library as a combining rule (docs/methods.md section 9).

Quinton and Rey, "Jacobian Descent for Multi-Objective Optimization", arXiv 2406.16232: the
objectives' gradients are the rows of a Jacobian ``J [n, P]``, and an *aggregator* maps ``J`` to one
update ``[P]`` (UPGrad, their proposal, and the methods they compare with: MGDA, PCGrad, IMTL-G,
Aligned-MTL, CAGrad, Nash-MTL, ...). torchjd (https://github.com/TorchJD/torchjd) implements them;
:class:`TorchJD` hands them the rows the manual step has already averaged over ranks, so each one
becomes a rule that is exact under DDP.

torchjd is an optional dependency, imported only when a :class:`TorchJD` rule is built.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import importlib.util
from collections.abc import Iterator, Mapping, Sequence
from types import ModuleType
from typing import Any

import torch
from torch import Tensor, nn

from mmlearn.errors import MMLearnError
from mmlearn.gradients.base import Block, Rule, ones
from mmlearn.gradients.mgda import gramian

#: how to install what the rule needs (the PyPI name of mmlearn is mmlearn-lightning)
INSTALL_HINT = (
    "install the 'torchjd' extra: pip install 'mmlearn-lightning[torchjd]' "
    "(in a checkout: pip install -e '.[torchjd]')"
)
#: the modules the default aggregator (UPGrad: a quadratic program per objective) needs
DEFAULT_MODULES = ("torchjd", "qpsolvers", "quadprog")
SCOPES = ("global", "shared", "per_group")
_MASK64 = (1 << 64) - 1


def available() -> bool:
    """Whether torchjd and the solver of the default aggregator are installed (none imported)."""
    return all(importlib.util.find_spec(name) is not None for name in DEFAULT_MODULES)


def _aggregation() -> ModuleType:
    """``torchjd.aggregation``, or an :class:`MMLearnError` saying how to install it."""
    try:
        return importlib.import_module("torchjd.aggregation")
    except ImportError as e:
        raise MMLearnError(
            f"TorchJD: the torchjd library is not installed ({e}); {INSTALL_HINT}"
        ) from e


def _abstract(agg: ModuleType) -> set[type]:
    return {agg.Aggregator, agg.WeightedAggregator, agg.GramianWeightedAggregator}


def aggregator_names() -> list[str]:
    """The names of torchjd's aggregators (``torchjd.aggregation``), e.g. ``UPGrad``, sorted."""
    agg = _aggregation()
    classes = {name: getattr(agg, name) for name in agg.__all__}
    return sorted(
        name
        for name, cls in classes.items()
        if isinstance(cls, type) and issubclass(cls, agg.Aggregator) and cls not in _abstract(agg)
    )


def _key(name: str) -> str:
    # "IMTL-G", "imtl_g" and "IMTLG" name the same class
    return name.lower().replace("-", "").replace("_", "")


def _class_named(name: str, agg: ModuleType) -> type:
    """The aggregator class ``name`` names: torchjd's by name (any case, '-' and '_' ignored),
    with or without ``torchjd.aggregation.``, or any importable ``module.Class``."""
    valid = aggregator_names()
    short = name.removeprefix("torchjd.aggregation.")
    if "." in short:
        module, _, attr = short.rpartition(".")
        try:
            found = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise MMLearnError(
                f"TorchJD: aggregator={name!r} cannot be imported ({e}); expected one of {valid} "
                "or the class path of a torchjd Aggregator"
            ) from e
        if not (isinstance(found, type) and issubclass(found, agg.Aggregator)):
            raise MMLearnError(
                f"TorchJD: aggregator={name!r} is not a torchjd Aggregator; expected one of {valid}"
            )
        return found
    matches = [n for n in valid if _key(n) == _key(short)]
    if len(matches) != 1:
        raise MMLearnError(f"TorchJD: unknown aggregator {name!r}; expected one of {valid}")
    cls: type = getattr(agg, matches[0])
    return cls


def resolve(aggregator: nn.Module | type | str | Mapping[str, Any]) -> nn.Module:
    """A torchjd ``Aggregator`` instance from an instance, a class, a name or a class spec.

    A spec ``{class_path: torchjd.aggregation.CAGrad, init_args: {c: 0.5}}`` (what a config
    writes) is built here, not by the CLI, so that a missing torchjd, a misspelt class or a
    missing optional solver is an error saying how to fix it. A class or a name is built with
    its default arguments; one that needs arguments
    (``TrimmedMean(trim_number)``, ``Krum(n_byzantine)``, ``CAGrad(c)``, ...) is refused with
    how to give them, one whose optional solver is missing with torchjd's install hint.
    """
    agg = _aggregation()
    valid = aggregator_names()
    init_args: Mapping[str, Any] = {}
    if isinstance(aggregator, Mapping):
        unknown = sorted(set(aggregator) - {"class_path", "init_args"})
        if "class_path" not in aggregator or unknown:
            raise MMLearnError(
                f"TorchJD: aggregator={dict(aggregator)!r}; expected a name or "
                "{class_path: torchjd.aggregation.<Name>, init_args: {...}}"
            )
        init_args = aggregator.get("init_args") or {}
        aggregator = str(aggregator["class_path"])
    if isinstance(aggregator, str):
        aggregator = _class_named(aggregator, agg)
    if isinstance(aggregator, type):
        if not issubclass(aggregator, agg.Aggregator) or aggregator in _abstract(agg):
            raise MMLearnError(
                f"TorchJD: aggregator={aggregator.__name__} is not a torchjd aggregator; "
                f"expected one of {valid}"
            )
        name = aggregator.__name__
        path = f"torchjd.aggregation.{name}" if name in valid else aggregator.__qualname__
        try:
            aggregator = aggregator(**init_args)
        except ImportError as e:
            raise MMLearnError(
                f"TorchJD: {name} needs an optional solver: {e} (UPGrad's and DualProj's come "
                f"with mmlearn's extra: {INSTALL_HINT})"
            ) from e
        except TypeError as e:
            if init_args:
                raise MMLearnError(
                    f"TorchJD: {name} refuses init_args {dict(init_args)}: {e}"
                ) from e
            raise MMLearnError(
                f"TorchJD: {name} needs arguments ({e}); give it with them, e.g. "
                f"{{class_path: {path}, init_args: {{...}}}}"
            ) from e
    if not isinstance(aggregator, agg.Aggregator):
        raise MMLearnError(
            f"TorchJD: aggregator={aggregator!r} is not a torchjd Aggregator; expected one of "
            f"{valid}, by name or as {{class_path: torchjd.aggregation.<Name>}}"
        )
    return aggregator


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _kind(aggregator: nn.Module) -> str:
    """``"gramian"``: weights from the Gramian alone (most of torchjd's aggregators),
    ``"weighted"``: weights from the matrix, ``"general"``: no weights (GradDrop, ConFIG, ...)."""
    agg = _aggregation()
    if not (
        isinstance(aggregator, agg.WeightedAggregator)
        and type(aggregator).forward is agg.WeightedAggregator.forward
    ):
        return "general"  # a forward of its own: its output need not be a combination of rows
    if (
        isinstance(aggregator, agg.GramianWeightedAggregator)
        and not _has_hooks(aggregator)
        and not _has_hooks(aggregator.weighting)
    ):
        return "gramian"
    return "weighted"


def _mix(seed: int, count: int) -> int:
    """A 63-bit seed for draw ``count`` of the stream ``seed`` (splitmix64's finaliser)."""
    z = (seed * 0x9E3779B97F4A7C15 + count + 1) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1


def per_dimension_weights(rows: Tensor, row: Tensor) -> Tensor:
    """``w [n, P]`` with ``(w * rows).sum(0) == row`` wherever some row is non-zero.

    Column j gets the least-norm weights ``row_j rows[:, j] / |rows[:, j]|^2``; a column where
    every row is zero gets zero weights (every aggregator of torchjd gives 0 there).
    """
    sq = (rows * rows).sum(0)
    scale = torch.where(sq > 0, row / torch.where(sq > 0, sq, torch.ones_like(sq)), 0.0)
    return rows * scale


class TorchJD(Rule):
    """Any torchjd aggregator as a rule: ``J [N, P]`` of the objectives' rows -> ``A(J) [P]``.

    Quinton and Rey, "Jacobian Descent for Multi-Objective Optimization", arXiv 2406.16232.
    The rows are those the manual step has already averaged over ranks, so the result is the
    same on every rank and equals single-process training on the whole batch.

    Args:
        aggregator: a torchjd ``Aggregator``: a spec (from a config,
            ``{class_path: torchjd.aggregation.CAGrad, init_args: {c: 0.5}}``, built here so
            that a missing library or solver is a clear error), a name of
            ``torchjd.aggregation`` (``"UPGrad"``, ``"PCGrad"``, ``"IMTL-G"``: any case, ``-``
            and ``_`` ignored; built with its default arguments), or, from Python, an instance
            or a class. Default
            UPGrad, the paper's aggregator. Unknown names are refused with the valid ones listed.
        scope: which matrix the aggregator sees.

            - ``"global"`` (default): ONE matrix ``J [N, sum_g P_g]`` over all ``N`` objectives
              and all groups, zero where an objective does not reach a group, i.e. the Jacobian
              of the whole model that ``torchjd.autojac.backward`` followed by ``jac_to_grad``
              over all parameters aggregates. The result is split back into the groups; heads
              take part (an objective's head rows enter its norm in the Gramian).
            - ``"shared"``: as ``torchjd.autojac.mtl_backward``: one matrix over the groups
              reached by more than one objective (the encoders, the shared parameters); a group
              reached by one objective (a head) gets that objective's gradient unchanged. This
              is the scope of :class:`~mmlearn.gradients.MGDA`'s ``"global"``.
            - ``"per_group"``: each group's rows ``[n_g, P_g]`` on their own, as if each group
              were a separate model (a different method from the paper's).
        seed: the aggregator's random draws (PCGrad's order of projections, GradDrop's masks,
            Random's weights, GradVac's order) come from a private stream: draw ``t`` of this
            rule is seeded by ``(seed, t)`` inside ``torch.random.fork_rng``, so they are the
            same on every rank and in a single process on the whole batch, and the global RNG
            is left untouched. ``None``: the global RNG, as in torchjd (then the draws depend on
            what else consumed it, e.g. dropout on a batch of 2B in one process or B per rank).

    Returns, per group, the row ``[P_g]`` and the weights:

    - aggregators with a torchjd ``Weighting`` (UPGrad, MGDA, DualProj, PCGrad, IMTL-G,
      Aligned-MTL, Mean, Sum, Random, Krum, CAGrad, Nash-MTL, ...): the row is ``w @ rows`` with
      ``w [n_g]`` the weighting's weights of the group's objectives, so :meth:`coefficients` gives
      them and ``MultiObjective(every > 1)`` reuses them at one backward's cost. With a
      Gramian-based weighting the Gramian is accumulated group by group in float64
      (``G = sum_g R_g R_g^T``, :func:`~mmlearn.gradients.gramian`), never by concatenating the
      rows, as ``jac_to_grad(..., optimize_gramian_computation=True)`` does.
    - aggregators without one (GradDrop, ConFIG, TrimmedMean): the stacked matrix is aggregated,
      and the weights are per dimension, ``[n_g, P_g]`` (:func:`per_dimension_weights`), which
      reproduce the row and are what the strategies log. Their output is not a fixed
      combination of the rows, so :meth:`apply` refuses them and ``every > 1`` fails at its
      first reuse with a message saying so.

    Stateful aggregators (GradVac, PCD, ExcessMTL, Nash-MTL) keep their state across steps (the
    same on every rank: the same inputs); with ``scope="per_group"`` each group has its own copy.
    Neither that state nor the position of the random stream is saved in checkpoints.
    """

    def __init__(
        self,
        aggregator: str | dict[str, Any] = "UPGrad",
        scope: str = "global",
        seed: int | None = 0,
    ) -> None:
        if scope not in SCOPES:
            raise MMLearnError(f"TorchJD: scope={scope!r}; expected one of {list(SCOPES)}")
        self.aggregator = resolve(aggregator)
        self.scope, self.seed = scope, seed
        self.kind = _kind(self.aggregator)
        self.name = type(self.aggregator).__name__
        self._stateful = isinstance(self.aggregator, importlib.import_module("torchjd").Stateful)
        self._copies: dict[int, nn.Module] = {}  # per-group copies of a stateful aggregator
        self._draws = 0

    def __repr__(self) -> str:
        return f"TorchJD({self.aggregator!r}, scope={self.scope!r}, seed={self.seed})"

    def __call__(self, rows: Tensor, var: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``rows [n, P]`` -> ``(row [P], weights [n] or [n, P])``: the aggregator on ``rows``."""
        return self._solve([Block(rows, tuple(range(rows.shape[0])))], self.aggregator)[0]

    def apply(self, rows: Tensor, weights: Tensor) -> Tensor:
        """``w @ rows`` ``[P]`` for ``rows [n, P]`` and scalar weights ``w [n]``; per-dimension
        weights ``[n, P]`` are refused (they are not a reusable combination)."""
        if weights.dim() == 2:
            raise MMLearnError(
                f"TorchJD({self.name}): this aggregator has no weighting: its update is not a "
                "fixed combination of the rows, so there are no weights to re-apply between "
                "recomputations; use MultiObjective(every=1), or an aggregator with a weighting "
                "(UPGrad, MGDA, PCGrad, DualProj, IMTLG, AlignedMTL, Mean, ...)"
            )
        return weights.to(rows.dtype) @ rows

    def combine(self, blocks: Sequence[Block]) -> list[tuple[Tensor, Tensor]]:
        """``[(row [P_g], weights)]`` per group, by :attr:`scope`."""
        if self.scope == "per_group":
            aggs = [self._aggregator_for(i) for i in range(len(blocks))]  # copies before use
            return [self._solve([b], a)[0] for b, a in zip(blocks, aggs, strict=True)]
        if self.scope == "global":
            return self._solve(blocks, self.aggregator)
        out: list[tuple[Tensor, Tensor] | None] = [None] * len(blocks)
        shared = [i for i, b in enumerate(blocks) if len(b.objectives) > 1]
        if shared:
            done = self._solve([blocks[i] for i in shared], self.aggregator)
            for i, row_w in zip(shared, done, strict=True):
                out[i] = row_w
        for i, b in enumerate(blocks):
            if out[i] is None:  # one objective: its own gradient, as mtl_backward's heads
                out[i] = (b.rows.sum(0), ones(b.rows))
        return [o for o in out if o is not None]

    def _aggregator_for(self, group: int) -> nn.Module:
        if not self._stateful or group == 0:
            return self.aggregator
        if group not in self._copies:
            self._copies[group] = copy.deepcopy(self.aggregator)
        return self._copies[group]

    @contextlib.contextmanager
    def _private_rng(self, device: torch.device) -> Iterator[None]:
        """The aggregator's draws from this rule's stream (``seed``), on the CPU and ``device``."""
        if self.seed is None:
            yield
            return
        seed = _mix(self.seed, self._draws)
        self._draws += 1
        cuda = []
        if device.type == "cuda":
            cuda = [torch.cuda.current_device() if device.index is None else device.index]
        with torch.random.fork_rng(devices=cuda):
            torch.random.default_generator.manual_seed(seed)
            for index in cuda:
                torch.cuda.default_generators[index].manual_seed(seed)
            yield

    def _solve(self, blocks: Sequence[Block], aggregator: Any) -> list[tuple[Tensor, Tensor]]:
        """One aggregation of the blocks' rows ``[n_b, P_b]`` stacked by objective into
        ``J [N, sum_b P_b]`` (zeros where objective k does not reach block b): per block,
        ``(row [P_b], weights [n_b] or [n_b, P_b])``."""
        ids = sorted({k for b in blocks for k in b.objectives})
        pos = {k: i for i, k in enumerate(ids)}
        index = [[pos[k] for k in b.objectives] for b in blocks]
        ref = blocks[0].rows
        with torch.no_grad(), self._private_rng(ref.device):
            if self.kind == "gramian":
                gram, _ = gramian(blocks)  # [N, N], float64, objectives in the order of ids
                w = aggregator.gramian_weighting(gram)
                return self._weighted(blocks, index, w)
            matrix = ref.new_zeros(len(ids), sum(b.rows.shape[1] for b in blocks))
            start = 0
            for b, idx in zip(blocks, index, strict=True):
                matrix[idx, start : start + b.rows.shape[1]] = b.rows.to(matrix.dtype)
                start += b.rows.shape[1]
            if self.kind == "weighted":
                return self._weighted(blocks, index, _weights_of(aggregator, matrix))
            vector = aggregator(matrix)
        out, start = [], 0
        for b in blocks:
            row = vector[start : start + b.rows.shape[1]].to(b.rows.dtype)
            start += b.rows.shape[1]
            out.append((row, per_dimension_weights(b.rows, row)))
        return out

    @staticmethod
    def _weighted(
        blocks: Sequence[Block], index: Sequence[list[int]], w: Tensor
    ) -> list[tuple[Tensor, Tensor]]:
        """Per block ``(w_b @ rows [P_b], w_b [n_b])``, ``w_b`` its objectives' entries of
        ``w [N]`` (``index``: their positions)."""
        out = []
        for b, idx in zip(blocks, index, strict=True):
            wb = w[idx].to(device=b.rows.device, dtype=b.rows.dtype)
            out.append((wb @ b.rows, wb))
        return out


def _weights_of(aggregator: Any, matrix: Tensor) -> Tensor:
    """``w [N]`` the aggregator's weighting gives ``matrix [N, P]``, through its own call (so its
    hooks run), caught by a hook on the weighting."""
    caught: list[Tensor] = []
    handle = aggregator.weighting.register_forward_hook(lambda _m, _i, w: caught.append(w))
    try:
        aggregator(matrix)
    finally:
        handle.remove()
    return caught[-1]
