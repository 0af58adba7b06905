"""Step distillation of a trained text-to-video teacher into a few-step student.

- `ProgressiveDistillation` (Salimans & Ho 2022, as Imagen Video uses it): the student learns
  to take in one DDIM step what the teacher takes in two; after each round the student becomes
  the teacher and the step count halves. v-prediction, as in the paper.
- `ConsistencyDistillation` (LCM, Luo et al. 2023 / AnimateLCM): the student, read through
  the consistency parameterization `c_skip(t) x_t + c_out(t) x0(x_t, t)`, maps a point on the
  teacher's probability-flow ODE to the same clean video as an EMA copy of itself does one
  teacher DDIM step further down; sampled with diffusers' `LCMScheduler` in 1-4 steps.
- `PhasedConsistencyDistillation` (PCM, Wang et al. 2024): the trajectory is cut into as many
  phases as sampling steps, and the student maps each point to the start of its phase rather than
  to the clean video, so a few deterministic DDIM steps on the phase edges follow the teacher's
  ODE instead of re-noising after every LCM jump.

Both start the student (and the frozen text tower) from the teacher, a run checkpoint
(`teacher_checkpoint`) or any `pretrained=` bundle with a DDPM-style schedule (an effvid run, an
SD / ModelScope / CogVideoX folder), and distil the teacher's classifier-free guidance into it,
so students sample with guidance 1.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler
from torch import Tensor, nn

from lit_models.checkpoint_weights import read_state_dict
from lit_models.diffusion import DiffusionModule
from lit_models.forward_process import Conditioning
from lit_models.objectives import Losses, Objective


def _expand(values: Tensor, like: Tensor) -> Tensor:
    return values.view(-1, *([1] * (like.ndim - 1))).to(like)


def split_prediction(output: Tensor, x_t: Tensor, alpha_bar: Tensor, prediction_type: str) -> tuple[Tensor, Tensor]:
    """(x0, eps) from a network output at noise level `alpha_bar` `(B,)`."""
    alpha, sigma = _expand(alpha_bar.sqrt(), x_t), _expand((1 - alpha_bar).sqrt(), x_t)
    if prediction_type == "v_prediction":
        return alpha * x_t - sigma * output, sigma * x_t + alpha * output
    if prediction_type == "epsilon":
        return (x_t - sigma * output) / alpha, output
    if prediction_type == "sample":
        return output, (x_t - alpha * output) / sigma
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


def ddim_step(x0: Tensor, eps: Tensor, alpha_bar_prev: Tensor) -> Tensor:
    """Deterministic DDIM update to noise level `alpha_bar_prev` `(B,)`."""
    return _expand(alpha_bar_prev.sqrt(), x0) * x0 + _expand((1 - alpha_bar_prev).sqrt(), x0) * eps


def consistency_scalings(timesteps: Tensor, sigma_data: float = 0.5, timestep_scaling: float = 10.0) -> tuple[Tensor, Tensor]:
    """LCM's boundary-condition scalings `(c_skip, c_out)`, as diffusers' `LCMScheduler` applies
    them at sampling: c_skip(0) = 1 and c_out(0) = 0, so the consistency function is the identity
    at t = 0."""
    scaled = timesteps.float() * timestep_scaling
    c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
    c_out = scaled / (scaled**2 + sigma_data**2).sqrt()
    return c_skip, c_out


def load_teacher_weights(module: nn.Module, checkpoint: str | Path) -> None:
    """Load a text-to-video run checkpoint's `net.*` and `text_encoder.*` weights (the EMA ones)."""
    state = read_state_dict(checkpoint, "teacher_checkpoint", "point it at runs/RUN_ID/checkpoints/last.ckpt")
    state = {k: v for k, v in state.items() if k.startswith(("net.", "text_encoder."))}
    missing, unexpected = module.load_state_dict(state, strict=False)
    missing = [k for k in missing if k.startswith(("net.", "text_encoder."))]
    if missing or unexpected:
        raise ValueError(
            f"teacher_checkpoint {checkpoint} does not match the configured model (model=/paradigm.text_encoder "
            f"must be the teacher run's): missing {missing[:5]}, unexpected {unexpected[:5]}"
        )


class TeacherDistillation(Objective):
    """Distillation from a frozen teacher, the student's starting point (`module.net` after the
    teacher checkpoint is loaded into it); the text tower is frozen.

    Args:
        teacher_checkpoint: the teacher run's `last.ckpt`; None keeps the given weights (tests).
        teacher_guidance: classifier-free guidance scale of the teacher's predictions.
    """

    def __init__(self, teacher_checkpoint: str | None = None, teacher_guidance: float = 5.0) -> None:
        super().__init__()
        self.teacher_checkpoint, self.teacher_guidance = teacher_checkpoint, teacher_guidance
        self.noise_scheduler: Any = None
        self.prediction_type = "epsilon"

    def bind(self, module: Any) -> None:
        if module.flow_matching:
            raise ValueError(
                f"{type(module).__name__} distils a DDPM-style (epsilon / v) teacher along its DDIM trajectory; this "
                "teacher trains with flow matching (LTX-Video, Wan), which it does not cover"
            )
        if self.teacher_checkpoint is not None:
            load_teacher_weights(module, self.teacher_checkpoint)
        module.text_encoder.trainable = False
        module.text_encoder.requires_grad_(False).eval()
        self.teacher = copy.deepcopy(module.net).requires_grad_(False).eval()
        self.noise_scheduler, self.prediction_type = module.noise_scheduler, module.prediction_type

    def keep_frozen_in_eval(self) -> None:
        self.teacher.eval()

    def alpha_bar(self, timesteps: Tensor) -> Tensor:
        """Cumulative alpha at integer timesteps `(B,)`; t < 0 is the end of sampling
        (alphas_cumprod[0], as DDIM with `set_alpha_to_one=False`)."""
        alphas = self.noise_scheduler.alphas_cumprod.to(timesteps.device)
        return alphas[timesteps.clamp(min=0)]

    @torch.no_grad()
    def teacher_x0_eps(self, x_t: Tensor, timesteps: Tensor, conditioning: Conditioning, unconditioning: Conditioning) -> tuple[Tensor, Tensor]:
        """The guided teacher's (x0, eps) at `x_t`, conditional and unconditional in one batch."""
        both = {k: torch.cat([unconditioning[k], conditioning[k]]) for k in conditioning}
        out_uncond, out_cond = self.teacher(torch.cat([x_t, x_t]), torch.cat([timesteps, timesteps]), **both).chunk(2)
        out = out_uncond + self.teacher_guidance * (out_cond - out_uncond)
        return split_prediction(out.float(), x_t, self.alpha_bar(timesteps), self.prediction_type)

    def noised(self, x0: Tensor, timesteps: Tensor) -> Tensor:
        return self.noise_scheduler.add_noise(x0, torch.randn_like(x0), timesteps)

    @staticmethod
    def captions_conditioning(module: Any, batch: dict[str, Any]) -> tuple[Conditioning, Conditioning]:
        captions = list(batch["caption"])
        return module.encode_captions(captions), module.encode_captions([""] * len(captions))


class ProgressiveDistillationLoss(TeacherDistillation):
    """Progressive distillation: round r trains a `teacher_steps / 2^(r+1)`-step DDIM student.

    Args:
        teacher_steps: DDIM steps of the teacher in round 0 (e.g. 8 -> students of 4, 2, 1).
        steps_per_round: optimizer steps per round; then the student becomes the teacher.
        timestep_spacing: diffusers spacing of the DDIM grids ("trailing" starts at t = T - 1,
            which few-step sampling needs); sample the student with the matching sampler.
        **teacher: `TeacherDistillation` arguments.
    """

    def __init__(self, teacher_steps: int = 16, steps_per_round: int = 500, timestep_spacing: str = "trailing", **teacher: Any) -> None:
        super().__init__(**teacher)
        self.teacher_steps = teacher_steps
        self.steps_per_round = steps_per_round
        self.timestep_spacing = timestep_spacing
        self.register_buffer("round", torch.zeros((), dtype=torch.long))

    def bind(self, module: Any) -> None:
        super().bind(module)
        num_train_timesteps = self.noise_scheduler.config.num_train_timesteps
        if self.teacher_steps < 2 or self.teacher_steps % 2 or num_train_timesteps % self.teacher_steps:
            # DDIM steps from t to t - T // steps; two teacher strides must be one student stride.
            raise ValueError(
                f"ProgressiveDistillation: teacher_steps must be even and divide num_train_timesteps="
                f"{num_train_timesteps}, got {self.teacher_steps}"
            )
        module.sample_steps = self.student_steps

    @property
    def student_steps(self) -> int:
        return max(1, self.teacher_steps // 2 ** (int(self.round) + 1))

    def grid(self, steps: int) -> Tensor:
        """DDIM timesteps of a `steps`-step sampler, descending."""
        ddim = DDIMScheduler.from_config(self.noise_scheduler.config, timestep_spacing=self.timestep_spacing)
        ddim.set_timesteps(steps)
        return ddim.timesteps.to(self.round.device)

    def student_target(self, x_t: Tensor, timesteps: Tensor, conditioning: Conditioning, unconditioning: Conditioning) -> Tensor:
        """The student's prediction target at `(x_t, t)`: the output whose single DDIM step to
        t'' lands where two teacher DDIM steps t -> t' -> t'' do."""
        teacher_stride = self.noise_scheduler.config.num_train_timesteps // (2 * self.student_steps)
        t_mid, t_end = timesteps - teacher_stride, timesteps - 2 * teacher_stride
        x0, eps = self.teacher_x0_eps(x_t, timesteps, conditioning, unconditioning)
        x_mid = ddim_step(x0, eps, self.alpha_bar(t_mid))
        x0, eps = self.teacher_x0_eps(x_mid, t_mid.clamp(min=0), conditioning, unconditioning)
        x_end = ddim_step(x0, eps, self.alpha_bar(t_end))
        # Solve x_end = a'' x0~ + s'' (x_t - a x0~) / s for the x0~ of one student DDIM step.
        alpha_bar, alpha_bar_end = self.alpha_bar(timesteps), self.alpha_bar(t_end)
        a, s = _expand(alpha_bar.sqrt(), x_t), _expand((1 - alpha_bar).sqrt(), x_t)
        a_end, s_end = _expand(alpha_bar_end.sqrt(), x_t), _expand((1 - alpha_bar_end).sqrt(), x_t)
        x0_student = (x_end - s_end / s * x_t) / (a_end - s_end / s * a)
        eps_student = (x_t - a * x0_student) / s
        if self.prediction_type == "v_prediction":
            return a * eps_student - s * x0_student
        if self.prediction_type == "epsilon":
            return eps_student
        return x0_student

    def on_train_batch_start(self, module: Any) -> None:
        target_round = module.global_step // self.steps_per_round
        if target_round > int(self.round) and self.student_steps % 2 == 0 and self.student_steps > 1:
            self.teacher.load_state_dict(module.net.state_dict())
            self.round.fill_(target_round)
            module.sample_steps = self.student_steps

    def forward(self, module: Any, batch: dict[str, Any], stage: str, generator: torch.Generator | None) -> Losses:
        x0 = module.clean_data(batch)  # (B, C, F, H, W) in diffusion space
        conditioning, unconditioning = self.captions_conditioning(module, batch)
        grid = self.grid(self.student_steps)
        timesteps = grid[torch.randint(0, len(grid), (x0.shape[0],), device=grid.device)]
        x_t = self.noised(x0, timesteps)
        target = self.student_target(x_t, timesteps, conditioning, unconditioning)
        loss = F.mse_loss(module.net(x_t, timesteps, **conditioning).float(), target)
        return {"loss": loss, "student_steps": torch.tensor(float(self.student_steps))}, x0.shape[0]


class ConsistencyDistillationLoss(TeacherDistillation):
    """Latent-consistency-style distillation with a DDIM teacher solver and an EMA target.

    Args:
        num_ddim_timesteps: the teacher solver's grid (LCM's `original_inference_steps`); one
            solver step spans `num_train_timesteps / num_ddim_timesteps` timesteps.
        target_ema: decay of the target network towards the student after every step.
        huber_c: pseudo-Huber constant of the loss (LCM); None for MSE.
        **teacher: `TeacherDistillation` arguments.
    """

    def __init__(self, num_ddim_timesteps: int = 50, target_ema: float = 0.95, huber_c: float | None = 0.001, **teacher: Any) -> None:
        super().__init__(**teacher)
        self.num_ddim_timesteps = num_ddim_timesteps
        self.target_ema = target_ema
        self.huber_c = huber_c

    def bind(self, module: Any) -> None:
        super().bind(module)
        self.target_net = copy.deepcopy(module.net).requires_grad_(False)

    def consistency_function(self, net: nn.Module, x_t: Tensor, timesteps: Tensor, conditioning: Conditioning) -> Tensor:
        """f(x_t, t) = c_skip(t) x_t + c_out(t) x0(x_t, t)."""
        x0, _ = split_prediction(net(x_t, timesteps, **conditioning).float(), x_t, self.alpha_bar(timesteps), self.prediction_type)
        c_skip, c_out = consistency_scalings(timesteps)
        return _expand(c_skip, x_t) * x_t + _expand(c_out, x_t) * x0

    def forward(self, module: Any, batch: dict[str, Any], stage: str, generator: torch.Generator | None) -> Losses:
        x0 = module.clean_data(batch)  # (B, C, F, H, W) in diffusion space
        conditioning, unconditioning = self.captions_conditioning(module, batch)
        stride = self.noise_scheduler.config.num_train_timesteps // self.num_ddim_timesteps
        index = torch.randint(1, self.num_ddim_timesteps + 1, (x0.shape[0],), device=x0.device)
        timesteps = index * stride - 1  # LCM's grid: stride - 1, 2 stride - 1, ..., T - 1
        previous = timesteps - stride  # -1 below the grid: the end of sampling
        x_t = self.noised(x0, timesteps)
        prediction = self.consistency_function(module.net, x_t, timesteps, conditioning)
        with torch.no_grad():
            teacher_x0, teacher_eps = self.teacher_x0_eps(x_t, timesteps, conditioning, unconditioning)
            x_previous = ddim_step(teacher_x0, teacher_eps, self.alpha_bar(previous))
            target = self.consistency_target(x_previous, previous, timesteps, conditioning)
        if self.huber_c is None:
            loss = F.mse_loss(prediction, target)
        else:
            loss = (((prediction - target) ** 2).flatten(1).mean(1) + self.huber_c**2).sqrt().mean() - self.huber_c
        return {"loss": loss}, x0.shape[0]

    def consistency_target(self, x_previous: Tensor, previous: Tensor, timesteps: Tensor, conditioning: Conditioning) -> Tensor:
        """The EMA target's consistency function one teacher step down, at `previous`."""
        return self.consistency_function(self.target_net, x_previous, previous.clamp(min=0), conditioning)

    def on_train_batch_end(self, module: Any) -> None:
        with torch.no_grad():
            for target, student in zip(self.target_net.parameters(), module.net.parameters()):
                target.lerp_(student, 1 - self.target_ema)


class PhasedConsistencyDistillationLoss(ConsistencyDistillationLoss):
    """Phased consistency distillation: `phases` deterministic sampling steps on the edges of
    `ddim_trailing`'s `phases`-step grid (T - 1, ..., T / phases - 1, then the clean end).

    The consistency function of phase (e, e + T / phases] is one DDIM step of the network's
    (x0, eps) from `x_t` to the phase's lower edge `e`, so it tends to the identity as t nears
    `e`, the boundary condition LCM needs c_skip / c_out for; a teacher step that lands on the
    edge is its own target. Sample with `sampler=ddim_trailing steps=phases guidance=1`.

    Args:
        phases: sampling steps the student is trained for; must divide the solver grid.
        **consistency: `ConsistencyDistillationLoss` arguments.
    """

    def __init__(self, phases: int = 4, **consistency: Any) -> None:
        super().__init__(**consistency)
        self.phases = phases

    def bind(self, module: Any) -> None:
        super().bind(module)
        phases = self.phases
        num_train_timesteps = self.noise_scheduler.config.num_train_timesteps
        if num_train_timesteps % phases or self.num_ddim_timesteps % phases:
            raise ValueError(
                f"PhasedConsistencyDistillation: phases={phases} must divide num_train_timesteps="
                f"{num_train_timesteps} and num_ddim_timesteps={self.num_ddim_timesteps} (phase edges on the solver grid)"
            )
        if num_train_timesteps % self.num_ddim_timesteps:
            raise ValueError(f"PhasedConsistencyDistillation: num_ddim_timesteps={self.num_ddim_timesteps} must divide {num_train_timesteps}")
        module.sample_steps = phases

    def phase_edge(self, timesteps: Tensor) -> Tensor:
        """The lower edge of each timestep's phase; -1 (the clean end) for the last phase."""
        length = self.noise_scheduler.config.num_train_timesteps // self.phases
        return timesteps // length * length - 1

    def consistency_function(self, net: nn.Module, x_t: Tensor, timesteps: Tensor, conditioning: Conditioning) -> Tensor:
        """f(x_t, t) = the DDIM step of the network's (x0, eps) from t to the phase edge below t."""
        x0, eps = split_prediction(net(x_t, timesteps, **conditioning).float(), x_t, self.alpha_bar(timesteps), self.prediction_type)
        return ddim_step(x0, eps, self.alpha_bar(self.phase_edge(timesteps)))

    def consistency_target(self, x_previous: Tensor, previous: Tensor, timesteps: Tensor, conditioning: Conditioning) -> Tensor:
        """One teacher step that lands on the phase edge is the target itself; otherwise the
        EMA target carries `x_previous` to the same edge."""
        on_edge = previous == self.phase_edge(timesteps)  # (B,)
        carried = self.consistency_function(self.target_net, x_previous, previous.clamp(min=0), conditioning)
        return torch.where(_expand(on_edge, x_previous).bool(), x_previous, carried)


# --- the paradigms: the diffusion module with a distillation objective -------------------------


class ProgressiveDistillation(DiffusionModule):
    """The student of `ProgressiveDistillationLoss` (its arguments, then `DiffusionModule`'s)."""

    def __init__(self, teacher_checkpoint: str | None = None, teacher_guidance: float = 5.0, teacher_steps: int = 16,
                 steps_per_round: int = 500, timestep_spacing: str = "trailing", **diffusion: Any) -> None:  # fmt: skip
        objective = ProgressiveDistillationLoss(teacher_steps, steps_per_round, timestep_spacing,
                                                teacher_checkpoint=teacher_checkpoint, teacher_guidance=teacher_guidance)  # fmt: skip
        super().__init__(objective=objective, **diffusion)


class ConsistencyDistillation(DiffusionModule):
    """The student of `ConsistencyDistillationLoss`, or of `PhasedConsistencyDistillationLoss`
    when `phases` is given (their arguments, then `DiffusionModule`'s)."""

    def __init__(self, teacher_checkpoint: str | None = None, teacher_guidance: float = 5.0, num_ddim_timesteps: int = 50,
                 target_ema: float = 0.95, huber_c: float | None = 0.001, phases: int | None = None,
                 **diffusion: Any) -> None:  # fmt: skip
        consistency = dict(num_ddim_timesteps=num_ddim_timesteps, target_ema=target_ema, huber_c=huber_c,
                           teacher_checkpoint=teacher_checkpoint, teacher_guidance=teacher_guidance)  # fmt: skip
        objective = ConsistencyDistillationLoss(**consistency) if phases is None else PhasedConsistencyDistillationLoss(phases, **consistency)
        super().__init__(objective=objective, **diffusion)


class PhasedConsistencyDistillation(ConsistencyDistillation):
    """Consistency distillation in `phases` phases (PCM)."""

    def __init__(self, phases: int = 4, **consistency: Any) -> None:
        super().__init__(phases=phases, **consistency)
