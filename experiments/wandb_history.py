"""Runs on the W&B server (``effvid-runs --online ENTITY/PROJECT``), through wandb's public API:
needs an account and network; local runs never come here (``experiments/run_history.py``)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from experiments.run_history import (
    STEP_KEY,
    TIME_KEY,
    History,
    RunInfo,
    RunNotFoundError,
    flatten_config,
    is_number,
    merge_rows,
)

LIGHTNING_STEP_KEY = "trainer/global_step"
WANDB_STEP_KEY = "_step"
# The server writes non-finite floats as these strings.
_NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


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
    return server_history(run.scan_history()), flatten_config(dict(run.config))


def server_history(rows: Any) -> History:
    """W&B server rows (``scan_history``; resumed segments already joined there) as a history:
    x = Lightning's ``trainer/global_step`` (W&B's ``_step`` for a run that never logged it;
    rows without the step are left out), time = ``_runtime``, media (dicts) left out."""
    rows = [dict(row) for row in rows]
    step_key = LIGHTNING_STEP_KEY if any(LIGHTNING_STEP_KEY in row for row in rows) else WANDB_STEP_KEY
    kept = []
    for row in rows:
        if not is_number(row.get(step_key)) or not math.isfinite(row[step_key]):
            continue
        values = {key: _NON_FINITE.get(value, value) if isinstance(value, str) else value
                  for key, value in row.items() if value is not None and not isinstance(value, dict)}
        if is_number(row.get("_runtime")):
            values[TIME_KEY] = row["_runtime"]
        kept.append(values | {STEP_KEY: int(row[step_key])})
    return merge_rows(kept)
