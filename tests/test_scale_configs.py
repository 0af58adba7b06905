"""Scale-out switches compose and build: trainer strategies, precision, SLURM launcher,
requeue, torch.compile and gradient checkpointing. (The README's sweep runs through
submitit's local executor, the SLURM launcher's code path without a cluster, in
test_readme_commands.py.)"""

from __future__ import annotations


import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.utils import instantiate

from experiments.train import build, prepare_argv
from lit_models.nets import FactorizedUNet, TemporalConv
from tests.conftest import tiny_overrides



def composed(*overrides: str, hydra: bool = False):
    with initialize_config_module(version_base="1.3", config_module="experiments.conf"):
        return compose("train", overrides=["experiment=digits_quickstart", "run_id=x", *overrides],
                       return_hydra_config=hydra)


@pytest.mark.parametrize("trainer,strategy", [
    ("ddp", "lightning.pytorch.strategies.DDPStrategy"),
    ("fsdp", "lightning.pytorch.strategies.FSDPStrategy"),
    ("deepspeed", "deepspeed_stage_2"),
    ("slurm", "lightning.pytorch.strategies.DDPStrategy"),
])
def test_cluster_trainer_configs_compose(trainer, strategy):
    cfg = composed(f"trainer={trainer}")
    chosen = cfg.trainer.strategy
    assert (chosen if isinstance(chosen, str) else chosen._target_) == strategy
    assert cfg.trainer.accelerator == "gpu" and cfg.trainer.max_steps == 867  # experiment still applies


def test_slurm_trainer_requeues_and_reads_the_node_count(monkeypatch):
    monkeypatch.setenv("SLURM_NNODES", "4")
    cfg = composed("trainer=slurm")
    assert cfg.trainer.num_nodes == 4
    plugins = {p._target_.rsplit(".", 1)[-1]: p for p in cfg.trainer.plugins}
    assert plugins["SLURMEnvironment"].auto_requeue and "AtomicCheckpointIO" in plugins


def test_ddp_cpu_trainer_and_precision_configs_instantiate():
    cfg = composed("trainer=ddp_cpu", "+trainer/precision=bf16")
    trainer = instantiate(cfg.trainer, logger=False, enable_progress_bar=False)
    assert trainer.num_devices == 2 and type(trainer.strategy).__name__ == "DDPStrategy"
    assert trainer.precision == "bf16-mixed"
    assert composed("+trainer/precision=fp16").trainer.precision == "16-mixed"


def test_submitit_slurm_launcher_config_composes():
    cfg = composed("hydra/launcher=slurm", "hydra.launcher.nodes=2", hydra=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert launcher.nodes == 2 and launcher.tasks_per_node == launcher.gpus_per_node == 8
    assert launcher.additional_parameters.signal == "SIGUSR1@90" and launcher.max_num_timeout > 0
    local = composed("hydra/launcher=local", hydra=True).hydra.launcher
    assert local._target_.endswith("LocalLauncher")


def test_requeued_slurm_job_resumes_its_run_instead_of_refusing(tmp_path, monkeypatch):
    run = tmp_path / "r1"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("trainer: {max_steps: 10}\n")
    torch.save({"global_step": 5}, run / "checkpoints" / "last.ckpt")
    argv = ["experiment=digits_quickstart", f"runs_dir={tmp_path}", "run_id=r1"]
    with pytest.raises(Exception, match="already exists"):
        prepare_argv(argv)
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    torch.save({"global_step": 6}, run / "hpc_ckpt_1.ckpt")  # Lightning's pre-emption checkpoint, newer
    resumed = prepare_argv(argv)
    assert f"resume='{run / 'hpc_ckpt_1.ckpt'}'" in resumed and "run_id='r1'" in resumed


def test_compile_switch_compiles_the_denoiser_in_place(digits_data_root, tmp_path, monkeypatch):
    compiled = []
    # nn.Module.compile (in place, state_dict names unchanged), recorded rather than run:
    # importing the compiler stack alone takes longer than this test may.
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: compiled.append(type(self).__name__))
    cfg = composed(*tiny_overrides(digits_data_root, tmp_path)[1:], "compile=true", "~logger")
    build(cfg, tmp_path / "x")
    assert compiled == ["FactorizedUNet"]


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    net = FactorizedUNet(in_channels=1, channels=[8, 16], attention_levels=[False, True], temporal_levels=[True, True],
                         context_dim=16, pooled_dim=16, heads=2, temporal=TemporalConv)
    x, t = torch.randn(2, 1, 4, 8, 8), torch.tensor([10, 500])
    context, pooled = torch.randn(2, 3, 16), torch.randn(2, 16)
    grads = []
    for flag in (False, True):
        net.gradient_checkpointing = flag
        net.zero_grad()
        net(x, t, context, pooled).square().mean().backward()
        grads.append([p.grad.clone() for p in net.parameters()])
    for plain, recomputed in zip(*grads):
        assert torch.allclose(plain, recomputed, atol=1e-6)
