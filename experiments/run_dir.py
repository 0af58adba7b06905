"""A run's identity and folder: one id ties the Hydra output, checkpoints, samples and W&B run.

Layout of `RUNS_DIR/RUN_ID/`:
    config.yaml      the composed config (unresolved, so env defaults stay portable)
    run.json         status (running / completed / failed), global step, experiment
    checkpoints/     last.ckpt and periodic step=NNNNNN.ckpt
    samples/         mp4s and grid.png per validation or effvid-sample call
    wandb/           the W&B run (offline by default), id = RUN_ID
"""

from __future__ import annotations

import datetime as dt
import json
import os
import secrets
from pathlib import Path
from typing import Any

from data_tools.atomic_files import write_atomic

RUNS_ENV = "EFFVID_RUNS"


class RunError(Exception):
    """A user-facing problem with a run id, folder or checkpoint."""


def runs_root(runs_dir: str | Path | None = None) -> Path:
    return Path(runs_dir or os.environ.get(RUNS_ENV) or "runs")


def new_run_id() -> str:
    # Time first so ids sort by creation; the random tail keeps parallel launches apart.
    return dt.datetime.now().strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(2)


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    write_atomic(path, json.dumps(data, indent=2, default=str) + "\n")


def read_run_status(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "run.json"
    return json.loads(path.read_text()) if path.exists() else {}


def update_run_status(run_dir: Path, **fields: Any) -> dict[str, Any]:
    status = read_run_status(run_dir) | fields
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run_dir / "run.json", status)
    return status


def known_run_ids(runs_dir: Path) -> list[str]:
    if not runs_dir.is_dir():
        return []
    return sorted(p.name for p in runs_dir.iterdir() if (p / "run.json").exists())


def latest_run_id(runs_dir: Path) -> str:
    ids = known_run_ids(runs_dir)
    if not ids:
        raise RunError(f"no runs in {runs_dir}/ (start one with effvid-train)")
    return max(ids, key=lambda i: read_run_status(runs_dir / i).get("created", ""))


def find_run_dir(run: str, runs_dir: Path) -> Path:
    """The folder of run id `run` (or `latest`) under `runs_dir`, with a clear error if absent."""
    if run == "latest":
        run = latest_run_id(runs_dir)
    run_dir = runs_dir / run
    if not (run_dir / "config.yaml").exists():
        ids = known_run_ids(runs_dir)
        hint = f"known runs: {', '.join(ids[-8:])}" if ids else "there are no runs there yet"
        raise RunError(f"no run with id {run!r} in {runs_dir}/ ({hint})")
    return run_dir


def resolve_checkpoint(ref: str, runs_dir: Path) -> tuple[Path, Path]:
    """`ref` is a run id, `latest`, or a checkpoint path -> (run folder, checkpoint path)."""
    path = Path(ref)
    if path.suffix == ".ckpt":
        if not path.is_file():
            raise RunError(f"checkpoint {path} does not exist")
        # checkpoints/NAME.ckpt, or a SLURM pre-emption hpc_ckpt_N.ckpt in the run folder itself
        parent = path.resolve().parent
        return (parent.parent if parent.name == "checkpoints" else parent), path
    run_dir = find_run_dir(ref, runs_dir)
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    if not ckpt.is_file():
        raise RunError(f"run {run_dir.name!r} has no checkpoint yet ({ckpt} is missing)")
    return run_dir, ckpt
