"""Precomputed inputs (`effvid-data encode`): which encoders made them, and the check that a
training run diffuses with the same ones.

Latents from one VAE fed to a run that decodes with another train fine and sample garbage,
with no error anywhere; so encoded shards carry `_encoder.json` with a fingerprint of each
encoder's weights, and a run refuses shards whose fingerprints are not its own.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

ENCODER_INFO_NAME = "_encoder.json"


class EncoderMismatchError(ValueError):
    """Encoded shards were made by other encoders (or settings) than a run uses."""


def module_fingerprint(module: nn.Module) -> str:
    """sha256 of a module's state dict (names, dtypes, shapes and values), 16 hex digits."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def autoencoder_info(autoencoder: Any) -> dict[str, Any]:
    """What a run's latents depend on: the VAE weights, its scaling and downscale."""
    return {
        "fingerprint": module_fingerprint(autoencoder.vae),
        "scaling_factor": autoencoder.scaling_factor,
        "latent_channels": autoencoder.latent_channels,
        "downscale": autoencoder.downscale,
    }


def text_encoder_info(text_encoder: Any) -> dict[str, Any]:
    return {
        "fingerprint": module_fingerprint(text_encoder),
        "context_length": text_encoder.context_length,
        "token_dim": text_encoder.token_dim,
        "pooled_dim": text_encoder.pooled_dim,
    }


def read_encoder_info(shard_dir: str | Path) -> dict[str, Any] | None:
    """`_encoder.json` of an encoded shard folder, or None for raw shards."""
    path = Path(shard_dir) / ENCODER_INFO_NAME
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise EncoderMismatchError(f"{path} is not readable JSON: {error}") from None


def check_encoders(info: dict[str, Any], where: str, autoencoder: Any | None, text_encoder: Any | None) -> None:
    """Raise `EncoderMismatchError` naming `where` and the key if the shards' encoders differ
    from the run's (a run without an autoencoder cannot use latents at all)."""
    if info.get("autoencoder") is not None:
        if autoencoder is None:
            raise EncoderMismatchError(
                f"{where} holds VAE latents but the run has no paradigm.autoencoder; add the one "
                "the shards were encoded with (+autoencoder=digits paradigm.autoencoder.weights=...)"
            )
        _compare(info["autoencoder"], autoencoder_info(autoencoder), where, "autoencoder")
    if info.get("text_encoder") is not None:
        if text_encoder is None:
            raise EncoderMismatchError(f"{where} holds text embeddings but the run has no text encoder")
        if getattr(text_encoder, "trainable", False):
            raise EncoderMismatchError(
                f"{where} holds precomputed text embeddings but paradigm.text_encoder.trainable=true; "
                "they would go stale as the encoder trains: set it to false, or encode with --skip-text"
            )
        _compare(info["text_encoder"], text_encoder_info(text_encoder), where, "text_encoder")


def _compare(stored: dict[str, Any], current: dict[str, Any], where: str, name: str) -> None:
    for key, value in current.items():
        if stored.get(key) != value:
            raise EncoderMismatchError(
                f"{where}/{ENCODER_INFO_NAME}: {name}.{key} is {stored.get(key)!r} but this run's "
                f"{name} gives {value!r}; re-encode with the run's config (effvid-data encode)"
            )
