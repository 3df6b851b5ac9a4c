"""Modality imbalance, measured while training: per-encoder probes, gradient norms, cosines.

In joint training the modality that is easier to fit dominates, and the weak modality's encoder
stays under-trained: the observation behind OGM-GE (Peng et al., "Balanced Multimodal Learning
via On-the-fly Gradient Modulation", CVPR 2022; docs/methods.md section 8, "Linear probe"). A
linear probe of each frozen encoder shows it; so do the encoders' gradient norms and, for the
strategies whose unimodal heads share the encoders with the fused head, the cosine between the
fused and the unimodal objective's gradient on each encoder.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn

from mmlearn.batch import MultimodalBatch
from mmlearn.data.base import Split, mix_seed
from mmlearn.errors import MMLearnError, is_int
from mmlearn.strategies.base import FUSED, MultimodalModule

PREFIX = "monitor"
# streams of :func:`~mmlearn.data.base.mix_seed`: the two subsets are drawn independently
_STREAMS = {"train": 0x70726F62, "val": 0x76616C73}


class ImbalanceMonitor(Callback):
    """Per training epoch, how well each encoder is trained: probes, gradient norms, cosines.

    For ANY strategy (its :meth:`~mmlearn.strategies.base.MultimodalModule.feature_encoders`),
    at the end of every training epoch it logs (``on_epoch``, through ``pl_module.log_dict``, so
    to every logger: ``metrics.csv``, W&B):

    - ``monitor/probe/{encoder}`` (e.g. ``monitor/probe/joint.m0``): validation accuracy of a
      linear probe of the frozen encoder (:func:`~mmlearn.evaluation.probes.fit_probe`: logistic
      regression on standardised features, full-batch L-BFGS) fitted on a fixed random subset
      of ``train_samples`` samples of the training split and scored on a fixed subset of
      ``val_samples`` of the validation split (the whole split when it is smaller). The subsets
      are drawn once from ``seed``, the same every epoch; all modalities present (no
      ``modality_dropout``); the model in eval mode under ``torch.no_grad`` and the Trainer's
      precision, its train/eval modes restored afterwards.
    - ``monitor/grad_norm/{encoder}``: the L2 norm of the gradient over the encoder's parameters,
      averaged over the epoch's optimiser steps. Read in ``on_before_optimizer_step``, which
      Lightning calls after the backward pass (after the DDP all-reduce, the AMP unscaling and
      gradient accumulation) and before its clipping, for automatic optimisation; and when a
      manual-optimisation strategy (``MultiObjective``, ``BOGC``) calls ``opt.step()`` on its
      ``LightningOptimizer``: there the ``.grad`` the rule wrote, after the strategy's own
      ``clip_grad_norm`` (it clips before stepping). Steps whose norm is not finite (a skipped
      float16 step) are left out of the mean. A frozen encoder has norm 0.
    - ``monitor/cos/{modality}``, for the strategies with unimodal heads on the shared encoders
      (``LateFusionHeads``, ``MIMO``, ``MultiObjective``, ``BOGC``: objectives ``fused`` and
      ``m`` both reach encoder ``joint.m``): the cosine between the gradients of the ``fused``
      and the ``m`` objective of :meth:`objectives` with respect to encoder m's parameters, on
      one fixed training batch (the first ``data.batch_size`` samples of the training subset),
      by ``torch.autograd.grad``. The model is in eval mode for it too (no dropout, BatchNorm's
      running statistics), so the measurement draws no random numbers and changes no buffer:
      training goes on exactly as without the callback. (``train/cos/{m}``, which
      ``MultiObjective`` logs every step, is the same cosine on the training batches in train
      mode.) Strategies without such heads (``InterOnly``, ``IntraOnly``, ``I2M2``) log none.

    Distributed training: every rank holds the whole splits (:class:`~mmlearn.data.base.
    MultimodalDataModule`), so every rank computes the same numbers on its replica and logs
    them with ``sync_dist=True`` (their mean: identical values, one small all-reduce per key
    per epoch). No rank waits on another's computation and every rank logs the same keys.

    Cost per epoch: one pass of the encoders (no gradients) over at most ``train_samples +
    val_samples`` samples (3000 by default), one L-BFGS probe per encoder on ``[N, D]``
    features (at most 200 iterations, float64, on the CPU), and for the heads strategies one
    forward and two backward passes of one batch per modality; per optimiser step, one norm
    per encoder parameter tensor (no host synchronisation). The seconds it took are kept in
    :attr:`last_seconds`. Measured on ``data_modules/synthetic_imbalanced.yaml`` (2000 + 500
    samples, two MLP encoders, one CPU thread): about 0.6 s per epoch for ``InterOnly``,
    ``LateFusionHeads`` or ``MultiObjective`` (1.9-2.4 s for ``I2M2``'s four encoders), almost
    all of it the L-BFGS fits (0.3-0.6 s each; the encoder pass takes 10-30 ms, the cosines
    3 ms), and 0.1-0.4 ms per optimiser step: small next to an epoch of real data, large next
    to this toy epoch of 0.13 s. Fewer ``train_samples`` make the fits cheaper.

    Args:
        train_samples: samples of the training split the probes are fitted on (>= 1).
        val_samples: samples of the validation split the probes are scored on (>= 1).
        seed: seed of the two subsets (an integer).

    Raises:
        MMLearnError: an option out of range; at ``fit``, a model that is not an mmlearn strategy
            or data that is not an mmlearn DataModule (the probes need its in-memory splits).
    """

    def __init__(self, train_samples: int = 2000, val_samples: int = 1000, seed: int = 0) -> None:
        for name, value in (("train_samples", train_samples), ("val_samples", val_samples)):
            if not is_int(value, 1):
                raise MMLearnError(
                    f"ImbalanceMonitor: {name}={value!r}; expected an integer >= 1 (the samples "
                    f"of the {name.split('_')[0]} split the probes use)"
                )
        if not is_int(seed, -(2**63)):
            raise MMLearnError(f"ImbalanceMonitor: seed={seed!r}; expected an integer")
        self.train_samples, self.val_samples, self.seed = int(train_samples), int(val_samples), seed
        #: split -> the positions of its fixed subset (random order: the first batch is random)
        self.indices: dict[str, Tensor] = {}
        #: seconds the last epoch-end measurement took (probes and cosines)
        self.last_seconds: float | None = None
        self._params: dict[str, list[nn.Parameter]] = {}
        self._sums: dict[str, Tensor | float] = {}  # encoder -> sum of the epoch's norms
        self._steps: Tensor | float = 0.0  # the epoch's optimiser steps with finite norms
        self._epoch = -1

    # ---- set-up --------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not isinstance(pl_module, MultimodalModule):
            raise MMLearnError(
                f"ImbalanceMonitor: the model is a {type(pl_module).__name__}; expected an "
                "mmlearn strategy (a MultimodalModule, whose feature_encoders it measures)"
            )
        splits = self._splits(trainer)
        self.indices = {
            split: self._subset(int(splits[split].target.shape[0]), size, _STREAMS[split])
            for split, size in (("train", self.train_samples), ("val", self.val_samples))
        }

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # after the strategy's setup (DDP's SyncBatchNorm keeps the same parameter objects)
        encoders = _encoders(pl_module)
        self._params = {name: list(enc.parameters()) for name, (_, enc) in encoders.items()}

    def _splits(self, trainer: pl.Trainer) -> Mapping[str, Split]:
        dm = getattr(trainer, "datamodule", None)
        splits = getattr(dm, "splits", None)
        if not isinstance(splits, Mapping) or not {"train", "val"} <= set(splits):
            raise MMLearnError(
                "ImbalanceMonitor: needs an mmlearn DataModule (trainer.fit(model, "
                f"datamodule=...)); got {type(dm).__name__ if dm is not None else 'none'}: the "
                "probes are fitted on subsets of its in-memory train and val splits"
            )
        return splits

    def _subset(self, n: int, size: int, stream: int) -> Tensor:
        g = torch.Generator().manual_seed(mix_seed(self.seed, stream))
        return torch.randperm(n, generator=g)[: min(n, size)]

    # ---- gradient norms, every optimiser step --------------------------------------------
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        if trainer.current_epoch != self._epoch:  # a new epoch (or one resumed after its end)
            self._sums, self._steps, self._epoch = {}, 0.0, trainer.current_epoch
        norms = {name: _grad_norm(params) for name, params in self._params.items()}
        if not norms:
            return
        # an overflowed float16 step (the scaler skips it) counts for nothing; no host sync
        finite = torch.isfinite(torch.stack(list(norms.values()))).all()
        for name, norm in norms.items():
            self._sums[name] = self._sums.get(name, 0.0) + torch.where(finite, norm, 0.0)
        self._steps = self._steps + finite.float()

    # ---- the measurements at the end of every training epoch ------------------------------
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert isinstance(pl_module, MultimodalModule)
        start = time.perf_counter()
        log: dict[str, Tensor | float] = {}
        steps = float(self._steps)
        if steps > 0 and self._epoch == trainer.current_epoch:
            log |= {
                f"{PREFIX}/grad_norm/{name}": torch.as_tensor(total).detach() / steps
                for name, total in self._sums.items()
            }
        modes = [(module, module.training) for module in pl_module.modules()]
        pl_module.eval()
        try:
            with trainer.precision_plugin.forward_context():
                log |= self.probe_accuracies(trainer, pl_module)
                log |= self.cosines(trainer, pl_module)
        finally:
            for module, training in modes:
                module.training = training
        self._sums, self._steps = {}, 0.0
        self.last_seconds = time.perf_counter() - start
        pl_module.log_dict(log, on_step=False, on_epoch=True, sync_dist=True, batch_size=1)

    def _batches(
        self, trainer: pl.Trainer, pl_module: MultimodalModule, split: str
    ) -> Iterator[MultimodalBatch]:
        """The fixed subset of ``split`` in batches of ``data.batch_size``, on the device."""
        dm = getattr(trainer, "datamodule", None)
        data = self._splits(trainer)[split]
        index = self.indices[split]
        size = int(getattr(dm, "batch_size", 64))
        for start in range(0, len(index), size):
            rows = index[start : start + size]
            inputs = {m: x[rows].to(pl_module.device) for m, x in data.inputs.items()}
            batch = MultimodalBatch(inputs, data.target[rows].to(pl_module.device))
            convert = getattr(dm, "on_after_batch_transfer", None)
            yield convert(batch, 0) if callable(convert) else batch  # uint8 -> x / 255

    @torch.no_grad()
    def probe_accuracies(
        self, trainer: pl.Trainer, pl_module: MultimodalModule
    ) -> dict[str, float]:
        """``{"monitor/probe/{encoder}": accuracy}`` of the current encoders (in eval mode)."""
        from mmlearn.evaluation.probes import fit_probe

        feats = {split: self._features(trainer, pl_module, split) for split in ("train", "val")}
        (train, y_train), (val, y_val) = feats["train"], feats["val"]
        out = {}
        for name, x in train.items():
            if bool(torch.isfinite(x).all()) and bool(torch.isfinite(val[name]).all()):
                probe = fit_probe(x, y_train, pl_module.num_classes, pl_module.multilabel)
                out[f"{PREFIX}/probe/{name}"] = probe.accuracy(val[name], y_val)
            else:  # a diverged model: say so in the log rather than stop the fit
                out[f"{PREFIX}/probe/{name}"] = math.nan
        return out

    def _features(
        self, trainer: pl.Trainer, pl_module: MultimodalModule, split: str
    ) -> tuple[dict[str, Tensor], Tensor]:
        parts: dict[str, list[Tensor]] = {}
        targets = []
        for batch in self._batches(trainer, pl_module, split):
            for name, f in pl_module.encode(batch.inputs).items():
                parts.setdefault(name, []).append(f.float().cpu())
            targets.append(batch.target.cpu())
        return {k: torch.cat(v) for k, v in parts.items()}, torch.cat(targets)

    def cosines(self, trainer: pl.Trainer, pl_module: MultimodalModule) -> dict[str, Tensor]:
        """``{"monitor/cos/{m}": cos}``: fused vs unimodal gradient on encoder m (one batch)."""
        objectives = set(getattr(pl_module, "objective_names", None) or [])
        if FUSED not in objectives:
            return {}
        shared = {
            m: [p for p in enc.parameters() if p.requires_grad]
            for _, (m, enc) in _encoders(pl_module).items()
            if m in objectives
        }
        shared = {m: params for m, params in shared.items() if params}
        if not shared:
            return {}
        batch = next(self._batches(trainer, pl_module, "train"))  # the first data.batch_size
        out = {}
        with torch.enable_grad():
            losses = pl_module.objectives(pl_module(batch.inputs), batch.target)
            for m, params in shared.items():
                fused = _flat_grad(losses[FUSED], params)
                own = _flat_grad(losses[m], params)
                cos = (fused @ own) / (fused.norm() * own.norm()).clamp_min(1e-12)
                out[f"{PREFIX}/cos/{m}"] = cos.detach()
        return out

    # ---- resuming inside an epoch: the gradient norms of its first part ------------------
    def state_dict(self) -> dict[str, Any]:
        sums = {k: float(torch.as_tensor(v)) for k, v in self._sums.items()}
        return {"epoch": self._epoch, "steps": float(self._steps), "sums": sums}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._epoch = int(state_dict.get("epoch", -1))
        self._steps = float(state_dict.get("steps", 0.0))
        self._sums = {str(k): float(v) for k, v in state_dict.get("sums", {}).items()}


def _encoders(pl_module: pl.LightningModule) -> dict[str, tuple[str, nn.Module]]:
    if not isinstance(pl_module, MultimodalModule):
        raise MMLearnError(
            f"ImbalanceMonitor: the model is a {type(pl_module).__name__}; expected an mmlearn "
            "strategy (a MultimodalModule)"
        )
    return pl_module.feature_encoders()


def _grad_norm(params: list[nn.Parameter]) -> Tensor:
    """The L2 norm of the gradients of ``params`` (0 when none has one), detached."""
    grads = [p.grad.detach() for p in params if p.grad is not None]
    if not grads:
        return torch.zeros((), device=params[0].device if params else None)
    norms = torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32) for g in grads])
    return torch.linalg.vector_norm(norms)


def _flat_grad(loss: Tensor, params: list[nn.Parameter]) -> Tensor:
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return torch.cat(
        [
            (torch.zeros_like(p) if g is None else g).reshape(-1).float()
            for g, p in zip(grads, params, strict=True)
        ]
    )
