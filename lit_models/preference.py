"""Preference optimisation for video diffusion: Diffusion-DPO (Wallace et al. 2023) and the
SFT-on-winners baseline.

Batches hold preference pairs (`datamodules/preference_pairs.py`): `win` and `lose` clips
`(B, C, F, H, W)` for the same `caption`. The trained part is whatever the PEFT paradigm's
`trainable` names (full fine-tune when empty); the reference is the frozen base: the same
network with its LoRA adapters disabled when only LoRA is trained (no second copy in
memory), else a frozen copy of the base taken before anything was injected.

`PreferenceObjective` is the objective; `DiffusionDPO` the diffusion module fine-tuning with it.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_models.lora import LoRA, adapters_disabled
from lit_models.objectives import Losses, Objective
from lit_models.peft import ParameterEfficientFineTuning


def per_sample_mse(prediction: Tensor, target: Tensor) -> Tensor:
    """Mean squared error per sample over every other dim (C, F, H, W): `(B,)`."""
    return F.mse_loss(prediction.float(), target.float(), reduction="none").flatten(1).mean(dim=1)


def dpo_loss(
    model_err_w: Tensor, model_err_l: Tensor, ref_err_w: Tensor, ref_err_l: Tensor, beta: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """Diffusion-DPO loss from per-sample denoising errors `(B,)` of the trained and reference
    models on the winner (w) and loser (l), noised at the same t with the same noise.

        loss = -log sigmoid(-beta/2 * ((err_w - ref_w) - (err_l - ref_l)))

    This is the official Diffusion-DPO code's `-logsigmoid(-0.5 * beta * (model_diff -
    ref_diff))`. diffusers' research example (examples/research_projects/diffusion_dpo)
    drops the 0.5, so its `beta_dpo` is twice ours for the same loss.

    Returns the mean loss and statistics: `implicit_accuracy` (the fraction of pairs where the
    model improved more on the winner than on the loser, relative to the reference) and
    `reward_margin` (the mean of the sigmoid's argument, the implicit reward gap).
    """
    model_diff = model_err_w - model_err_l  # (B,)
    ref_diff = ref_err_w - ref_err_l
    logits = -0.5 * beta * (model_diff - ref_diff)
    loss = -F.logsigmoid(logits).mean()
    stats = {
        "implicit_accuracy": (logits > 0).float().mean(),
        "reward_margin": logits.mean(),
        "model_diff": model_diff.mean(),
        "ref_diff": ref_diff.mean(),
    }
    return loss, stats


def epsilon_error_scale(noise_scheduler: Any, timesteps: Tensor, prediction_type: str) -> Tensor:
    """Factor `(B,)` turning a per-sample squared error in the prediction's space into the
    squared error of the implied noise estimate (the space of the paper's formula).

    For v = alpha eps - sigma x0 the implied noise is eps_hat = sigma x_t + alpha v_hat, so
    eps - eps_hat = alpha (v - v_hat): squared errors scale by alpha_t^2 = alphas_cumprod[t].
    For flow matching (x_t = (1 - s) x0 + s eps, velocity u = eps - x0) the implied noise is
    eps_hat = x_t + (1 - s) u_hat, so squared errors scale by (1 - s)^2, s = t / T.
    """
    if prediction_type == "epsilon":
        return torch.ones(timesteps.shape, device=timesteps.device)
    if prediction_type == "v_prediction":
        return noise_scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    if prediction_type == "flow_prediction":
        sigma = timesteps.float() / noise_scheduler.config.num_train_timesteps
        return (1 - sigma) ** 2
    raise ValueError(f"DPO supports epsilon, v_prediction and flow_prediction targets, not {prediction_type!r}")


class PreferenceObjective(Objective):
    """Diffusion-DPO on preference pairs (or, with `objective="sft"`, the denoising loss on the
    winners only: the supervised baseline at equal cost). Both clips of a pair go to diffusion
    space the same way (`module.clean_data(batch, "win" | "lose")`: the VAE's latents for a
    latent model), conditioned on the shared caption.

    Args:
        beta: DPO temperature (official-code convention, see `dpo_loss`).
        objective: "dpo" or "sft".
        error_space: "epsilon" measures errors as noise-prediction errors (the paper's formula;
            for a v-prediction model the v error times alpha_t^2), "prediction" in the model's
            own target space (plain v-MSE for v-prediction).
    """

    def __init__(self, beta: float = 5000.0, objective: str = "dpo", error_space: str = "epsilon") -> None:
        super().__init__()
        if objective not in ("dpo", "sft"):
            raise ValueError(f"DiffusionDPO: objective must be 'dpo' or 'sft', got {objective!r}")
        if error_space not in ("epsilon", "prediction"):
            raise ValueError(f"DiffusionDPO: error_space must be 'epsilon' or 'prediction', got {error_space!r}")
        self.beta, self.objective, self.error_space = beta, objective, error_space
        self.reference_net: nn.Module | None = None

    def before_injection(self, net: nn.Module, trainable: Sequence[Any] | None) -> None:
        # A frozen copy of the base, unless the base can be recovered by disabling LoRA.
        injectors = list(trainable or [])
        lora_only = bool(injectors) and all(isinstance(i, LoRA) for i in injectors)
        if self.objective == "dpo" and not lora_only:
            self.reference_net = copy.deepcopy(net).requires_grad_(False).eval()

    def bind(self, module: Any) -> None:
        if self.objective == "dpo":
            module.min_snr_gamma = None  # DPO compares raw errors

    def keep_frozen_in_eval(self) -> None:
        if self.reference_net is not None:
            self.reference_net.eval()

    @contextlib.contextmanager
    def reference(self, net: nn.Module) -> Iterator[nn.Module]:
        """The reference model: the frozen copy, or `net` with LoRA disabled."""
        if self.reference_net is not None:
            yield self.reference_net
        else:
            with adapters_disabled(net) as base:
                yield base

    def preference_errors(self, module: Any, win: Tensor, lose: Tensor, conditioning: dict[str, Tensor],
                          generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
        """Per-sample errors `(B,)` of model and reference on winners and losers (in diffusion
        space: latents for a latent model)."""
        timesteps = module.draw_timesteps(win, generator)
        noise = torch.randn(win.shape, generator=generator).to(win)  # (B, C, F, H, W)
        x0 = torch.cat([win, lose])  # (2B, C, F, H, W), same noise and t for w and l
        noise2, timesteps2 = torch.cat([noise, noise]), torch.cat([timesteps, timesteps])
        x_t, target = module.noisy_and_target(x0, noise2, timesteps2)
        conditioning2 = {k: torch.cat([v, v]) for k, v in conditioning.items()}
        scale = 1.0
        if self.error_space == "epsilon":
            scale = epsilon_error_scale(module.noise_scheduler, timesteps2, module.prediction_type)
        model_err = per_sample_mse(module.net(x_t, timesteps2, **conditioning2), target) * scale
        with torch.no_grad(), self.reference(module.net) as reference:
            ref_err = per_sample_mse(reference(x_t, timesteps2, **conditioning2), target) * scale
        return (*model_err.chunk(2), *ref_err.chunk(2))  # type: ignore[return-value]

    def forward(self, module: Any, batch: dict[str, Any], stage: str, generator: torch.Generator | None) -> Losses:
        win = module.clean_data(batch, "win")  # (B, C, F, H, W) in diffusion space
        conditioning = module.text_condition(batch, drop=False)
        if self.objective == "sft":
            return {"loss": module.diffusion_loss(win, conditioning, generator).mean()}, win.shape[0]
        lose = module.clean_data(batch, "lose")
        loss, stats = dpo_loss(*self.preference_errors(module, win, lose, conditioning, generator), beta=self.beta)
        return {"loss": loss, **stats}, win.shape[0]


class DiffusionDPO(ParameterEfficientFineTuning):
    """Preference fine-tuning (`PreferenceObjective`: `beta`, `objective`, `error_space`) of a
    frozen base; `ParameterEfficientFineTuning`'s other arguments, without a control signal
    (preference pairs carry no control clip)."""

    def __init__(self, beta: float = 5000.0, objective: str = "dpo", error_space: str = "epsilon",
                 control_signal: str | None = None, **peft: Any) -> None:  # fmt: skip
        if control_signal is not None:
            raise ValueError("DiffusionDPO: control_signal is not supported (preference pairs carry no control clip)")
        super().__init__(objective=PreferenceObjective(beta, objective, error_space), **peft)
