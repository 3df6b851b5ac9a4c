"""Synthetic multi-modal data with controlled intra- and inter-modality label dependence."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mmlearn.data.base import MultimodalDataModule, Split
from mmlearn.errors import MMLearnError


def _per_modality(value: float | Sequence[float], m: int, name: str) -> list[float]:
    if isinstance(value, (int, float)):
        return [float(value)] * m
    values = [float(v) for v in value]
    if len(values) != m:
        raise MMLearnError(f"SyntheticMultimodal.{name} has {len(values)} entries; expected {m}")
    return values


class SyntheticMultimodal(MultimodalDataModule):
    """M modalities, each a noisy linear map of a latent that carries the label in two ways.

    Following the latent-space view of Huang et al., "What Makes Multi-modal Learning Better than
    Single (Provably)", NeurIPS 2021: for sample ``i`` with label ``y`` (uniform over K classes),
    modality ``m`` has latent ``l_m = intra_m * E_m[y] + inter * C_m[c_m] + s`` and features
    ``x_m = l_m A_m + noise_m * eps``, where

    - ``E_m`` is a random class embedding: the *intra-modality* signal, readable from ``x_m`` alone;
    - ``c_1..c_M`` are uniform codes in ``[0, K)`` with ``sum_m c_m = y (mod K)`` and ``C_m`` their
      embedding: the *inter-modality* signal. Any M-1 codes are independent of ``y`` (parity for
      K=2), so it is invisible to every unimodal model and needs cross-modal interactions;
    - ``s`` is a nuisance latent shared by all modalities; ``A_m`` a random ``[latent, dim_m]`` map;
    - ``noise_m`` sets each modality's noise (imbalance).

    Everything (maps, embeddings, samples) is drawn from one generator seeded by ``seed``.

    Args:
        num_modalities: M (modalities are named ``m0 .. m{M-1}``).
        dim: feature size per modality (one value or one per modality).
        num_classes: K.
        latent_dim: size of the latent.
        intra: strength of the unimodal label signal (one value or one per modality).
        inter: strength of the cross-modal (code) signal.
        noise: feature noise std (one value or one per modality).
        n_train: training samples; ``n_val`` and ``n_test`` likewise.
        modality_dropout, modality_dropout_fill, train_fraction: the options every DataModule
            has (:class:`~mmlearn.data.base.MultimodalDataModule`; docs/datasets.md).
    """

    def __init__(
        self,
        num_modalities: int = 2,
        dim: int | list[int] = 16,
        num_classes: int = 2,
        latent_dim: int = 8,
        intra: float | list[float] = 1.0,
        inter: float = 0.0,
        noise: float | list[float] = 0.5,
        n_train: int = 2000,
        n_val: int = 500,
        n_test: int = 1000,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int | None = None,
        predict_split: str = "test",
        modality_dropout: float | dict[str, float] = 0.0,
        modality_dropout_fill: str = "mean",
        train_fraction: float = 1.0,
    ) -> None:
        super().__init__(
            batch_size=batch_size,
            num_workers=num_workers,
            seed=seed,
            predict_split=predict_split,
            modality_dropout=modality_dropout,
            modality_dropout_fill=modality_dropout_fill,
            train_fraction=train_fraction,
        )
        for key, value, least in (
            ("num_modalities", num_modalities, 1),
            ("num_classes", num_classes, 2),
            ("latent_dim", latent_dim, 1),
            ("n_train", n_train, 1),
            ("n_val", n_val, 1),
            ("n_test", n_test, 1),
        ):
            if value < least:
                raise MMLearnError(f"SyntheticMultimodal: data.{key}={value}; expected >= {least}")
        m = num_modalities
        self.dims = [int(d) for d in _per_modality(dim, m, "dim")]  # type: ignore[arg-type]
        self.intra = _per_modality(intra, m, "intra")
        self.noise = _per_modality(noise, m, "noise")
        for key, values in (("dim", self.dims), ("noise", self.noise)):
            least = 1 if key == "dim" else 0
            if any(v < least for v in values):
                raise MMLearnError(
                    f"SyntheticMultimodal: data.{key}={values}; expected every value >= {least}"
                )
        self.inter, self.latent_dim, self.k = float(inter), latent_dim, num_classes
        self.sizes = {"train": n_train, "val": n_val, "test": n_test}
        self.source = f"SyntheticMultimodal(seed={self.seed})"

    @property
    def num_classes(self) -> int:
        return self.k

    def load_splits(self) -> dict[str, Split]:
        g = torch.Generator().manual_seed(self.seed)
        m, k, d = len(self.dims), self.k, self.latent_dim
        label_emb = torch.randn(m, k, d, generator=g)
        code_emb = torch.randn(m, k, d, generator=g)
        maps = [torch.randn(d, dim, generator=g) / d**0.5 for dim in self.dims]
        splits = {}
        for name, n in self.sizes.items():
            y = torch.randint(0, k, (n,), generator=g)
            codes = torch.randint(0, k, (n, m), generator=g)
            codes[:, -1] = (y - codes[:, :-1].sum(1)) % k  # sum of codes == y (mod K)
            shared = torch.randn(n, d, generator=g)
            inputs = {}
            for j in range(m):
                latent = self.intra[j] * label_emb[j, y] + self.inter * code_emb[j, codes[:, j]]
                x = (latent + shared) @ maps[j]
                x = x + self.noise[j] * torch.randn(n, self.dims[j], generator=g)
                inputs[f"m{j}"] = x
            splits[name] = Split(inputs, y)
        return splits
