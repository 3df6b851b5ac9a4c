"""The encoder registry: a name -> class table and the one function that builds encoders.

An encoder maps ``[B, *input_shape]`` to features ``[B, out_dim]``. Adding one is a new file with a
class decorated by :func:`register_encoder`; the contract test in ``tests/unit`` picks it up.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, TypeVar

from torch import nn

from mmlearn.errors import MMLearnError


class Encoder(nn.Module):
    """Base class: ``forward(x: [B, *input_shape]) -> [B, out_dim]``.

    Subclasses set ``ranks`` (the accepted ``len(input_shape)``) and take ``input_shape`` and
    ``out_dim`` as their first two constructor arguments.
    """

    ranks: ClassVar[tuple[int, ...]] = ()
    out_dim: int


ENCODERS: dict[str, type[Encoder]] = {}
E = TypeVar("E", bound=type[Encoder])

# Which encoder a modality gets when the config names none, by the rank of its input shape.
DEFAULT_BY_RANK: dict[int, str] = {1: "mlp", 2: "gru", 3: "cnn", 4: "resnet18"}


def register_encoder(name: str) -> Callable[[E], E]:
    """Class decorator that adds an encoder to :data:`ENCODERS` under ``name``."""

    def deco(cls: E) -> E:
        if name in ENCODERS:
            raise MMLearnError(f"encoder name {name!r} is registered twice")
        ENCODERS[name] = cls
        return cls

    return deco


def default_encoder_name(input_shape: Sequence[int]) -> str:
    """The encoder a modality of this shape gets by default (MLP, GRU or CNN)."""
    rank = len(input_shape)
    if rank not in DEFAULT_BY_RANK:
        raise MMLearnError(
            f"no default encoder for input shape {list(input_shape)} (rank {rank}); expected rank "
            f"1 (vector -> mlp), 2 (sequence [T, D] -> gru), 3 (image [C, H, W] -> cnn) or 4 "
            f"(frames [T, C, H, W] -> resnet18). "
            f"Name an encoder for this modality in model.encoders."
        )
    return DEFAULT_BY_RANK[rank]


def build_encoder(
    spec: Mapping[str, Any] | None,
    input_shape: Sequence[int],
    out_dim: int,
    where: str = "encoder",
) -> Encoder:
    """Build one encoder.

    Args:
        spec: ``{"name": <registered name>, **kwargs}``; ``None`` or no ``name`` picks the default
            for the input shape.
        input_shape: shape of one sample, without the batch dimension.
        out_dim: feature size of the output ``[B, out_dim]``.
        where: where the spec came from (e.g. ``model.encoders.pix``), named in errors.
    """
    spec = dict(spec or {})
    name = spec.pop("name", None) or default_encoder_name(input_shape)
    if name not in ENCODERS:
        raise MMLearnError(f"{where}: unknown encoder {name!r}; valid encoders: {sorted(ENCODERS)}")
    cls = ENCODERS[name]
    if cls.ranks and len(input_shape) not in cls.ranks:
        raise MMLearnError(
            f"{where}: encoder {name!r} takes inputs of rank {cls.ranks}, but the data gives "
            f"shape {list(input_shape)}"
        )
    params = inspect.signature(cls.__init__).parameters
    accepted = [p for p in params if p not in ("self", "input_shape", "out_dim")]
    unknown = sorted(set(spec) - set(accepted))
    if unknown:
        raise MMLearnError(
            f"{where}: encoder {name!r} has no option(s) {unknown}; its options are {accepted}"
        )
    return cls(list(input_shape), out_dim, **spec)
