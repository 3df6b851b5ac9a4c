"""OGM-GE: on-the-fly gradient modulation with generalisation enhancement."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from mmlearn.batch import MultimodalBatch
from mmlearn.errors import MMLearnError
from mmlearn.strategies import step
from mmlearn.strategies.base import FUSED
from mmlearn.strategies.inter_only import InterOnly

#: which tensors of an encoder are modulated
MODULATE = ("conv", "weights", "all")


def modulation_coefficients(scores: Tensor, alpha: float) -> tuple[Tensor, Tensor]:
    """``(rho [M], k [M])`` from the summed confidence scores ``s [M]`` of the M modalities.

    Two modalities (Peng et al., eq. 10, with the released code's tie rule): ``rho_1 = s_1/s_0``,
    ``rho_0 = 1/rho_1``; if ``rho_1 > 1`` modality 1 gets ``k_1 = 1 - tanh(alpha * rho_1)`` and
    modality 0 keeps 1, else modality 0 gets ``k_0 = 1 - tanh(alpha * rho_0)``. More
    modalities (our generalisation): ``rho_m = s_m / mean_{j != m} s_j`` and every modality
    with ``rho_m > 1`` gets ``1 - tanh(alpha * rho_m)``. Scores of 0 give ``rho = inf`` and
    ``k = 0`` for the other modality (no division by zero escapes).
    """
    s = scores.double()
    n = s.shape[0]
    others = (s.sum() - s) / (n - 1)
    rho = torch.where(others > 0, s / others.clamp_min(1e-300), torch.full_like(s, math.inf))
    rho = torch.where((s == 0) & (others == 0), torch.ones_like(s), rho)
    dampened = 1 - torch.tanh(alpha * rho.clamp_min(0))
    if n == 2:
        second = bool(rho[1] > 1)
        mask = torch.tensor([not second, second], device=s.device)
    else:
        mask = rho > 1
    return rho, torch.where(mask, dampened, torch.ones_like(s))


class OGMGE(InterOnly):
    """InterOnly with a linear head on concat features, the dominant encoder's gradient damped.

    Peng, Wei, Deng, Wang, Hu, "Balanced Multimodal Learning via On-the-fly Gradient
    Modulation", CVPR 2022 (docs/methods.md section 6). The model is the joint model with
    ``fusion="concat"`` and a LINEAR fused head ``z_J = W [f_1; ...; f_M] + b``; the loss is
    ``CE(z_J, y)`` alone. Each step, modality m's logits are read off the head's block,
    ``z_m = W_m f_m + b / M`` (``[B, K]``, returned as ``outputs[m]``: the unimodal accuracy is
    measured for free), its confidence score is ``s_m = sum_i softmax(z_m,i)[y_i]`` (summed over
    the batch of ALL ranks: one all-reduce of M numbers), and after the backward pass the
    selected gradient tensors of the dominant encoder are multiplied by
    ``k_m = 1 - tanh(alpha * rho_m)`` (:func:`modulation_coefficients`). With ``ge``, every
    modality's selected tensors then get Gaussian noise of the tensor's own gradient standard
    deviation, ``grad <- k_m grad + N(0, std(grad)^2)``, from a generator seeded by
    ``(noise_seed, global_step, tensor)`` alike on every rank, so replicas stay equal and a
    resumed run draws the same noise. Both only for epochs
    ``modulation_starts <= epoch <= modulation_ends``. Inference: the fused head.

    Args:
        alpha: the modulation strength (the authors recommend 0.1 for VGGSound, 0.8 for
            CREMA-D).
        modulation_starts, modulation_ends: the first and last epoch (inclusive, 0-based) with
            modulation, as in the released code (0 and 50).
        ge: add the generalisation-enhancement noise (OGM-GE); ``False`` is plain OGM.
        modulate: which gradient tensors of each encoder: ``"conv"`` (tensors of 3+ dims:
            convolution kernels, what the paper's ResNet-18 rule touches), ``"weights"``
            (default: every tensor of 2+ dims, so MLP encoders are modulated too), ``"all"``.
        noise_seed: the noise generator's seed; default the run's ``seed_everything`` seed (0
            when none was set, so unseeded runs draw the same noise).
        head_hidden: ``None`` (or 0): the fused head is linear; anything else is refused.
        fusion: ``"concat"``; anything else is refused.
        **kwargs: see :class:`~mmlearn.strategies.base.MultimodalModule`.

    InterOnly's model and objective (its ``joint``, ``CE(z_J, y)``, inference by the fused head);
    ``forward`` adds the head's blocks. Multi-label data: ``s_m`` is the sum over samples of the
    mean over labels of the probability of the label's true value. Logged: ``train/ogm/rho/{m}``
    and ``train/ogm/k/{m}``.
    """

    has_experts = True
    supported_fusions = ("concat",)
    linear_fused_head = True

    def __init__(
        self,
        alpha: float = 0.8,
        modulation_starts: int = 0,
        modulation_ends: int = 50,
        ge: bool = True,
        modulate: str = "weights",
        noise_seed: int | None = None,
        head_hidden: int | None = None,
        fusion: str = "concat",
        **kwargs: Any,
    ) -> None:
        if head_hidden:
            raise MMLearnError(
                f"OGMGE: head_hidden={head_hidden}; OGM-GE reads each modality's "
                "logits off a LINEAR fused head: use head_hidden: null"
            )
        if fusion != "concat":
            raise MMLearnError(
                f"OGMGE: fusion={fusion!r}; OGM-GE reads each modality's block of the "
                "head's weights after a concat fusion: use fusion: concat"
            )
        super().__init__(head_hidden=head_hidden, fusion=fusion, **kwargs)
        if len(self.modalities) < 2:
            raise MMLearnError(f"OGMGE: {len(self.modalities)} modality; expected at least 2")
        if not alpha >= 0:
            raise MMLearnError(f"OGMGE: alpha={alpha}; expected >= 0")
        if not 0 <= modulation_starts <= modulation_ends:
            raise MMLearnError(
                f"OGMGE: modulation_starts={modulation_starts}, modulation_ends="
                f"{modulation_ends}; expected 0 <= starts <= ends (epochs, inclusive)"
            )
        if modulate not in MODULATE:
            raise MMLearnError(f"OGMGE: modulate={modulate!r}; expected one of {list(MODULATE)}")
        self.alpha, self.ge, self.modulate = float(alpha), bool(ge), modulate
        self.modulation_starts, self.modulation_ends = modulation_starts, modulation_ends
        self.noise_seed = noise_seed
        self.targets = {m: self._selected(m) for m in self.modalities}
        self._coefficients: Tensor | None = None

    def _selected(self, modality: str) -> list[nn.Parameter]:
        params = list(self.joint.encoders[modality].parameters())
        minimum = {"conv": 3, "weights": 2, "all": 0}[self.modulate]
        chosen = [p for p in params if p.dim() >= minimum]
        if not chosen:
            raise MMLearnError(
                f"OGMGE: modulate={self.modulate!r} selects no tensor of modality {modality!r}'s "
                "encoder (no convolution kernels); use modulate: weights"
            )
        return chosen

    # ---- the model ------------------------------------------------------------------------
    def head_blocks(self, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``{m: z_m [B, K]}``: each modality's share of the linear head, ``W_m f_m + b / M``."""
        head = self.joint.head
        assert isinstance(head, nn.Linear)
        out, start = {}, 0
        for m in self.modalities:
            d = features[m].shape[1]
            out[m] = features[m] @ head.weight[:, start : start + d].T + head.bias / len(
                self.modalities
            )
            start += d
        return out

    def forward(self, inputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return self.decode(self.encode(inputs))

    def decode(self, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        feats = {m: features[f"joint.{m}"] for m in self.modalities}
        return {FUSED: self.joint.decode(feats)} | self.head_blocks(feats)

    # ---- the modulation -------------------------------------------------------------------
    def accumulation_refusal(self, accumulate: int) -> str | None:
        return (
            f"OGMGE: trainer.accumulate_grad_batches={accumulate} is not supported: the "
            "modulation would damp the gradient accumulated so far after every micro-batch "
            "(and draw the same noise each time); use a larger data.batch_size instead"
        )

    def modulating(self) -> bool:
        return self.modulation_starts <= self.current_epoch <= self.modulation_ends

    def on_train_outputs(self, outputs: Mapping[str, Tensor], batch: MultimodalBatch) -> None:
        """This step's ``k [M]`` from the confidence scores of the batch over all ranks."""
        self._coefficients = None
        if not self.modulating():
            return
        local = torch.stack(
            [
                self.likelihood.target_probability(outputs[m], batch.target).sum()
                for m in self.modalities
            ]
        )
        scores = step.reduce_sum({"scores": local})["scores"]
        rho, k = modulation_coefficients(scores, self.alpha)
        self._coefficients = k
        log = {f"train/ogm/rho/{m}": rho[i].float() for i, m in enumerate(self.modalities)}
        log |= {f"train/ogm/k/{m}": k[i].float() for i, m in enumerate(self.modalities)}
        self.log_dict(log, on_step=True, on_epoch=True, batch_size=1)

    def on_after_backward(self) -> None:
        k = self._coefficients
        if k is None:
            return
        seed = self.noise_seed
        if seed is None:
            seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        for i, m in enumerate(self.modalities):
            for j, p in enumerate(self.targets[m]):
                if p.grad is None:
                    continue
                g = p.grad
                new = g * k[i].to(g.dtype)
                if self.ge:
                    std = g.std() if g.numel() > 1 else g.new_zeros(())
                    gen = torch.Generator(device=g.device)
                    gen.manual_seed(step_seed(seed, self.global_step, i, j))
                    noise = torch.randn(g.shape, generator=gen, device=g.device, dtype=g.dtype)
                    new = new + noise * (std + 1e-8)
                p.grad = new


def step_seed(seed: int, global_step: int, modality: int, tensor: int) -> int:
    """A 63-bit seed for one tensor's noise at one step, the same on every rank."""
    h = (seed * 1_000_003 + global_step) * 1_000_033 + modality * 10_007 + tensor
    return h % (2**63 - 1)
