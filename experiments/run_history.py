"""Read local effvid runs: their run.json, config.yaml and W&B offline metric history.

A run folder (written by effvid-train) is ``RUNS_DIR/RUN_ID/`` with ``run.json``,
``config.yaml``, ``checkpoints/`` and ``wandb/offline-run-<time>-RUN_ID/run-RUN_ID.wandb``.
Each resume adds one more ``offline-run-*`` folder (a *segment*) with the same id.

The .wandb transaction logs are read with W&B's own reader, ``wandb leet inspect --json``
(wandb >= 0.31 has no Python reader for them), run as a subprocess.

A history is a list of rows (dicts), one per training step, ordered by step. Each row holds
the metrics logged at that step plus two keys this module adds:

- ``_global_step`` (``STEP_KEY``): the x axis. Lightning's ``trainer/global_step`` when the run
  logs it (an offline resume restarts W&B's own ``_step`` at 0, so ``_step`` is only the
  fallback); rows logged without it take the last step seen before them in their segment.
- ``_elapsed`` (``TIME_KEY``): seconds of training time, W&B's ``_runtime`` summed over
  segments (an offline resume restarts ``_runtime`` at 0); ``_timestamp`` is kept as logged.

Segments are merged in the order they started, concatenated by step. Where a step was logged
in two segments (a resume from an earlier checkpoint re-runs steps), the later segment's row
replaces the earlier one whole: its values are the ones of the run as it continued.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STEP_KEY = "_global_step"
TIME_KEY = "_elapsed"
LIGHTNING_STEP_KEY = "trainer/global_step"
WANDB_STEP_KEY = "_step"

# W&B writes non-finite floats as these strings in its JSON.
_NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
_INTERNAL_KEYS = {"epoch"}
_INTERNAL_PREFIXES = ("_", "trainer/")

History = list[dict[str, Any]]


class RunNotFoundError(LookupError):
    """No run with the asked id in the runs dir."""


class WandbReadError(RuntimeError):
    """``wandb leet inspect`` could not read a run's .wandb file."""


@dataclass(frozen=True)
class RunInfo:
    """One run folder, as described by its run.json."""

    id: str
    path: Path
    status: str
    created: str
    experiment: str | None
    global_step: int | None


def find_runs(runs_dir: Path) -> list[RunInfo]:
    """Runs under ``runs_dir``, oldest first. Folders without run.json are not runs.

    A run.json that cannot be parsed is skipped with a warning naming it, so one damaged
    run does not hide the others.
    """
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        return []
    runs = []
    for run_json in sorted(runs_dir.glob("*/run.json")):
        try:
            meta = json.loads(run_json.read_text())
            if not isinstance(meta, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as err:
            warnings.warn(f"skipping {run_json}: unreadable run.json ({err})", stacklevel=2)
            continue
        step = meta.get("global_step")
        runs.append(
            RunInfo(
                id=str(meta.get("run_id") or run_json.parent.name),
                path=run_json.parent,
                status=str(meta.get("status", "unknown")),
                created=str(meta.get("created", "")),
                experiment=meta.get("experiment"),
                global_step=int(step) if isinstance(step, (int, float)) else None,
            )
        )
    return sorted(runs, key=lambda run: (run.created, run.id))


def get_run(runs_dir: Path, run_id: str) -> RunInfo:
    """The run with this id (or folder name); a clear error with the closest ids otherwise."""
    runs = find_runs(runs_dir)
    for run in runs:
        if run_id in (run.id, run.path.name):
            return run
    ids = [run.id for run in runs]
    close = [i for i in ids if i.startswith(run_id)] or difflib.get_close_matches(run_id, ids, n=3, cutoff=0.3)
    if close:
        hint = f"closest ids: {', '.join(close[:3])}"
    elif ids:
        hint = f"{len(ids)} runs there, e.g. {', '.join(ids[-3:])}"
    else:
        hint = "no runs there (a run folder holds a run.json)"
    raise RunNotFoundError(f"no run '{run_id}' in runs dir {runs_dir} ({hint})")


# --- W&B offline records ---------------------------------------------------------------------


def wandb_executable() -> str:
    """The ``wandb`` CLI of this Python environment, else the one on PATH."""
    beside = Path(sys.executable).parent / ("wandb.exe" if os.name == "nt" else "wandb")
    if beside.is_file():
        return str(beside)
    found = shutil.which("wandb")
    if found is None:
        raise WandbReadError(f"wandb CLI not found beside {sys.executable} nor on PATH; install wandb>=0.31")
    return found


def read_wandb_records(wandb_file: Path) -> list[dict[str, Any]]:
    """Every record of one .wandb file, as ``wandb leet inspect --json`` prints them.

    A file still being written (a running run) reads up to its last complete record.
    """
    cmd = [wandb_executable(), "leet", "inspect", "--json", str(wandb_file)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        raise WandbReadError(
            f"cannot read W&B log {wandb_file}: `{' '.join(cmd[1:])}` exited with {proc.returncode}"
            f" ({detail[-1] if detail else 'no output'}); `wandb leet inspect` needs wandb>=0.31"
        )
    try:
        return [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    except json.JSONDecodeError as err:
        raise WandbReadError(f"cannot read W&B log {wandb_file}: unexpected inspect output ({err})") from err


def segment_files(run_dir: Path) -> list[Path]:
    """The run's .wandb files, one per segment (initial run + each resume), in any order."""
    files = {p.resolve() for p in Path(run_dir).glob("wandb/*run-*/*.wandb")}  # not latest-run/
    return sorted(files)


def _segment_rows(records: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    """(start time, history rows) of one segment; rows are W&B's, values decoded."""
    start = ""
    rows = []
    for record in records:
        if record.get("type") == "run":
            start = record["run"].get("start_time", "")
        elif record.get("type") == "history":
            rows.append(_decode_row(record["history"].get("item", {})))
    return start, rows


def _decode_row(item: dict[str, Any]) -> dict[str, Any]:
    """Non-finite strings back to floats; media (``key._type`` ...) left out, they are not metrics."""
    media = {key[: -len("._type")] for key in item if key.endswith("._type")}
    row = {}
    for key, value in item.items():
        if any(key.startswith(prefix + ".") for prefix in media):
            continue
        row[key] = _NON_FINITE.get(value, value) if isinstance(value, str) else value
    return row


def merge_segments(segments: list[list[dict[str, Any]]]) -> History:
    """One history from W&B rows of segments given in the order they ran (see module doc)."""
    use_lightning_step = any(LIGHTNING_STEP_KEY in row for rows in segments for row in rows)
    step_key = LIGHTNING_STEP_KEY if use_lightning_step else WANDB_STEP_KEY
    by_step: dict[int, dict[str, Any]] = {}
    runtime_offset = 0.0
    for rows in segments:
        steps = _fill_steps(rows, step_key)
        if not steps:
            continue
        segment: dict[int, dict[str, Any]] = {}
        for step, row in zip(steps, rows):
            merged = segment.setdefault(step, {})
            merged.update(row)  # several logs at one step (train + val) form one row
            merged[STEP_KEY] = step
            if is_number(row.get("_runtime")):
                merged[TIME_KEY] = runtime_offset + row["_runtime"]
        by_step.update(segment)  # a step this segment re-ran replaces the earlier row whole
        runtimes = [row["_runtime"] for row in rows if isinstance(row.get("_runtime"), (int, float))]
        runtime_offset += max(runtimes, default=0.0)
    return [by_step[step] for step in sorted(by_step)]


def _fill_steps(rows: list[dict[str, Any]], step_key: str) -> list[int]:
    """The step of each row; rows without one take the previous row's (the first: the next one's)."""
    steps: list[int | None] = [
        int(row[step_key]) if is_number(row.get(step_key)) and math.isfinite(row[step_key]) else None for row in rows
    ]
    known = [s for s in steps if s is not None]
    if not known:
        return []
    last = known[0]
    filled = []
    for step in steps:
        last = step if step is not None else last
        filled.append(last)
    return filled


def load_history(run_dir: Path) -> History:
    """The run's metric history merged over its segments; [] when it has no W&B data yet."""
    files = segment_files(run_dir)
    with ThreadPoolExecutor(max_workers=min(4, len(files) or 1)) as pool:
        segments = list(pool.map(lambda f: _segment_rows(read_wandb_records(f)), files))
    # The start time orders segments; the folder name (second resolution) breaks ties.
    ordered = sorted(zip(segments, files), key=lambda seg: (seg[0][0], seg[1].parent.name))
    return merge_segments([rows for (_, rows), _ in ordered])


# --- summaries -------------------------------------------------------------------------------

_LOWER_IS_BETTER_TOKEN = re.compile(r"(fvd|fid|mse|mae|lpips|error)\d*")


def lower_is_better(metric: str) -> bool:
    """The rule for "best": a metric is minimised when its name contains "loss" or one of its
    parts (split on / _ . - space) is fvd, fid, mse, mae, lpips or error (digits may follow,
    e.g. ``val/fvd16``); every other metric (accuracy, clip score, psnr ...) is maximised."""
    name = metric.lower()
    if "loss" in name:
        return True
    return any(_LOWER_IS_BETTER_TOKEN.fullmatch(part) for part in re.split(r"[/_.\-\s]+", name))


def summarize(history: History, metrics: list[str]) -> dict[str, dict[str, Any]]:
    """Per metric: ``last`` value (even NaN: a diverged run should show it), ``last_step``,
    ``best`` value over finite values (see ``lower_is_better``) and ``best_step``.
    A metric the run never logged has all four None."""
    summary = {}
    for metric in metrics:
        points = [(row[STEP_KEY], row[metric]) for row in history if is_number(row.get(metric))]
        finite = [(step, value) for step, value in points if math.isfinite(value)]
        entry: dict[str, Any] = {"last": None, "last_step": None, "best": None, "best_step": None}
        if points:
            entry["last_step"], entry["last"] = points[-1]
        if finite:
            pick = min if lower_is_better(metric) else max
            entry["best_step"], entry["best"] = pick(finite, key=lambda point: point[1])
        summary[metric] = entry
    return summary


def metric_names(history: History) -> list[str]:
    """Numeric keys of a history that are metrics, not W&B/Lightning bookkeeping
    (``_step``, ``_runtime``, ``_timestamp``, ``trainer/*``, ``epoch``, this module's ``_*``)."""
    names = {key for row in history for key, value in row.items() if is_number(value)}
    return sorted(n for n in names if n not in _INTERNAL_KEYS and not n.startswith(_INTERNAL_PREFIXES))


def is_number(value: Any) -> bool:
    """An int or float, not a bool (W&B logs bools too)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# --- config ----------------------------------------------------------------------------------


def load_flat_config(run_dir: Path) -> dict[str, Any] | None:
    """config.yaml flattened to dotted keys (lists stay whole values); None if it is absent.

    Interpolations are resolved where they can be; one that cannot outside Hydra (e.g.
    ``${hydra:...}``) keeps its ``${...}`` text.
    """
    from omegaconf import OmegaConf

    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        return None
    try:
        cfg = OmegaConf.load(path)
    except Exception as err:  # yaml and omegaconf raise several unrelated types
        raise ValueError(f"cannot read config {path}: {err}") from err
    return flatten_config(cfg)


def flatten_config(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """A DictConfig (or dict) as ``{"a.b.c": value}``."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    flat: dict[str, Any] = {}
    keys = cfg.keys() if isinstance(cfg, (dict, DictConfig)) else []
    for key in keys:
        name = f"{prefix}{key}"
        try:
            value = cfg[key]
        except Exception:  # unresolvable interpolation or ??? : show the text as written
            value = cfg._get_node(key)._value() if isinstance(cfg, DictConfig) else None
        if isinstance(value, (dict, DictConfig)) and len(value):
            flat.update(flatten_config(value, prefix=f"{name}."))
            continue
        if isinstance(value, (DictConfig, ListConfig)):
            try:
                value = OmegaConf.to_container(value, resolve=True)
            except Exception:
                value = OmegaConf.to_container(value, resolve=False)
        flat[name] = value
    return flat


def config_differences(configs: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Keys whose values differ between runs: ``{key: {run_id: value}}``; a run lacking the key
    has ``MISSING``. Values that differ only by holding the run's own id (``run_id``,
    ``logger.save_dir: runs/<id>`` ...) are the same setting and are not reported."""
    keys = sorted({key for cfg in configs.values() for key in cfg})
    diffs = {}
    for key in keys:
        values = {run_id: cfg.get(key, MISSING) for run_id, cfg in configs.items()}
        normalised = {json.dumps(_without_id(value, run_id), sort_keys=True, default=str)
                      for run_id, value in values.items()}
        if len(normalised) > 1:
            diffs[key] = values
    return diffs


class _Missing:
    def __repr__(self) -> str:
        return "<absent>"


MISSING = _Missing()


def _without_id(value: Any, run_id: str) -> Any:
    if value is MISSING:
        return "<absent>"
    return value.replace(run_id, "<run_id>") if isinstance(value, str) and run_id else value


def select_runs(runs_dir: Path, group: str | None = None, tags: list[str] | None = None) -> list[str]:
    """Ids of the local runs whose W&B group (`logger.group` in config.yaml) is `group` and
    that carry every tag in `tags` (`logger.tags`), oldest first."""
    chosen = []
    for run in find_runs(runs_dir):
        cfg = load_flat_config(run.path) or {}
        run_tags = cfg.get("logger.tags") or []
        if group is not None and cfg.get("logger.group") != group:
            continue
        if tags and not set(tags) <= set(run_tags if isinstance(run_tags, list) else [run_tags]):
            continue
        chosen.append(run.id)
    return chosen


# --- online (W&B server, needs an account and network; not used offline) ----------------------


def select_online_runs(project_path: str, group: str | None = None, tags: list[str] | None = None) -> list[str]:
    """Ids of the runs of ``ENTITY/PROJECT`` on the W&B server in `group` with all `tags`."""
    import wandb

    filters: dict[str, Any] = {}
    if group is not None:
        filters["group"] = group
    if tags:
        filters["tags"] = {"$all": list(tags)}
    return [run.id for run in wandb.Api().runs(project_path, filters=filters)]


def online_runs(project_path: str) -> list[tuple[RunInfo, dict[str, Any]]]:
    """(RunInfo, summary) of each run of ``ENTITY/PROJECT`` on the W&B server."""
    import wandb

    infos = []
    for run in wandb.Api().runs(project_path):
        summary = dict(run.summary)
        step = summary.get(LIGHTNING_STEP_KEY, summary.get(WANDB_STEP_KEY))
        experiment = run.config.get("experiment_name") or run.group
        info = RunInfo(run.id, Path(run.path[-1]), run.state, str(run.created_at), experiment,
                       int(step) if is_number(step) else None)
        infos.append((info, summary))
    return infos


def online_history_and_config(project_path: str, run_id: str) -> tuple[History, dict[str, Any]]:
    """History (same shape as ``load_history``) and flattened config of one server run."""
    import wandb

    try:
        run = wandb.Api().run(f"{project_path}/{run_id}")
    except Exception as err:  # wandb raises CommError / ValueError for unknown runs
        raise RunNotFoundError(f"no run '{run_id}' in W&B project {project_path} ({err})") from err
    rows = [_decode_row(dict(row)) for row in run.scan_history()]
    # The server has already merged resumed segments into one history.
    return merge_segments([rows]), flatten_config(dict(run.config))
