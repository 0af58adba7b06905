"""effvid-train: a Hydra app that trains one experiment into `runs/RUN_ID/`.

    effvid-train experiment=digits_quickstart            # new run, id printed at start
    effvid-train experiment=digits_quickstart trainer.max_steps=300 run_id=my-run
    effvid-train resume=RUN_ID                            # continue: weights, optimizer, EMA, W&B run
    effvid-train resume=RUN_ID trainer.max_steps=3000     # continue a finished run for longer
    effvid-train resume=runs/RUN_ID/checkpoints/step=000500.ckpt
    effvid-train --help                                   # config groups and options

A resumed run is composed from the run's own saved `config.yaml` (plus any overrides given),
not from today's config files, so it continues exactly the experiment that was started. That
file is data from a run folder: before Hydra sees it, it is checked like a checkpoint's config
(`lit_models/trusted_config.py`) and copied alone into a private folder.

One run id, one process: the run's `.lock` is taken before anything is written, and a second
start of the same id fails at once. The other ranks of a distributed run (Lightning's launcher,
torchrun, srun) join the run rank 0 owns and write nothing of their own.

Exit codes: 0 done (or stopped by SIGUSR1, SLURM's requeue signal), 1 error, 3 diverged,
130 / 143 stopped by SIGINT / SIGTERM (a checkpoint of the last finished step is saved).
"""

from __future__ import annotations

import atexit
import datetime as dt
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from data_tools.atomic_files import STORAGE_ERRNOS, WriteError, write_atomic
from experiments.run_dir import (
    LOCK_NAME,
    RunError,
    acquire_run_lock,
    check_run_id,
    checkpoint_step,
    joins_a_run,
    launcher_run_id,
    new_run_id,
    newest_checkpoint,
    read_run_status,
    release_run_lock,
    resolve_checkpoint,
    runs_root,
    update_run_status,
)
from lit_models.trusted_config import UntrustedConfigError, check_trusted, parse_target_names, trust_command_line_targets

HYDRA_FLAGS = {"-h", "--help", "--hydra-help", "--info", "-i", "--cfg", "-c", "--resolve", "--shell-completion", "-sc"}
DIVERGED_EXIT = 3


def override_values(argv: list[str]) -> dict[str, str]:
    return {k.lstrip("+~"): v for k, v in (a.split("=", 1) for a in argv if "=" in a and not a.startswith("-"))}


def _unquote(value: str) -> str:
    return value[1:-1] if len(value) > 1 and value[0] == value[-1] and value[0] in "'\"" else value


def command_line_trust(values: dict[str, str]) -> list[str]:
    """The `trust_targets=[a.B,c.D]` of this command line (never a config file's value)."""
    text = _unquote(values.get("trust_targets", "")).strip().strip("[]")
    return sorted(parse_target_names(_unquote(item.strip()) for item in text.split(",")))


def prepare_argv(argv: list[str], joining: bool = False) -> list[str]:
    """Turn `run_id=` / `resume=` into the Hydra arguments that select the run's folder, and
    take the run's lock (not when `joining`: a rank other than the first joins rank 0's run)."""
    if HYDRA_FLAGS.intersection(argv) or (joining and "--config-dir" in argv):
        return argv  # --help and friends; or Lightning's launcher re-running rank 0's prepared command
    values = override_values(argv)
    runs_dir = runs_root(values.get("runs_dir"))
    trust = command_line_trust(values)
    resume = _unquote(values.get("resume", ""))
    if resume not in ("", "null"):
        run_dir, ckpt = resolve_checkpoint(resume, runs_dir)
        check_run_id(run_dir.name)
        if not joining:
            acquire_run_lock(run_dir)
            check_resumable(run_dir, values)
        config_dir = checked_config_copy(run_dir, trust)
        rest = [a for a in argv if not a.lstrip("+").startswith(("resume=", "run_id=", "trust_targets="))]
        return [
            "--config-dir", str(config_dir), "--config-name", "config", f"hydra.run.dir={run_dir}",
            f"run_id='{run_dir.name}'", f"resume='{ckpt}'", f"++trust_targets=[{','.join(trust)}]", *rest,
            *(joining_overrides(argv) if joining else []),
        ]  # fmt: skip
    multirun = "-m" in argv or "--multirun" in argv
    given = _unquote(values["run_id"]) if values.get("run_id") not in (None, "", "null") else None
    run_id = check_run_id(given or launcher_run_id() or _fresh_id(joining))
    run_dir = runs_dir / run_id
    if not joining and not multirun:  # each job of a sweep takes its own run's lock
        acquire_run_lock(run_dir)  # creates the folder: nothing else is written there before this
        if (run_dir / "config.yaml").exists():
            if requeued_slurm_job() and (ckpt := newest_checkpoint(run_dir)) is not None:
                # A requeued SLURM job re-runs its original command: continue the run instead.
                return prepare_argv([*(a for a in argv if not a.startswith("run_id=")), f"resume={ckpt}"])
            raise RunError(f"run {run_id!r} already exists in {runs_dir}/; continue it with resume={run_id}")
    rest = [a for a in argv if not a.startswith("run_id=")]
    return [*rest, f"run_id='{run_id}'", *(joining_overrides(argv) if joining else [])]


def _fresh_id(joining: bool) -> str:
    if joining:
        raise RunError("this rank cannot know the run id rank 0 chose: pass run_id=NAME to every rank")
    return new_run_id()


def requeued_slurm_job() -> bool:
    return os.environ.get("SLURM_RESTART_COUNT", "0") not in ("", "0")


def joining_overrides(argv: list[str]) -> list[str]:
    """A joining rank writes no `.hydra/` copy and logs to a file of its own."""
    extra = [] if any(a.startswith("hydra.output_subdir=") for a in argv) else ["hydra.output_subdir=null"]
    if not any(a.startswith("hydra.job.name=") for a in argv):
        rank = os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or os.environ.get("LOCAL_RANK", "x")
        extra.append(f"hydra.job.name=train_rank_{rank}")
    return extra


def checked_config_copy(run_dir: Path, trust: list[str]) -> Path:
    """The run's config.yaml, checked as an artifact's config and copied alone into a private
    temporary folder (deleted at exit) for Hydra to compose: Hydra puts `--config-dir` first on
    its search path, so files planted in a run folder (e.g. `hydra/job_logging/*.yaml`) would
    replace its own configs."""
    path = run_dir / "config.yaml"
    try:
        cfg = OmegaConf.load(path)
    except Exception as error:  # noqa: BLE001 - a damaged file, by name
        raise RunError(f"{path} cannot be read as a config: {error}") from None
    if not isinstance(cfg, DictConfig):
        raise RunError(f"{path} is not a config mapping")
    for key in ("hydra", "defaults"):
        if key in cfg:
            raise UntrustedConfigError(f"{path}: holds a '{key}' section, which effvid-train never writes; refusing it")
    check_trusted(cfg, str(path), extra=trust)
    folder = Path(tempfile.mkdtemp(prefix="effvid-resume-"))
    atexit.register(shutil.rmtree, folder, True)
    shutil.copyfile(path, folder / "config.yaml")
    return folder


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

    from experiments.metrics_log import MetricsFileLogger
    from experiments.run_callbacks import RunRecorder

    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    model = build_model(cfg)
    if cfg.get("compile") and getattr(model, "net", None) is not None:
        model.net.compile()  # in place: parameter names (and checkpoints) stay the same
    # W&B (when configured) first: Lightning's `trainer.logger` is the first one. metrics.jsonl
    # beside it is the run's own record, what effvid-runs reads.
    loggers = [instantiate(cfg.logger)] if cfg.get("logger") else []
    loggers.append(MetricsFileLogger(run_dir, resume_step=resume_step(cfg)))
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    callbacks.append(
        RunRecorder(run_dir, cfg.run_id, OmegaConf.to_container(cfg), cfg.get("experiment_name"))
    )
    trainer = instantiate(cfg.trainer, logger=loggers, callbacks=callbacks, default_root_dir=str(run_dir))
    return datamodule, model, trainer


def resume_step(cfg: DictConfig) -> int | None:
    """The global step of the checkpoint `cfg.resume` names; None for a new run. A checkpoint
    that does not say is refused by name later (`check_checkpoint_fits`, Lightning); until then
    metrics.jsonl is cut only where the resumed process starts logging."""
    if not cfg.get("resume"):
        return None
    step = checkpoint_step(Path(cfg.resume))
    return sys.maxsize if step is None else step


def run_training(cfg: DictConfig) -> dict[str, float]:
    """Train (or resume) the run described by `cfg`; returns the final logged metrics."""
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        with open_dict(cfg):  # every job of a sweep is a run of its own, one W&B group per sweep
            if cfg.get("logger") and "group" in cfg.logger:
                cfg.logger.group = f"sweep-{cfg.run_id}"
            cfg.run_id = f"{cfg.run_id}-{HydraConfig.get().job.num}"
    trust_command_line_targets(cfg.get("trust_targets"))
    owner = not joins_a_run()  # rank 0 owns the run folder; other ranks write nothing of their own
    try:
        run_dir = Path(cfg.runs_dir) / check_run_id(cfg.run_id)
        locked = acquire_run_lock(run_dir) if owner else False
    except RunError as error:
        raise SystemExit(f"effvid-train: error: {error}") from None
    try:
        return _train(cfg, run_dir, owner)
    finally:
        if locked:
            release_run_lock(run_dir)


def _train(cfg: DictConfig, run_dir: Path, owner: bool) -> dict[str, float]:
    # Torch and Lightning load here, not at import: a refused start (a busy run id, an untrusted
    # config) fails in a second.
    from experiments.checkpoints import check_checkpoint_fits
    from experiments.run_callbacks import DivergedError

    resuming = bool(cfg.get("resume"))
    pin_local_paths(cfg)
    try:
        datamodule, model, trainer = build(cfg, run_dir)
        datamodule.setup("fit")  # bad shard paths fail here, before the run folder is kept
        if hasattr(datamodule, "check_model"):  # encoded shards' encoders, bucket shapes the VAE takes
            datamodule.check_model(model)
        if resuming:
            check_checkpoint_fits(cfg.resume, model)
    except (InstantiationException, FileNotFoundError, ValueError, RunError) as error:
        if not resuming and owner:  # a run that never started leaves nothing behind
            shutil.rmtree(run_dir, ignore_errors=True)
        raise SystemExit(f"effvid-train: error: {error}") from None

    if owner:
        try:
            write_atomic(run_dir / "config.yaml", OmegaConf.to_yaml(cfg))
            created = read_run_status(run_dir).get("created") or dt.datetime.now().isoformat(timespec="seconds")
            update_run_status(run_dir, run_id=cfg.run_id, experiment=cfg.get("experiment_name"), created=created)
        except (OSError, RunError) as error:
            raise SystemExit(f"effvid-train: error: {error}") from None
        print(f"effvid: run {cfg.run_id} -> {run_dir}" + (f" (resuming {cfg.resume})" if resuming else ""))
    if trainer.logger:
        trainer.logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from datamodules.loaders import EmptyEpochError

    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.resume or None)
    except SIGTERMException:  # stopped by a signal: PreemptionCheckpoint saved last.ckpt
        finish_wandb()
        raise SystemExit(stopped_by_signal(trainer, cfg.run_id, owner)) from None
    except DivergedError as error:
        finish_wandb()
        last = run_dir / "checkpoints" / "last.ckpt"
        kept = f"{last} (the last finite checkpoint)" if last.is_file() else "none (no finite checkpoint was written)"
        if owner:
            print(f"effvid-train: run {cfg.run_id} diverged: {error}; checkpoint kept: {kept}", file=sys.stderr)
        raise SystemExit(DIVERGED_EXIT if owner else 0) from None
    except EmptyEpochError as error:
        finish_wandb()
        raise SystemExit(f"effvid-train: error: {error}") from None
    except OSError as error:
        if not isinstance(error, WriteError) and error.errno not in STORAGE_ERRNOS:
            raise
        finish_wandb()
        raise SystemExit(
            f"effvid-train: error: {error.strerror if error.filename else error} (run {cfg.run_id}, step "
            f"{trainer.global_step}); the previous checkpoints are intact: free space, then effvid-train "
            f"resume={cfg.run_id}"
        ) from None

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    if owner:
        update_run_status(
            run_dir, status="completed", global_step=trainer.global_step, metrics=metrics,
            finished=dt.datetime.now().isoformat(timespec="seconds"),
        )  # fmt: skip
    finish_wandb()
    if owner:
        print_summary(cfg.run_id, run_dir, trainer.global_step, metrics)
    return metrics


def stopped_by_signal(trainer: Any, run_id: str, owner: bool) -> int:
    """The exit code after a stop signal (0 for SIGUSR1, 128 + the number otherwise; 0 on the
    other ranks, whose exit Lightning's launcher would take for a crash), with a message."""
    from experiments.run_callbacks import PreemptionCheckpoint

    signum = next((c.signal_received for c in trainer.callbacks if isinstance(c, PreemptionCheckpoint)), None)
    signum = signum or signal.SIGTERM
    if owner:
        print(f"effvid: run {run_id} stopped by {signal.Signals(signum).name} at step {trainer.global_step}; "
              f"continue with: effvid-train resume={run_id}", flush=True)
    return 0 if signum == signal.SIGUSR1 or not owner else 128 + int(signum)


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
    if (run_dir / "wandb").is_dir():
        print(f"  W&B (offline) {run_dir / 'wandb'}")
    print(f"  metrics     {run_dir / 'metrics.jsonl'}   compare: effvid-runs compare {run_id} OTHER_ID")


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def hydra_main(cfg: DictConfig) -> None:
    run_training(cfg)


def main() -> None:
    argv = sys.argv[1:]
    joining = joins_a_run()
    try:
        prepared = prepare_argv(argv, joining=joining)
    except (RunError, UntrustedConfigError) as error:
        raise SystemExit(f"effvid-train: error: {error}") from None
    sys.argv = [sys.argv[0], *prepared]
    try:
        hydra_main()
    finally:
        _remove_unstarted_run(prepared)


def _remove_unstarted_run(prepared: list[str]) -> None:
    """A new run whose config did not compose leaves no folder behind (only its lock was there)."""
    values = override_values(prepared)
    if "resume" in values or "run_id" not in values or joins_a_run():
        return
    run_dir = runs_root(values.get("runs_dir")) / _unquote(values["run_id"])
    if run_dir.is_dir() and {p.name for p in run_dir.iterdir()} <= {LOCK_NAME}:
        shutil.rmtree(run_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
