"""LoRA through `peft`: the injector, switching adapters off (a DPO reference without a second
copy), merging, and the safetensors export / import with the rank and alpha that scale it."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from torch import nn


class LoRA:
    """LoRA through `peft.inject_adapter_in_model` on the modules whose names match.

    Args:
        target_modules: a regex over full module names (peft's `target_modules` string form)
            or a list of name suffixes. The default covers the factorized U-Net's spatial
            and temporal attention projections and ResBlock convs.
        rank, alpha, dropout: LoRA's r, lora_alpha, lora_dropout.
    """

    DEFAULT_TARGETS = r".*(to_q|to_kv|to_qkv|to_out|proj_in|proj_out|conv1|conv2)$"

    def __init__(
        self,
        target_modules: str | Sequence[str] = DEFAULT_TARGETS,
        rank: int = 8,
        alpha: float = 8.0,
        dropout: float = 0.0,
        adapter_name: str = "default",
    ) -> None:
        self.target_modules = target_modules if isinstance(target_modules, str) else list(target_modules)
        self.rank, self.alpha, self.dropout, self.adapter_name = rank, alpha, dropout, adapter_name

    def config(self) -> Any:
        from peft import LoraConfig

        return LoraConfig(
            r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=self.target_modules
        )

    def __call__(self, net: nn.Module) -> nn.Module:
        from peft import inject_adapter_in_model

        try:
            return inject_adapter_in_model(self.config(), net, adapter_name=self.adapter_name)
        except ValueError as error:  # peft: "Target modules ... not found in the base model"
            raise ValueError(f"LoRA: target_modules={self.target_modules!r} match no module of the net: {error}") from None


def lora_layers(net: nn.Module) -> list[nn.Module]:
    from peft.tuners.lora import LoraLayer

    return [m for m in net.modules() if isinstance(m, LoraLayer)]


@contextlib.contextmanager
def adapters_disabled(net: nn.Module) -> Iterator[nn.Module]:
    """The net with its LoRA layers switched off: the base, with no second copy in memory."""
    layers = lora_layers(net)
    if not layers:
        raise ValueError("adapters_disabled: the net has no LoRA layers")
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield net
    finally:
        for layer in layers:
            layer.enable_adapters(True)
            # enable_adapters re-marks the adapter trainable; that is what it was.


def merge_lora(net: nn.Module) -> None:
    """Fold the LoRA deltas into the base weights (faster inference; `unmerge_lora` undoes)."""
    for layer in lora_layers(net):
        layer.merge()


def unmerge_lora(net: nn.Module) -> None:
    for layer in lora_layers(net):
        layer.unmerge()


def merge_and_unload_lora(net: nn.Module) -> nn.Module:
    """Fold every LoRA into its base weight and put the plain base layer back in its place, so
    parameter names are the base model's again (`to_q.weight`, not `to_q.base_layer.weight`):
    what `save_pretrained` must see for diffusers to load the weights instead of initialising
    them anew. In place; returns `net`."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(net.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(net.get_submodule(parent_name) if parent_name else net, child, module.get_base_layer())
    return net


def _lora_scalings(net: nn.Module, adapter_name: str) -> set[tuple[int, float]]:
    return {(layer.r[adapter_name], float(layer.lora_alpha[adapter_name])) for layer in lora_layers(net)}


def export_lora(net: nn.Module, path: str | Path, lora: LoRA | None = None, adapter_name: str = "default") -> Path:
    """Write an effvid net's adapter alone to a safetensors file, in peft's keys (`...lora_A.weight`,
    adapter name removed), with the rank and alpha in its metadata: alpha / rank scales the update,
    and a file without it would load at the wrong strength. (Pretrained diffusers families export
    through `lit_models/export.py`, in the layout their pipelines' `load_lora_weights` reads.)"""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    state = get_peft_model_state_dict(net, adapter_name=adapter_name)
    if not state:
        raise ValueError("export_lora: the net has no LoRA weights")
    scalings = _lora_scalings(net, adapter_name)
    if len(scalings) != 1:
        raise ValueError(f"export_lora: layers differ in (rank, alpha) {sorted(scalings)}; one pair per file")
    (rank, alpha), = scalings
    config = lora.config().to_dict() if lora is not None else {"r": rank, "lora_alpha": alpha}
    config = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}
    state = {k: v.detach().contiguous() for k, v in state.items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata={"format": "pt", "lora_adapter_metadata": json.dumps(config, default=str)})
    return path


def import_lora(net: nn.Module, path: str | Path, adapter_name: str = "default") -> None:
    """Load an `export_lora` file into a net that has LoRA layers of the same rank and alpha."""
    from peft import set_peft_model_state_dict
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as handle:
        metadata = json.loads((handle.metadata() or {}).get("lora_adapter_metadata", "{}"))
    ours = _lora_scalings(net, adapter_name)
    if metadata and ours != {(int(metadata["r"]), float(metadata["lora_alpha"]))}:
        raise ValueError(
            f"import_lora: {path} holds rank {metadata['r']}, alpha {metadata['lora_alpha']}; the net's LoRA "
            f"layers have (rank, alpha) {sorted(ours)}"
        )
    result = set_peft_model_state_dict(net, load_file(str(path)), adapter_name=adapter_name)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"import_lora: {path} has keys the net's LoRA layers lack, e.g. {unexpected[:3]}")
