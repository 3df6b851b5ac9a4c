"""Encoders by name: ``mlp``, ``cnn``, ``resnet18`` (images, frames), ``gru``, ``hf`` (tokens).

Importing this package registers all of them in :data:`ENCODERS`.
"""

from __future__ import annotations

from mmlearn.encoders import conv, huggingface, mlp, resnet, sequence  # noqa: F401  (registration)
from mmlearn.encoders.registry import (
    ENCODERS,
    Encoder,
    EncoderExample,
    build_encoder,
    default_encoder_name,
    register_encoder,
)

__all__ = [
    "ENCODERS",
    "Encoder",
    "EncoderExample",
    "build_encoder",
    "default_encoder_name",
    "register_encoder",
]
