"""Preference optimisation for video diffusion: Diffusion-DPO (Wallace et al. 2023) and the
SFT-on-winners baseline.

Batches hold preference pairs (`datamodules/preference_pairs.py`): `win` and `lose` clips
`(B, C, F, H, W)` for the same `caption`. The trained part is whatever the PEFT paradigm's
`trainable` names (full fine-tune when empty); the reference is the frozen base: the same
network with its LoRA adapters disabled when only LoRA is trained (no second copy in
memory), else a frozen copy of the base taken before anything was injected.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_models.peft import LoRA, ParameterEfficientFineTuning, adapters_disabled


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


class DiffusionDPO(ParameterEfficientFineTuning):
    """Diffusion-DPO on preference pairs (or, with `objective="sft"`, the denoising loss on the
    winners only: the supervised baseline at equal cost).

    Args:
        beta: DPO temperature (official-code convention, see `dpo_loss`).
        objective: "dpo" or "sft".
        error_space: "epsilon" measures errors as noise-prediction errors (the paper's formula;
            for a v-prediction model the v error times alpha_t^2), "prediction" in the model's
            own target space (plain v-MSE for v-prediction).
        **peft: `ParameterEfficientFineTuning` arguments (net, text_encoder, trainable, ...).
    """

    def __init__(self, beta: float = 5000.0, objective: str = "dpo", error_space: str = "epsilon", **peft: Any) -> None:
        if objective not in ("dpo", "sft"):
            raise ValueError(f"DiffusionDPO: objective must be 'dpo' or 'sft', got {objective!r}")
        if error_space not in ("epsilon", "prediction"):
            raise ValueError(f"DiffusionDPO: error_space must be 'epsilon' or 'prediction', got {error_space!r}")
        injectors = list(peft.get("trainable") or [])
        # A frozen copy of the base, unless the base can be recovered by disabling LoRA.
        self._lora_only = bool(injectors) and all(isinstance(i, LoRA) for i in injectors)
        reference = None
        if objective == "dpo" and not self._lora_only:
            reference = copy.deepcopy(peft["net"]).requires_grad_(False).eval()
        super().__init__(**peft)
        self.beta, self.objective, self.error_space = beta, objective, error_space
        self.reference_net = reference
        self.min_snr_gamma = None if objective == "dpo" else self.min_snr_gamma

    @contextlib.contextmanager
    def reference(self) -> Iterator[nn.Module]:
        """The reference model: the net with LoRA disabled, or the frozen copy."""
        if self.reference_net is not None:
            yield self.reference_net
        else:
            with adapters_disabled(self.net) as net:
                yield net

    def preference_errors(
        self, win: Tensor, lose: Tensor, conditioning: dict[str, Tensor], generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Per-sample errors `(B,)` of model and reference on winners and losers (in diffusion
        space: latents for a latent model)."""
        timesteps = self.draw_timesteps(win, generator)
        noise = torch.randn(win.shape, generator=generator).to(win)  # (B, C, F, H, W)
        x0 = torch.cat([win, lose])  # (2B, C, F, H, W), same noise and t for w and l
        noise2, timesteps2 = torch.cat([noise, noise]), torch.cat([timesteps, timesteps])
        x_t, target = self.noisy_and_target(x0, noise2, timesteps2)
        conditioning2 = {k: torch.cat([v, v]) for k, v in conditioning.items()}
        scale = 1.0
        if self.error_space == "epsilon":
            scale = epsilon_error_scale(self.noise_scheduler, timesteps2, self.prediction_type)
        model_err = per_sample_mse(self.net(x_t, timesteps2, **conditioning2), target) * scale
        with torch.no_grad(), self.reference() as reference:
            ref_err = per_sample_mse(reference(x_t, timesteps2, **conditioning2), target) * scale
        return (*model_err.chunk(2), *ref_err.chunk(2))  # type: ignore[return-value]

    def _step(self, batch: dict[str, Any], stage: str, generator: torch.Generator | None) -> Tensor:
        # Both clips of a pair go to diffusion space (the VAE's latents for a latent model).
        win, lose = self.encode_data(batch["win"]), self.encode_data(batch["lose"])
        conditioning = self.condition({"caption": batch["caption"], "video": batch["win"]}, drop=False)
        if self.objective == "sft":
            loss = self.diffusion_loss(win, conditioning, generator).mean()
            self.log(f"{stage}/loss", loss, prog_bar=True, batch_size=win.shape[0])
            return loss
        errors = self.preference_errors(win, lose, conditioning, generator)
        loss, stats = dpo_loss(*errors, beta=self.beta)
        self.log(f"{stage}/loss", loss, prog_bar=True, batch_size=win.shape[0])
        for name, value in stats.items():
            self.log(f"{stage}/{name}", value, prog_bar=name == "implicit_accuracy", batch_size=win.shape[0])
        return loss

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        return self._step(batch, "train", None)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        return self._step(batch, "val", torch.Generator().manual_seed(batch_idx))

    def score(self, prompts: Any, videos: Tensor) -> dict[str, float]:
        """The digit metric plus the mean reward the preference data was ranked by."""
        scores = super().score(prompts, videos)
        if scores:  # moving-digit prompts
            from lit_models.rewards import digit_reward

            scores["reward"] = float(digit_reward(videos, list(prompts)).mean())
        return scores
