"""One part's weights out of a checkpoint file (a run's `last.ckpt` or a bare state dict), read
as data (`weights_only=True`), with errors naming the file, the part and where such files come from."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn


def read_state_dict(path: str | Path, owner: str, hint: str) -> dict[str, Tensor]:
    """The checkpoint's `state_dict` (or the file itself); ValueError when it cannot be read."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for missing or foreign files
        raise ValueError(f"{owner}: cannot read weights {path}: {error} ({hint})") from None
    return checkpoint.get("state_dict", checkpoint)


def entries_under(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The entries whose keys start with `prefix`, the prefix removed."""
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def load_prefixed_weights(path: str | Path, prefix: str, owner: str, hint: str) -> dict[str, Tensor]:
    """A checkpoint's `prefix*` entries, the prefix removed; ValueError when there are none."""
    state = entries_under(read_state_dict(path, owner, hint), prefix)
    if not state:
        raise ValueError(f"{owner}: {path} holds no {prefix}* weights ({hint})")
    return state


def load_into(module: nn.Module, state: dict[str, Tensor], path: str | Path, owner: str) -> None:
    """Strict `load_state_dict`, a key or shape mismatch raised as a ValueError naming the file."""
    try:
        module.load_state_dict(state)
    except RuntimeError as error:  # torch's message lists the mismatches but not the file
        raise ValueError(f"{owner}: the weights in {path} do not fit the configured model: {error}") from None
