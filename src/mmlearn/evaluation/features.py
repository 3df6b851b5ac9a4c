"""One pass over a split: every encoder run once per sample; modality subsets from the features.

With a modality imputed at the input (``impute_mean``, ``impute_zero``) its encoder's output is
the same vector for every sample, so it is computed once (:func:`fill_features`); with
``feature_zero`` it is a zero vector; with ``drop`` the strategy's rule leaves the absent
experts out. Every subset of present modalities is then the strategy's fusion and heads
(:meth:`~mmlearn.strategies.base.MultimodalModule.decode`) on cached features: for M = 6, 63
subsets x 4 semantics cost 252 passes of the heads and one of the encoders.
docs/methods.md section 8 defines the semantics.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from mmlearn.batch import MultimodalBatch
from mmlearn.strategies.base import MultimodalModule

#: the meanings of "modality m is missing", in the order results list them
SEMANTICS = ("impute_mean", "impute_zero", "feature_zero", "drop")
#: rows of features the heads get at once (bounds the memory of a large test split)
CHUNK = 8192


@dataclass
class FeatureCache:
    """Every encoder's features on one split, in the split's order.

    Attributes:
        features: encoder name -> ``[N, D]`` (float32, on the CPU).
        target: ``[N]`` class indices, or ``[N, K]`` multi-hot.
    """

    features: dict[str, Tensor]
    target: Tensor

    @property
    def size(self) -> int:
        return int(self.target.shape[0])


@torch.no_grad()
def extract(
    model: MultimodalModule,
    batches: Iterable[MultimodalBatch],
    device: torch.device,
    convert: object = None,
) -> FeatureCache:
    """Run every encoder of ``model`` once on every sample of ``batches``.

    Args:
        model: in eval mode, on ``device``.
        batches: the split's batches, in order (a loader that does not shuffle).
        device: where the encoders run.
        convert: the DataModule's ``on_after_batch_transfer`` (uint8 storage -> ``x / 255``),
            applied to each batch on ``device``, as the Trainer does.
    """
    parts: dict[str, list[Tensor]] = {}
    targets: list[Tensor] = []
    for batch in batches:
        batch.inputs = {m: x.to(device) for m, x in batch.inputs.items()}
        if callable(convert):
            batch = convert(batch, 0)
        model.check_batch(batch, "evaluate")
        for name, f in model.encode(batch.inputs).items():
            parts.setdefault(name, []).append(f.float().cpu())
        targets.append(batch.target.cpu())
    if not targets:
        raise ValueError("extract: the split gave no batches")
    return FeatureCache({k: torch.cat(v) for k, v in parts.items()}, torch.cat(targets))


@torch.no_grad()
def fill_features(
    model: MultimodalModule, fills: Mapping[str, Tensor | None], device: torch.device
) -> dict[str, Tensor | None]:
    """Each encoder's features ``[1, D]`` on its modality's fill input (``None``: no fill).

    Args:
        fills: modality -> one input of the sample shape (the training mean, or zeros), in
            what the model sees (float32 after the DataModule's conversion).
    """
    out: dict[str, Tensor | None] = {}
    for name, (m, encoder) in model.feature_encoders().items():
        x = fills.get(m)
        out[name] = None if x is None else encoder(x.unsqueeze(0).to(device)).float().cpu()
    return out


def zero_fill(sample: Tensor) -> Tensor:
    """An all-zero input like one stored ``sample``, as the model sees it.

    uint8 and float16 storage become float32 (the DataModule's conversion), token ids stay
    integers (id 0).
    """
    if sample.dtype == torch.uint8 or sample.is_floating_point():
        return torch.zeros(sample.shape, dtype=torch.float32)
    return torch.zeros_like(sample)


def why_not(
    model: MultimodalModule,
    semantics: str,
    absent: Iterable[str],
    mean_fill: Mapping[str, Tensor | None],
) -> str | None:
    """Why ``model`` cannot give a prediction with ``absent`` missing under ``semantics``."""
    absent = list(absent)
    if semantics == "drop" and not model.drops_experts:
        return (
            f"{type(model).__name__} has no unimodal experts in its prediction to leave out; "
            "use impute_mean, impute_zero or feature_zero"
        )
    if semantics == "impute_mean":
        none = [m for m in absent if mean_fill.get(m) is None]
        if none:
            return f"no training mean of {none} (token ids are not averaged)"
    return None


@torch.no_grad()
def subset_log_probs(
    model: MultimodalModule,
    cache: FeatureCache,
    present: Iterable[str],
    semantics: str,
    fills: Mapping[str, Mapping[str, Tensor | None]],
    device: torch.device,
) -> Tensor:
    """The strategy's log-probabilities ``[N, K]`` with only ``present`` modalities.

    Args:
        present: the modalities present (for every sample).
        semantics: one of :data:`SEMANTICS` (check it first with :func:`why_not`).
        fills: ``{"impute_mean": {encoder: [1, D] | None}, "impute_zero": {...}}`` from
            :func:`fill_features`. ``drop`` gives the absent modalities' encoders the
            ``impute_mean`` features (``impute_zero`` where there is no mean): only a joint
            expert kept by its rule (I2M2 ``missing_joint: impute``) sees them.
    """
    keep = set(present)
    n = cache.size
    if semantics == "drop":
        fill = {
            k: v if v is not None else fills["impute_zero"][k]
            for k, v in fills["impute_mean"].items()
        }
    else:
        fill = dict(fills.get(semantics, {}))
    encoders = model.feature_encoders()
    out = []
    for start in range(0, n, CHUNK):
        stop = min(start + CHUNK, n)
        feats = {}
        for name, (m, _) in encoders.items():
            f = cache.features[name][start:stop]
            if m not in keep:
                given = fill.get(name)
                f = torch.zeros_like(f) if given is None else given.expand_as(f)
            feats[name] = f.to(device)
        masks = None
        if semantics == "drop":
            masks = {
                m: torch.full((stop - start,), m in keep, dtype=torch.bool, device=device)
                for m in model.modalities
            }
        lp = model.predict_log_proba(model.decode(feats), masks)
        out.append(lp.float().cpu())
    return torch.cat(out)


@torch.no_grad()
def expert_log_probs(
    model: MultimodalModule, cache: FeatureCache, device: torch.device
) -> dict[str, Tensor]:
    """Each unimodal expert's or head's own log-probabilities ``[N, K]`` on the full input."""
    if not model.has_experts:
        return {}
    parts: dict[str, list[Tensor]] = {m: [] for m in model.modalities}
    for start in range(0, cache.size, CHUNK):
        feats = {k: v[start : start + CHUNK].to(device) for k, v in cache.features.items()}
        outputs = model.decode(feats)
        for m in model.modalities:
            parts[m].append(model.log_proba(outputs[m]).float().cpu())
    return {m: torch.cat(v) for m, v in parts.items()}
