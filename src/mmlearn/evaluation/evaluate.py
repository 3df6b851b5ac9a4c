"""``mmlearn evaluate`` in Python: why a trained strategy predicts as it does.

One pass of the encoders over the test split (and over the training split for the probes)
gives, from cached features (:mod:`mmlearn.evaluation.features`):

- the missing-modality matrix: the metrics of the strategy's prediction for every subset of
  present modalities under each meaning of "missing" (:data:`SEMANTICS_TEXT`);
- calibration: NLL, ECE (15 bins), Brier, and AUROC/AUPRC for binary and multi-label tasks;
- the exact Shapley value of each modality (empty set = the training class prior);
- a linear probe of every frozen encoder, next to the unimodal heads' accuracy.

docs/methods.md section 8 defines the measures; docs/evaluation.md shows the outputs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from mmlearn.data.base import MultimodalDataModule
from mmlearn.errors import MMLearnError
from mmlearn.evaluation.calibration import calibration
from mmlearn.evaluation.features import (
    SEMANTICS,
    FeatureCache,
    expert_log_probs,
    extract,
    fill_features,
    subset_log_probs,
    why_not,
    zero_fill,
)
from mmlearn.evaluation.probes import fit_probe
from mmlearn.evaluation.shapley import shapley_values
from mmlearn.evaluation.shapley import subsets as all_subsets
from mmlearn.strategies.base import MultimodalModule

#: what each meaning of "missing" does, written into every output
SEMANTICS_TEXT = {
    "impute_mean": "the absent modality's input is the training-split mean of that input",
    "impute_zero": "the absent modality's input is all zeros (token ids: id 0)",
    "feature_zero": "the absent modality's encoder output is zeroed before fusion and heads",
    "drop": "the absent modality's unimodal experts are left out of the product; a joint "
    "expert gets the training-mean input (I2M2 missing_joint: impute) or is left out (drop)",
}
#: the most modalities whose every subset is evaluated by default (2^6 - 1 = 63)
MAX_ALL_SUBSETS = 6
METRICS = ("acc", "f1", "nll", "ece", "brier", "auroc", "auprc")


@dataclass
class Evaluation:
    """What :func:`evaluate` measured (see :mod:`mmlearn.evaluation.report_eval` for files).

    Attributes:
        strategy: the strategy's class name.
        modalities: the model's modalities, in order.
        rows: one dict per (semantics, subset): ``semantics``, ``subset`` (``"a+b"``),
            ``size``, the metrics (:data:`METRICS` that apply), ``note`` (why a semantics is
            not available: its metrics are then absent).
        prior: the metrics of the training class prior on the test split (the empty subset).
        metric: the metric the Shapley values are of.
        shapley: semantics -> modality -> Shapley value (semantics with every subset only).
        probes: one dict per encoder: ``encoder``, ``modality``, ``probe_acc``, ``head_acc``
            (the unimodal expert's or head's accuracy; ``None`` without one).
        experts: modality -> the unimodal expert's or head's metrics on the full input.
        means_source: where the ``impute_mean`` inputs came from.
    """

    strategy: str
    modalities: list[str]
    rows: list[dict[str, Any]]
    prior: dict[str, float]
    metric: str
    shapley: dict[str, dict[str, float]]
    probes: list[dict[str, Any]]
    experts: dict[str, dict[str, float]]
    means_source: str
    n_test: int
    full_log_probs: Tensor = field(repr=False)
    target: Tensor = field(repr=False)
    expert_log_probs: dict[str, Tensor] = field(repr=False, default_factory=dict)
    multilabel: bool = False
    #: the strategy's options that decide how to read it (IntraOnly's ``mode``)
    options: dict[str, Any] = field(default_factory=dict)

    def full(self) -> dict[str, Any]:
        """The row with every modality present (the same under every semantics)."""
        size = len(self.modalities)
        return next(r for r in self.rows if r["size"] == size and "note" not in r)

    def row(self, semantics: str, subset: Sequence[str]) -> dict[str, Any]:
        """The row of ``subset`` (modality names, any order) under ``semantics``."""
        name = subset_name(subset, self.modalities)
        for r in self.rows:
            if r["semantics"] == semantics and r["subset"] == name:
                return r
        raise KeyError(f"no row for {semantics} {name}")


def subset_name(subset: Sequence[str], order: Sequence[str]) -> str:
    """``"a+b"``: the modalities of ``subset`` in the model's order."""
    return "+".join(m for m in order if m in set(subset))


def check_subsets(
    given: Sequence[Sequence[str]] | None, modalities: Sequence[str]
) -> list[tuple[str, ...]]:
    """The subsets to evaluate: every non-empty one up to 6 modalities, else ``given``.

    Beyond :data:`MAX_ALL_SUBSETS` the default is each modality alone, each left out, and all.

    Raises:
        MMLearnError: an empty subset, or a modality the model does not know.
    """
    if given is None:
        if len(modalities) <= MAX_ALL_SUBSETS:
            return all_subsets(modalities)
        singles = [(m,) for m in modalities]
        leave_one_out = [tuple(x for x in modalities if x != m) for m in modalities]
        return [*singles, *leave_one_out, tuple(modalities)]
    out: list[tuple[str, ...]] = []
    for i, subset in enumerate(given):
        if not subset or all(not m for m in subset):
            raise MMLearnError(
                f"--subsets: subset {i + 1} is empty; expected modality names joined by '+' "
                f"(e.g. {'+'.join(modalities[:2])}), from {list(modalities)}"
            )
        if any(not m for m in subset):
            raise MMLearnError(
                f"--subsets: {'+'.join(subset)!r} has an empty modality name (a '+' with nothing "
                f"on one side); expected names from {list(modalities)} joined by '+'"
            )
        unknown = [m for m in subset if m not in modalities]
        if unknown:
            raise MMLearnError(
                f"--subsets: {'+'.join(subset)} names {unknown}, which the model does not know; "
                f"its modalities are {list(modalities)}"
            )
        ordered = tuple(m for m in modalities if m in set(subset))
        if ordered not in out:
            out.append(ordered)
    full = tuple(modalities)
    return out if full in out else [*out, full]  # the full set: the reference of every row


def check_semantics(given: Sequence[str]) -> list[str]:
    """Refuse an unknown semantics, naming the known ones."""
    unknown = [s for s in given if s not in SEMANTICS]
    if unknown or not given:
        raise MMLearnError(
            f"--missing {' '.join(given)}: unknown semantics {unknown}; expected one or more "
            f"of {list(SEMANTICS)}"
        )
    return list(dict.fromkeys(given))


class _Scorer:
    """Accuracy, macro-F1 and the calibration measures of log-probabilities ``[N, K]``."""

    def __init__(self, model: MultimodalModule, target: Tensor) -> None:
        self.model, self.target = model, target
        self.acc = model.likelihood.accuracy(model.num_classes)
        self.f1 = model.likelihood.f1(model.num_classes)

    def __call__(self, log_probs: Tensor) -> dict[str, float]:
        scores = self.model.likelihood.metric_input(log_probs)
        out = {}
        for name, metric in (("acc", self.acc), ("f1", self.f1)):
            metric.reset()
            out[name] = float(metric(scores, self.target))
        return out | calibration(log_probs, self.target, self.model.multilabel)


def _loader_batches(dm: MultimodalDataModule, split: str) -> Any:
    """The split in order, without shuffling or training-time modality dropout."""
    return dm._split_loader(dm.splits[split], shuffle=False)


def check_options(
    model: MultimodalModule,
    missing: Sequence[str] | None,
    subsets: Sequence[Sequence[str]] | None,
    metric: str,
) -> tuple[list[str], list[tuple[str, ...]]]:
    """The semantics and subsets to evaluate; a bad option is an :class:`MMLearnError`."""
    semantics = list(SEMANTICS) if missing is None else check_semantics(missing)
    chosen = check_subsets(subsets, model.modalities)
    if metric not in METRICS:
        raise MMLearnError(f"--metric {metric!r}: expected one of {list(METRICS)}")
    ranked = model.multilabel or model.num_classes == 2
    if metric in ("auroc", "auprc") and not ranked:
        raise MMLearnError(
            f"--metric {metric}: defined here for binary and multi-label tasks only; this one "
            f"has {model.num_classes} classes (use acc, f1, nll, ece or brier)"
        )
    if missing is not None and "drop" in semantics and not model.drops_experts:
        raise MMLearnError(f"--missing drop: {why_not(model, 'drop', [], {})}")
    return semantics, chosen


def evaluate(
    model: MultimodalModule,
    datamodule: MultimodalDataModule,
    missing: Sequence[str] | None = None,
    subsets: Sequence[Sequence[str]] | None = None,
    metric: str = "acc",
    probes: bool = True,
    device: str | torch.device = "cpu",
    input_means: Mapping[str, Tensor | None] | None = None,
    means_source: str | None = None,
) -> Evaluation:
    """Evaluate a trained ``model`` on ``datamodule``'s test split (module docstring).

    Args:
        model: a trained strategy (its weights loaded).
        datamodule: the data it was trained on (the same options and seed: the same split).
        missing: the semantics of a missing modality to evaluate (:data:`SEMANTICS`); default
            all four, those the strategy cannot do marked in the rows. One the strategy cannot
            do, asked for by name, is an error.
        subsets: the subsets of present modalities (names); default :func:`check_subsets`.
        metric: the metric of the Shapley values (one of :data:`METRICS` the task has).
        probes: fit a linear probe on every frozen encoder (needs a pass over the training
            split).
        device: where the encoders and heads run.
        input_means: modality -> the training mean of its input (the run's stored means);
            default: computed from ``datamodule``'s training split.
        means_source: where ``input_means`` came from, written into the outputs.

    Raises:
        MMLearnError: a model of other modalities, shapes or classes than the data; an unknown
            semantics, subset modality or metric; a semantics the strategy cannot do.
    """
    datamodule.setup("test")
    model.check_data(datamodule)
    semantics, chosen = check_options(model, missing, subsets, metric)
    dev = torch.device(device)
    model = model.to(dev).eval()
    train = datamodule.splits["train"]
    if input_means is None:
        input_means = datamodule.input_means()
        means_source = means_source or f"computed now from the training split ({len(train.target)})"
    zeros = {m: zero_fill(x[0]) for m, x in train.inputs.items()}
    fills = {
        "impute_mean": fill_features(model, input_means, dev),
        "impute_zero": fill_features(model, zeros, dev),
    }
    convert = datamodule.on_after_batch_transfer
    test = extract(model, _loader_batches(datamodule, "test"), dev, convert)
    score = _Scorer(model, test.target)
    rows = []
    for s in semantics:
        for subset in chosen:
            absent = [m for m in model.modalities if m not in subset]
            row: dict[str, Any] = {
                "semantics": s,
                "subset": subset_name(subset, model.modalities),
                "size": len(subset),
            }
            # a semantics the strategy cannot do is marked on every row, the full set's included
            reason = why_not(model, s, absent, input_means) if absent or s == "drop" else None
            if reason is not None:
                row["note"] = f"not available: {reason}"
            else:
                row |= score(subset_log_probs(model, test, subset, s, fills, dev))
            rows.append(row)
    full_lp = subset_log_probs(model, test, model.modalities, semantics[0], fills, dev)
    prior = score(_prior_log_probs(model, datamodule, test.size))
    experts = expert_log_probs(model, test, dev)
    result = Evaluation(
        strategy=type(model).__name__,
        modalities=list(model.modalities),
        rows=rows,
        prior=prior,
        metric=metric,
        shapley=_shapley(rows, semantics, model.modalities, prior, metric),
        probes=[],
        experts={m: score(lp) for m, lp in experts.items()},
        means_source=means_source or "given",
        n_test=test.size,
        full_log_probs=full_lp,
        target=test.target,
        expert_log_probs=experts,
        multilabel=model.multilabel,
        options={k: getattr(model, k) for k in ("mode", "missing_joint") if hasattr(model, k)},
    )
    if probes:
        train_cache = extract(model, _loader_batches(datamodule, "train"), dev, convert)
        result.probes = _probes(model, train_cache, test, result.experts)
    return result


def _prior_log_probs(model: MultimodalModule, dm: MultimodalDataModule, n: int) -> Tensor:
    """The training class prior as every test sample's prediction ``[N, K]``."""
    logits = model.likelihood.prior_logits(dm.class_frequencies())
    return model.likelihood.log_proba(logits.unsqueeze(0).expand(n, -1).float())


def _shapley(
    rows: Sequence[Mapping[str, Any]],
    semantics: Sequence[str],
    modalities: Sequence[str],
    prior: Mapping[str, float],
    metric: str,
) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    if metric not in prior:
        return out
    for s in semantics:
        mine = [r for r in rows if r["semantics"] == s]
        if len(mine) != 2 ** len(modalities) - 1 or any("note" in r for r in mine):
            continue
        values = {frozenset(r["subset"].split("+")): float(r[metric]) for r in mine}
        out[s] = shapley_values(values, modalities, float(prior[metric]))
    return out


def _probes(
    model: MultimodalModule,
    train: FeatureCache,
    test: FeatureCache,
    experts: Mapping[str, Mapping[str, float]],
) -> list[dict[str, Any]]:
    out = []
    encoders = model.feature_encoders()
    for name, (m, _) in encoders.items():
        probe = fit_probe(train.features[name], train.target, model.num_classes, model.multilabel)
        # the unimodal head of m reads the expert's own encoder where there is one (I2M2),
        # else the shared encoder (LateFusionHeads and the gradient-level strategies; MLA's
        # `encoders.m` feeds its shared head)
        own = [f"experts.{m}", f"encoders.{m}", f"joint.{m}"]
        feeds_head = name == next((e for e in own if e in encoders), None)
        head = experts.get(m, {}).get("acc") if feeds_head else None
        out.append(
            {
                "encoder": name,
                "modality": m,
                "probe_acc": probe.accuracy(test.features[name], test.target),
                "head_acc": head,
            }
        )
    return out
