"""A run's identity and folder: one id ties the Hydra output, checkpoints, samples and W&B run.

Layout of `RUNS_DIR/RUN_ID/`:
    .lock            held (flock) by the effvid-train process that owns the run
    config.yaml      the composed config (unresolved, so env defaults stay portable)
    run.json         status (running / completed / interrupted / diverged / failed), step, experiment
    checkpoints/     last.ckpt and periodic step=NNNNNN.ckpt
    samples/         mp4s and grid.png per validation or effvid-sample call
    wandb/           the W&B run (offline by default), id = RUN_ID
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
import re
import secrets
import warnings
from pathlib import Path
from typing import Any

from data_tools.atomic_files import write_atomic

RUNS_ENV = "EFFVID_RUNS"
LOCK_NAME = ".lock"
# A run id is one folder name: no separators, no "..", nothing Hydra would parse as a number.
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_STEP_NAME = re.compile(r"^step=(\d+)\.ckpt$")


class RunError(Exception):
    """A user-facing problem with a run id, folder or checkpoint."""


def runs_root(runs_dir: str | Path | None = None) -> Path:
    return Path(runs_dir or os.environ.get(RUNS_ENV) or "runs")


def check_run_id(run_id: Any) -> str:
    """`run_id` as a string if it is a safe folder name (letters, digits, `.`, `_`, `-`,
    starting with a letter or digit), else a RunError naming it."""
    text = str(run_id)
    if not _RUN_ID.match(text) or ".." in text:
        raise RunError(
            f"run id {text!r} is not allowed: use letters, digits, '.', '_' and '-' (up to 128, starting "
            "with a letter or digit); a run id names one folder inside the runs folder"
        )
    return text


def new_run_id() -> str:
    # Time first so ids sort by creation; the random tail keeps parallel launches apart.
    return dt.datetime.now().strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(2)


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    write_atomic(path, json.dumps(data, indent=2, default=str) + "\n")


def read_run_status(run_dir: Path) -> dict[str, Any]:
    """A run's run.json ({} when there is none); a RunError naming the file when it is corrupt."""
    path = run_dir / "run.json"
    if not path.exists():
        return {}
    try:
        status = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise RunError(f"{path} is corrupt ({error}); repair or delete it") from None
    if not isinstance(status, dict):
        raise RunError(f"{path} is corrupt (not a JSON object); repair or delete it")
    return status


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
    created = {}
    for run_id in known_run_ids(runs_dir):
        try:
            created[run_id] = str(read_run_status(runs_dir / run_id).get("created", ""))
        except RunError as error:  # one damaged run must not hide all the others
            warnings.warn(f"latest: skipping run {run_id!r}: {error}", stacklevel=2)
    if not created:
        raise RunError(f"no runs in {runs_dir}/ (start one with effvid-train)")
    return max(created, key=lambda run_id: created[run_id])


def find_run_dir(run: str, runs_dir: Path) -> Path:
    """The folder of run id `run` (or `latest`) under `runs_dir`, with a clear error if absent."""
    if run == "latest":
        run = latest_run_id(runs_dir)
    run_dir = runs_dir / check_run_id(run)
    if not (run_dir / "config.yaml").exists():
        ids = known_run_ids(runs_dir)
        hint = f"known runs: {', '.join(ids[-8:])}" if ids else "there are no runs there yet"
        raise RunError(f"no run with id {run!r} in {runs_dir}/ ({hint})")
    return run_dir


def checkpoint_step(path: Path) -> int | None:
    """The global step a checkpoint holds: from a `step=NNNNNN.ckpt` name, else read from the
    file (memory-mapped, weights only); None when it cannot be read."""
    match = _STEP_NAME.match(path.name)
    if match:
        return int(match.group(1))
    import torch

    try:
        step = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("global_step")
    except Exception as error:  # noqa: BLE001 - a damaged file is passed over, by name
        warnings.warn(f"skipping checkpoint {path}: cannot be read ({type(error).__name__})", stacklevel=2)
        return None
    return int(step) if step is not None else None


def newest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint with the highest global step among `checkpoints/*.ckpt` (last.ckpt, the
    periodic ones, a stale last-vN.ckpt of older versions) and SLURM's `hpc_ckpt_*.ckpt`;
    at equal steps the most recently written one."""
    candidates = [*run_dir.glob("checkpoints/*.ckpt"), *run_dir.glob("hpc_ckpt_*.ckpt")]
    steps = {path: checkpoint_step(path) for path in candidates}
    readable = [path for path, step in steps.items() if step is not None]
    if not readable:
        return None
    return max(readable, key=lambda path: (steps[path], path.stat().st_mtime, path.name == "last.ckpt"))


def resolve_checkpoint(ref: str, runs_dir: Path) -> tuple[Path, Path]:
    """`ref` is a run id, `latest`, or a checkpoint path -> (run folder, checkpoint path).
    A run id gives the run's newest checkpoint (`newest_checkpoint`)."""
    path = Path(ref)
    if path.suffix == ".ckpt":
        if not path.is_file():
            raise RunError(f"checkpoint {path} does not exist")
        # checkpoints/NAME.ckpt, or a SLURM pre-emption hpc_ckpt_N.ckpt in the run folder itself
        parent = path.resolve().parent
        return (parent.parent if parent.name == "checkpoints" else parent), path
    run_dir = find_run_dir(ref, runs_dir)
    ckpt = newest_checkpoint(run_dir)
    if ckpt is None:
        raise RunError(f"run {run_dir.name!r} has no readable checkpoint yet (nothing in {run_dir / 'checkpoints'})")
    return run_dir, ckpt


def joins_a_run() -> bool:
    """True in a rank other than the first of a distributed launch, as its launcher set it:
    torchrun (`RANK`), SLURM's srun (`SLURM_PROCID` with several tasks), Lightning's
    subprocess launcher (`LOCAL_RANK`, `NODE_RANK`). Such a rank joins the run rank 0 owns."""
    if os.environ.get("RANK", "").isdigit():
        return int(os.environ["RANK"]) > 0
    if int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1 and os.environ.get("SLURM_PROCID", "").isdigit():
        return int(os.environ["SLURM_PROCID"]) > 0
    ranks = (os.environ.get("LOCAL_RANK", "0"), os.environ.get("NODE_RANK", os.environ.get("GROUP_RANK", "0")))
    return any(rank.isdigit() and int(rank) > 0 for rank in ranks)


def launcher_run_id() -> str | None:
    """A run id every rank of one distributed launch derives alike (so ranks started at once
    by srun or torchrun agree without talking): None outside such a launch."""
    if int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1 and os.environ.get("SLURM_JOB_ID"):
        return f"slurm-{os.environ['SLURM_JOB_ID']}"
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 and os.environ.get("TORCHELASTIC_RUN_ID", "none") != "none":
        return f"torchrun-{os.environ['TORCHELASTIC_RUN_ID']}"
    return None


_held_locks: dict[Path, int] = {}


def acquire_run_lock(run_dir: Path) -> bool:
    """Take the run's lock (`RUN_DIR/.lock`, flock, released by the OS when the process ends,
    even on kill -9); False when this process already holds it. A RunError naming the other
    process when it is held elsewhere: one run id, one running process (plus its own ranks,
    which join without locking)."""
    key = run_dir.resolve()
    if key in _held_locks:
        return False
    run_dir.mkdir(parents=True, exist_ok=True)
    handle = os.open(run_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.read(handle, 64).decode("ascii", "replace").strip() or "?"
        os.close(handle)
        raise RunError(
            f"run {run_dir.name!r} is in use by another process (pid {holder}); wait for it to end, "
            "or start a run of its own with another run_id"
        ) from None
    os.ftruncate(handle, 0)
    os.write(handle, f"{os.getpid()}\n".encode())
    _held_locks[key] = handle
    return True


def release_run_lock(run_dir: Path) -> None:
    handle = _held_locks.pop(run_dir.resolve(), None)
    if handle is not None:
        os.close(handle)
