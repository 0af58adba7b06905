"""Step distillation: the progressive target is two teacher DDIM steps, the consistency
function is the identity at t = 0, and both paradigms train from a teacher checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, LCMScheduler
from hydra.utils import instantiate

from lit_models.samplers import make_sampler
from lit_models.distillation import ConsistencyDistillation, PhasedConsistencyDistillation, ProgressiveDistillation, consistency_scalings
from tests.test_diffusion import tiny_model


def tiny_student(data_root: Path, tmp_path: Path, paradigm: str, teacher_checkpoint: Path | None = None):
    teacher = [] if teacher_checkpoint is None else [f"paradigm.teacher_checkpoint={teacher_checkpoint}"]
    return tiny_model(data_root, tmp_path, f"paradigm={paradigm}", *teacher)


@pytest.fixture(scope="module")
def teacher_checkpoint(digits_data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 'trained' teacher: the tiny text-to-video model with perturbed weights, saved like a run."""
    tmp = tmp_path_factory.mktemp("teacher")
    model, _ = tiny_model(digits_data_root, tmp)
    with torch.no_grad():
        for p in model.net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = tmp / "last.ckpt"
    torch.save({"state_dict": model.state_dict()}, path)
    return path


@pytest.mark.parametrize("start", [999, 249])  # the first and the last student step of 4
@torch.no_grad()
def test_progressive_target_is_two_teacher_ddim_steps(digits_data_root: Path, tmp_path: Path, teacher_checkpoint: Path, start: int) -> None:
    student, _ = tiny_student(digits_data_root, tmp_path, "progressive_distillation", teacher_checkpoint)
    assert isinstance(student, ProgressiveDistillation) and student.objective.student_steps == 4
    teacher_state = torch.load(teacher_checkpoint, weights_only=True)["state_dict"]
    assert torch.equal(student.objective.teacher.conv_out.weight, teacher_state["net.conv_out.weight"])
    prompts = ["a handwritten 5 moving up", "a handwritten 0 moving left"]
    cond, uncond = student.encode_captions(prompts), student.encode_captions([""] * 2)
    x_t = torch.randn(2, 1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.full((2,), start)

    target = student.objective.student_target(x_t, t, cond, uncond)

    # Independently, with diffusers: one 4-step DDIM step on the target vs two 8-step teacher
    # steps; the `ddim_trailing` sampler, which the students sample with.
    def ddim(steps: int) -> DDIMScheduler:
        scheduler = make_sampler("ddim_trailing", student.noise_scheduler)
        scheduler.set_timesteps(steps)
        return scheduler

    def teacher(x: torch.Tensor, step: int) -> torch.Tensor:
        both = {k: torch.cat([uncond[k], cond[k]]) for k in cond}
        out_uncond, out_cond = student.objective.teacher(torch.cat([x, x]), torch.full((4,), step), **both).chunk(2)
        return out_uncond + student.objective.teacher_guidance * (out_cond - out_uncond)

    one_student_step = ddim(4).step(target, start, x_t).prev_sample
    teacher_ddim = ddim(8)
    middle = start - 125
    x_mid = teacher_ddim.step(teacher(x_t, start), start, x_t).prev_sample
    two_teacher_steps = teacher_ddim.step(teacher(x_mid, middle), middle, x_mid).prev_sample
    assert torch.allclose(one_student_step, two_teacher_steps, atol=1e-4), (one_student_step - two_teacher_steps).abs().max()


def test_consistency_function_is_the_identity_at_the_smallest_t(digits_data_root: Path, tmp_path: Path) -> None:
    student, _ = tiny_student(digits_data_root, tmp_path, "consistency_distillation")
    assert isinstance(student, ConsistencyDistillation)
    with torch.no_grad():
        for p in student.net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = torch.randn(2, 1, 4, 16, 16)
    cond = student.encode_captions(["a handwritten 1 moving down"] * 2)
    at_zero = student.objective.consistency_function(student.net, x, torch.zeros(2, dtype=torch.long), cond)
    assert torch.allclose(at_zero, x, atol=1e-6)
    assert not torch.allclose(student.objective.consistency_function(student.net, x, torch.full((2,), 499), cond), x, atol=1e-2)
    # The scalings are the ones diffusers' LCMScheduler samples with.
    lcm = LCMScheduler.from_config(student.noise_scheduler.config)
    for t in (0, 19, 499, 999):
        c_skip, c_out = consistency_scalings(torch.tensor([t]))
        assert torch.allclose(torch.stack([c_skip[0], c_out[0]]), torch.tensor(lcm.get_scalings_for_boundary_condition_discrete(t)).float())


@torch.no_grad()
def test_phased_consistency_function_nears_the_identity_at_phase_edges_and_samples_with_ddim(digits_data_root: Path, tmp_path: Path, teacher_checkpoint: Path) -> None:
    student, _ = tiny_student(digits_data_root, tmp_path, "phased_consistency_distillation", teacher_checkpoint)
    assert isinstance(student, PhasedConsistencyDistillation) and student.sample_steps == 4
    assert student.objective.phase_edge(torch.tensor([999, 750, 749, 500, 274, 249, 24])).tolist() == [749, 749, 499, 499, 249, -1, -1]
    x = torch.randn(2, 1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    cond = student.encode_captions(["a handwritten 1 moving down"] * 2)
    for edge in (-1, 249, 499, 749):  # just above an edge the map moves x a step's worth, at the top a phase's
        near = (student.objective.consistency_function(student.net, x, torch.full((2,), edge + 1), cond) - x).abs().mean()
        far = (student.objective.consistency_function(student.net, x, torch.full((2,), edge + 250), cond) - x).abs().mean()
        assert near < 0.05 * far, (edge, near, far)

    # A teacher step landing on the phase edge is the target itself, else the EMA target's map.
    x_previous = torch.randn_like(x)
    target = student.objective.consistency_target(x_previous, torch.tensor([499, 474]), torch.tensor([524, 499]), cond)
    assert torch.equal(target[0], x_previous[0])
    assert torch.allclose(target[1], student.objective.consistency_function(student.objective.target_net, x_previous, torch.tensor([474, 474]), cond)[1])

    # Sampling with diffusers' `ddim_trailing` in 4 steps chains the consistency function edge to edge.
    scheduler = make_sampler("ddim_trailing", student.noise_scheduler)
    scheduler.set_timesteps(4)
    sampled = chained = x
    for t in scheduler.timesteps:
        t_batch = torch.full((2,), int(t))
        sampled = scheduler.step(student.net(sampled, t_batch, **cond), t, sampled).prev_sample
        chained = student.objective.consistency_function(student.net, chained, t_batch, cond)
    assert torch.allclose(sampled, chained, atol=1e-5), (sampled - chained).abs().max()


@pytest.mark.parametrize("paradigm", ["progressive_distillation", "consistency_distillation", "phased_consistency_distillation"])
def test_distillation_trains_only_the_student(digits_data_root: Path, tmp_path: Path, teacher_checkpoint: Path, paradigm: str) -> None:
    student, cfg = tiny_student(digits_data_root, tmp_path, paradigm, teacher_checkpoint)
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    batch = datamodule.on_after_batch_transfer(next(iter(datamodule.val_dataloader())), 0)
    teacher_before = [p.clone() for p in student.objective.teacher.parameters()]
    optimizer = student.configure_optimizers()
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    trained = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert trained == {id(p) for p in student.net.parameters()}
    student.log = lambda *args, **kwargs: None  # no trainer attached
    loss = student.training_step(batch, 0)
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in student.net.parameters() if p.requires_grad)
    with torch.no_grad():  # stands in for an optimizer step (the warm-up LR is 0 at step 0)
        for p in student.net.parameters():
            p.add_(p.grad.sign() * 1e-3 if p.grad is not None else 0)
    assert all(torch.equal(a, b) for a, b in zip(teacher_before, student.objective.teacher.parameters()))
    if isinstance(student, ConsistencyDistillation):  # the EMA target moves towards the student
        before = [p.clone() for p in student.objective.target_net.parameters()]
        student.on_train_batch_end(None, batch, 0)
        assert any(not torch.equal(a, b) for a, b in zip(before, student.objective.target_net.parameters()))


def test_a_wrong_teacher_checkpoint_names_the_problem(digits_data_root: Path, tmp_path: Path) -> None:
    with pytest.raises(Exception, match="teacher_checkpoint"):
        tiny_student(digits_data_root, tmp_path, "progressive_distillation", tmp_path / "missing.ckpt")


def test_a_student_checkpoint_from_before_objectives_loads(digits_data_root: Path, tmp_path: Path) -> None:
    # The teacher and the EMA target moved into the objective (`objective.teacher.*`); a checkpoint
    # written when they were the module's own (`teacher.*`, `target_net.*`) still loads whole.
    student, _ = tiny_student(digits_data_root, tmp_path, "consistency_distillation")
    with torch.no_grad():
        for p in student.objective.parameters():
            p.add_(1.0)
    old = {k.removeprefix("objective."): v.clone() for k, v in student.state_dict().items()}
    assert any(k.startswith("teacher.") for k in old) and any(k.startswith("target_net.") for k in old)
    fresh, _ = tiny_student(digits_data_root, tmp_path, "consistency_distillation")
    fresh.load_state_dict(old)  # strict
    assert all(torch.equal(a, b) for a, b in zip(fresh.objective.parameters(), student.objective.parameters()))
