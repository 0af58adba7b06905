"""Read local effvid runs: their run.json, config.yaml and metrics.jsonl.

A run folder (written by effvid-train) is ``RUNS_DIR/RUN_ID/`` with ``run.json``,
``config.yaml``, ``checkpoints/`` and ``metrics.jsonl``: one JSON object per logged row,
``{"step": 41, "_elapsed": 12.7, "train/loss": 0.183, ...}``, appended by
``experiments.metrics_log.MetricsFileLogger`` as the run trains. A resumed run continues the
same file (the rows its killed process logged past the checkpoint are dropped when it resumes),
so the file is the run's whole history in one piece; no W&B data is read.

A history is a list of rows (dicts), one per logged step, ordered by step. Each row holds the
metrics logged at that step (several logs at one step, e.g. train + validation, form one row;
a metric logged twice at one step keeps its later value) plus two keys:

- ``step`` (``STEP_KEY``): the x axis, Lightning's logging step (W&B's ``trainer/global_step``).
- ``_elapsed`` (``TIME_KEY``): seconds of training time, continued over resumes.

With ``--online`` the history comes from the W&B server instead, in the same shape
(``experiments/wandb_history.py``).
"""

from __future__ import annotations

import difflib
import json
import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STEP_KEY = "step"
TIME_KEY = "_elapsed"
METRICS_FILE = "metrics.jsonl"
_INTERNAL_KEYS = {"epoch", STEP_KEY}
_INTERNAL_PREFIXES = ("_", "trainer/")

History = list[dict[str, Any]]


class RunNotFoundError(LookupError):
    """No run with the asked id in the runs dir."""


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


# --- metrics.jsonl ---------------------------------------------------------------------------


def read_metrics_file(path: Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl in file order; [] when there is none. A last line cut short
    (a process killed while writing it) is left out silently; any other unreadable line is
    left out with a warning naming the file and line."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").split("\n")
    except FileNotFoundError:
        return []
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or not is_number(row.get(STEP_KEY)):
                raise ValueError("not an object with a numeric step")
        except ValueError as err:
            if number < len(lines):  # the text after the last newline is a row being written
                warnings.warn(f"{path}:{number}: unreadable row left out ({err})", stacklevel=2)
            continue
        rows.append(row)
    return rows


def merge_rows(rows: list[dict[str, Any]]) -> History:
    """Rows carrying ``STEP_KEY`` as one history: one row per step, ordered by step; rows of one
    step are merged in the order given (a later value of a metric replaces an earlier one)."""
    by_step: dict[int, dict[str, Any]] = {}
    for row in rows:
        step = int(row[STEP_KEY])
        by_step.setdefault(step, {}).update(row)
        by_step[step][STEP_KEY] = step
    return [by_step[step] for step in sorted(by_step)]


def load_history(run_dir: Path) -> History:
    """The run's metric history from its metrics.jsonl; [] when it has logged nothing yet."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file() and (Path(run_dir) / "wandb").is_dir():
        warnings.warn(f"run {Path(run_dir).name} has no {METRICS_FILE} (trained before effvid wrote one): "
                      "its curves are only in its W&B log; `wandb sync` it and read it with --online", stacklevel=2)
    return merge_rows(read_metrics_file(path))


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
