"""What a diffusion module trains and what its checkpoint holds (a mixin of `DiffusionModule`).

A module given `trainable` (a list of injectors, `lit_models/injectors.py`) fine-tunes a frozen
base: the base and the text encoder are frozen, the injectors add (or unfreeze) what trains, and
checkpoints hold only those weights plus where the base came from (`base`). An empty list trains
the whole base (full fine-tuning). Without `trainable` everything trainable trains and is saved,
except `external_parts`, the parts a `pretrained=` bundle gives back at every load.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn


def count_parameters(module: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(module.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory since start: CUDA's allocator peak on a GPU; on a CPU the process's peak
    resident set size (`ru_maxrss`), which includes the interpreter and libraries."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# What objectives hold, saved at the module's top level before paradigms became objectives.
LEGACY_OBJECTIVE_KEYS = ("teacher.", "target_net.", "reference_net.")


def with_objective_prefix(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """A checkpoint of a distillation run from before objectives, with today's key names."""
    return {("objective." + k if k.startswith(LEGACY_OBJECTIVE_KEYS) or k == "round" else k): v for k, v in state_dict.items()}


class FineTuningCheckpoint:
    """Injection of `trainable` and the checkpoint content that follows from it."""

    # Submodule prefixes rebuilt from `pretrained=` whenever the run is loaded (a bundle's frozen
    # text encoder and VAE, gigabytes for the real families), so checkpoints leave them out.
    external_parts: tuple[str, ...] = ()
    trainable_names: set[str] | None = None  # None: not a fine-tune, everything is saved

    @staticmethod
    def inject(net: nn.Module, trainable: Sequence[Any] | None, text_encoder: nn.Module | None) -> nn.Module:
        """The base with the injectors applied in order (frozen first); None leaves it as is."""
        if trainable is None:
            return net
        injectors = list(trainable)
        net.requires_grad_(not injectors)  # no injector: full fine-tuning of the base
        for inject in injectors:
            net = inject(net)
        if text_encoder is not None:
            text_encoder.requires_grad_(False)
        return net

    def record_trainable(self, trainable: Sequence[Any] | None) -> None:
        self._peak_memory_logged = trainable is None  # only fine-tunes report their memory
        if trainable is None:
            return
        self.injectors = list(trainable)
        self.trainable_names = {n for n, p in self.named_parameters() if p.requires_grad}
        if not self.trainable_names:
            raise ValueError(f"{type(self).__name__}: nothing to train (every parameter is frozen)")

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        state = super().state_dict(*args, **kwargs)
        prefix = kwargs.get("prefix", args[1] if len(args) > 1 else "")
        # In place: nested calls (EMA's AveragedModel) write into the caller's dict.
        if self.trainable_names is not None:
            drop = [k for k in state if k.startswith(prefix) and k[len(prefix) :] not in self.trainable_names]
        else:
            skip = tuple(prefix + p for p in self.external_parts)
            drop = [k for k in state if self.external_parts and k.startswith(skip)]
        for key in drop:
            del state[key]
        return state

    def load_state_dict(self, state_dict: dict[str, Tensor], strict: bool = True, assign: bool = False) -> Any:
        state_dict = with_objective_prefix(state_dict)
        if self.trainable_names is not None:
            unexpected = sorted(set(state_dict) - set(torch.nn.Module.state_dict(self)))
            missing = sorted(self.trainable_names - set(state_dict))
            if strict and (unexpected or missing):
                raise RuntimeError(
                    f"{type(self).__name__}: checkpoint does not match the trained modules: "
                    f"missing {missing[:5]}, unexpected {unexpected[:5]}"
                )
            result = super().load_state_dict(state_dict, strict=False, assign=assign)
            return type(result)(missing, unexpected)
        if self.external_parts:
            own = torch.nn.Module.state_dict(self)
            state_dict = {**{k: v for k, v in own.items() if k.startswith(self.external_parts)}, **state_dict}
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.trainable_names is not None:
            checkpoint["effvid_base"] = {"base": self.base, "trained": sorted(self.trainable_names)}

    def on_fit_start(self) -> None:
        if self.trainable_names is None:
            return
        trainable, total = count_parameters(self)
        self.print(f"PEFT: training {trainable:,} of {total:,} parameters ({100 * trainable / max(total, 1):.2f}%)")
        if self.logger:
            self.logger.log_hyperparams({"params/trainable": trainable, "params/total": total})

    def log_peak_memory(self) -> None:
        if not self._peak_memory_logged and self.global_step >= 1:
            self._peak_memory_logged = True
            self.log("memory/peak_mb", peak_memory_mb(self.device), rank_zero_only=True)
