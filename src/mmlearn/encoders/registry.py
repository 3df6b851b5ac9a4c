"""The encoder registry: a name -> class table and the one function that builds encoders.

An encoder maps ``[B, *input_shape]`` to features ``[B, out_dim]``. Adding one is a new file with a
class decorated by :func:`register_encoder` that defines :meth:`Encoder.example`; the contract test
in ``tests/unit`` builds every registered encoder from its example, so it picks a new one up.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor, nn

from mmlearn.errors import MMLearnError, is_int, is_probability


@dataclass(frozen=True)
class EncoderExample:
    """A small input shape and options that an encoder is built from in its contract test.

    Args:
        input_shape: shape of one sample, without the batch dimension.
        options: keyword options of the encoder (small sizes, so the test is quick; nothing may
            be downloaded).
        make_batch: ``B -> [B, *input_shape]`` tensor of inputs; ``None`` draws standard normal
            floats. Token encoders draw non-padding ids (see :meth:`tokens`).
        inert_parameters: suffixes of parameter names that cannot move the output by design
            (e.g. an attention key bias: it shifts all of a query's scores equally, and softmax
            is invariant to that); the test that every parameter moves the output skips them.
    """

    input_shape: list[int]
    options: dict[str, Any] = field(default_factory=dict)
    make_batch: Callable[[int], Tensor] | None = None
    inert_parameters: tuple[str, ...] = ()

    @classmethod
    def tokens(cls, length: int, vocab_size: int, **kwargs: Any) -> EncoderExample:
        """Token ids ``[B, length]`` drawn from ``1 .. vocab_size - 1`` (0 is padding)."""
        return cls(
            [length], make_batch=lambda b: torch.randint(1, vocab_size, (b, length)), **kwargs
        )

    def batch(self, b: int) -> Tensor:
        """``b`` example inputs, ``[b, *input_shape]``."""
        if self.make_batch is not None:
            return self.make_batch(b)
        return torch.randn(b, *self.input_shape)


class Encoder(nn.Module):
    """Base class: ``forward(x: [B, *input_shape]) -> [B, out_dim]``.

    Subclasses set ``ranks`` (the accepted ``len(input_shape)``), take ``input_shape`` and
    ``out_dim`` as their first two constructor arguments, and override :meth:`example` with a
    small :class:`EncoderExample`: the input shape, options and batch maker of their contract test
    (``tests/unit/test_encoders.py`` builds ``cls(example.input_shape, out_dim,
    **example.options)`` for every registered encoder and fails for one without an example).
    For instance::

        @register_encoder("mlp")
        class MLPEncoder(Encoder):
            ranks = (1, 2, 3)

            @classmethod
            def example(cls) -> EncoderExample:
                return EncoderExample([12], {"hidden": [32]})
    """

    ranks: ClassVar[tuple[int, ...]] = ()
    out_dim: int

    @classmethod
    def example(cls) -> EncoderExample:
        """A small input and options to build and run this encoder with (override it)."""
        raise NotImplementedError(
            f"encoder {cls.__qualname__} has no example: override the classmethod "
            f"`example(cls) -> EncoderExample` (mmlearn.encoders.registry) with a small input "
            f"shape and options, so that the encoder contract test can build and run it"
        )


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
    bad_shape = [s for s in input_shape if not is_int(s, 1)]
    if bad_shape:
        raise MMLearnError(
            f"{where}: input shape {list(input_shape)}; expected sizes >= 1 (from the data)"
        )
    if not is_int(out_dim, 1):
        raise MMLearnError(f"{where}: out_dim={out_dim!r}; expected an integer >= 1 (embed_dim)")
    try:
        return cls(list(input_shape), out_dim, **spec)
    except MMLearnError as e:  # the encoder's own check, told where its options came from
        raise MMLearnError(f"{where}: {e}") from e


def check_size(owner: str, option: str, value: object, minimum: int = 1) -> None:
    """Refuse an encoder option that is not an integer ``>= minimum``."""
    if not is_int(value, minimum):
        raise MMLearnError(f"{owner}: {option}={value!r}; expected an integer >= {minimum}")


def check_sizes(owner: str, option: str, values: object, minimum: int = 1) -> None:
    """Refuse an encoder option that is not a list of integers ``>= minimum`` (layer sizes)."""
    if isinstance(values, Sequence) and not isinstance(values, str):
        if all(is_int(v, minimum) for v in values):
            return
        values = list(values)
    raise MMLearnError(f"{owner}: {option}={values!r}; expected a list of integers >= {minimum}")


def check_probability(owner: str, option: str, value: object) -> None:
    """Refuse a dropout probability outside ``[0, 1)``."""
    if not is_probability(value):
        raise MMLearnError(f"{owner}: {option}={value!r}; expected a probability in [0, 1)")
