"""effvid-train: a Hydra app that trains one experiment into `runs/RUN_ID/`.

    effvid-train experiment=digits_quickstart            # new run, id printed at start
    effvid-train experiment=digits_quickstart trainer.max_steps=300 run_id=my-run
    effvid-train resume=RUN_ID                            # continue: weights, optimizer, EMA, W&B run
    effvid-train resume=RUN_ID trainer.max_steps=3000     # continue a finished run for longer
    effvid-train resume=runs/RUN_ID/checkpoints/step=000500.ckpt
    effvid-train --help                                   # config groups and options

A resumed run is composed from the run's own saved `config.yaml` (plus any overrides given),
not from today's config files, so it continues exactly the experiment that was started.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from experiments.checkpoints import check_checkpoint_fits
from experiments.run_callbacks import RunRecorder
from experiments.run_dir import (
    RunError,
    new_run_id,
    read_run_status,
    resolve_checkpoint,
    runs_root,
    update_run_status,
)

HYDRA_FLAGS = {"-h", "--help", "--hydra-help", "--info", "-i", "--cfg", "-c", "--resolve", "--shell-completion", "-sc"}


def override_values(argv: list[str]) -> dict[str, str]:
    return dict(a.split("=", 1) for a in argv if "=" in a and not a.startswith("-"))


def prepare_argv(argv: list[str]) -> list[str]:
    """Turn `run_id=` / `resume=` into the Hydra arguments that select the run's folder."""
    if HYDRA_FLAGS.intersection(argv):
        return argv
    values = override_values(argv)
    runs_dir = runs_root(values.get("runs_dir"))
    resume = values.get("resume")
    if resume not in (None, "", "null"):
        run_dir, ckpt = resolve_checkpoint(resume, runs_dir)
        check_resumable(run_dir, values)
        rest = [a for a in argv if not a.startswith(("resume=", "run_id="))]
        return [
            "--config-dir", str(run_dir), "--config-name", "config",
            f"hydra.run.dir={run_dir}", f"run_id={run_dir.name}", f"resume='{ckpt}'", *rest,
        ]  # fmt: skip
    run_id = values.get("run_id") or new_run_id()
    if (runs_dir / run_id / "config.yaml").exists():
        requeued = os.environ.get("SLURM_RESTART_COUNT", "0") not in ("", "0")
        if requeued and (ckpt := newest_checkpoint(runs_dir / run_id)) is not None:
            # A requeued SLURM job re-runs its original command: continue the run instead.
            return prepare_argv([*(a for a in argv if not a.startswith("run_id=")), f"resume={ckpt}"])
        raise RunError(f"run {run_id!r} already exists in {runs_dir}/; continue it with resume={run_id}")
    return [a for a in argv if not a.startswith("run_id=")] + [f"run_id={run_id}"]


def newest_checkpoint(run_dir: Path) -> Path | None:
    """The latest of last.ckpt and Lightning's SLURM pre-emption checkpoints (hpc_ckpt_N)."""
    candidates = [*run_dir.glob("hpc_ckpt_*.ckpt"), *run_dir.glob("checkpoints/last.ckpt")]
    return max(candidates, key=lambda p: p.stat().st_mtime) if candidates else None


def check_resumable(run_dir: Path, overrides: dict[str, str]) -> None:
    """A finished run only resumes when asked to train further, never as a silent restart."""
    status = read_run_status(run_dir)
    if status.get("status") != "completed":
        return
    saved_max = OmegaConf.load(run_dir / "config.yaml").trainer.get("max_steps", -1)
    max_steps = int(overrides.get("trainer.max_steps", saved_max))
    step = int(status.get("global_step", 0))
    if 0 <= max_steps <= step:
        raise RunError(
            f"run {run_dir.name!r} already completed at step {step} (trainer.max_steps={max_steps}); "
            f"to train further: effvid-train resume={run_dir.name} trainer.max_steps={step * 2}"
        )


def build_model(cfg: DictConfig) -> Any:
    """The LightningModule of a config, initialised as a run with its seed would be: over the
    `pretrained=` bundle, or over the network `model=` builds (`lit_models.bundle.build_module`)."""
    from lit_models.bundle import build_module

    return build_module(cfg)


def build(cfg: DictConfig, run_dir: Path) -> tuple[Any, Any, Any]:
    """Instantiate datamodule, LightningModule and Trainer from the composed config."""
    import lightning as L
    from lightning.pytorch.callbacks import LearningRateMonitor

    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    model = build_model(cfg)
    if cfg.get("compile") and getattr(model, "net", None) is not None:
        model.net.compile()  # in place: parameter names (and checkpoints) stay the same
    logger = instantiate(cfg.logger) if cfg.get("logger") else False
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    if not logger:  # Lightning refuses a LearningRateMonitor without a logger; nothing to log to
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    callbacks.append(
        RunRecorder(run_dir, cfg.run_id, OmegaConf.to_container(cfg), cfg.get("experiment_name"))
    )
    trainer = instantiate(cfg.trainer, logger=logger, callbacks=callbacks, default_root_dir=str(run_dir))
    return datamodule, model, trainer


def run_training(cfg: DictConfig) -> dict[str, float]:
    """Train (or resume) the run described by `cfg`; returns the final logged metrics."""
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        with open_dict(cfg):  # every job of a sweep is a run of its own, one W&B group per sweep
            if cfg.get("logger") and "group" in cfg.logger:
                cfg.logger.group = f"sweep-{cfg.run_id}"
            cfg.run_id = f"{cfg.run_id}-{HydraConfig.get().job.num}"
    run_dir = Path(cfg.runs_dir) / cfg.run_id
    resuming = bool(cfg.get("resume"))
    pin_local_paths(cfg)
    try:
        datamodule, model, trainer = build(cfg, run_dir)
        datamodule.setup("fit")  # bad shard paths fail here, before the run folder is kept
        if hasattr(datamodule, "check_model"):  # encoded shards: made by this run's encoders?
            datamodule.check_model(model)
        if resuming:
            check_checkpoint_fits(cfg.resume, model)
    except (InstantiationException, FileNotFoundError, ValueError, RunError) as error:
        if not resuming:  # a run that never started leaves nothing behind
            shutil.rmtree(run_dir, ignore_errors=True)
        raise SystemExit(f"effvid-train: error: {error}") from None

    run_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, run_dir / "config.yaml")
    created = read_run_status(run_dir).get("created") or dt.datetime.now().isoformat(timespec="seconds")
    update_run_status(run_dir, run_id=cfg.run_id, experiment=cfg.get("experiment_name"), created=created)
    if trainer.logger:
        trainer.logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    print(f"effvid: run {cfg.run_id} -> {run_dir}" + (f" (resuming {cfg.resume})" if resuming else ""))

    from lightning.pytorch.utilities.exceptions import SIGTERMException

    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.resume or None)
    except SIGTERMException:  # preempted: PreemptionCheckpoint saved last.ckpt
        finish_wandb()
        print(f"effvid: run {cfg.run_id} stopped by a signal at step {trainer.global_step}; "
              f"continue with: effvid-train resume={cfg.run_id}")
        raise SystemExit(0) from None

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    update_run_status(
        run_dir, status="completed", global_step=trainer.global_step, metrics=metrics,
        finished=dt.datetime.now().isoformat(timespec="seconds"),
    )  # fmt: skip
    finish_wandb()
    print_summary(cfg.run_id, run_dir, trainer.global_step, metrics)
    return metrics


def pin_local_paths(cfg: DictConfig) -> None:
    """A `pretrained=` folder (or motion adapter) given relative to the working folder is stored
    absolute in the run's config, so resuming or sampling from elsewhere finds the same bundle."""
    with open_dict(cfg):
        for key in ("pretrained", "bundle.motion_adapter"):
            value = OmegaConf.select(cfg, key)
            if isinstance(value, str) and value and Path(value).exists() and not Path(value).is_absolute():
                OmegaConf.update(cfg, key, str(Path(value).resolve()))


def finish_wandb() -> None:
    import wandb

    if wandb.run is not None:
        wandb.finish()


def print_summary(run_id: str, run_dir: Path, step: int, metrics: dict[str, float]) -> None:
    samples = sorted((run_dir / "samples").glob("step_*/grid.png"))
    print(f"\n=== effvid run {run_id}: {step} steps ===")
    for name in sorted(metrics):
        print(f"  {name:28s} {metrics[name]:.4f}")
    print(f"  checkpoint  {run_dir / 'checkpoints' / 'last.ckpt'}")
    if samples:
        print(f"  samples     {samples[-1]}")
    print(f"  W&B (offline) {run_dir / 'wandb'}   compare: effvid-runs compare {run_id} OTHER_ID")


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def hydra_main(cfg: DictConfig) -> None:
    run_training(cfg)


def main() -> None:
    try:
        sys.argv = [sys.argv[0], *prepare_argv(sys.argv[1:])]
    except RunError as error:
        raise SystemExit(f"effvid-train: error: {error}") from None
    hydra_main()


if __name__ == "__main__":
    main()
