"""effvid-runs: list and compare runs from their local metrics.jsonl, no network needed."""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from experiments.run_dir import runs_root
from experiments.run_history import (
    MISSING,
    History,
    RunInfo,
    RunNotFoundError,
    config_differences,
    find_runs,
    get_run,
    load_flat_config,
    load_history,
    lower_is_better,
    metric_names,
    select_runs,
    summarize,
)
from experiments.wandb_history import online_history_and_config, online_runs, select_online_runs

LIST_METRIC = "train/loss"
FORMATS = ("table", "markdown", "csv", "json")

EXAMPLES = """\
examples:
  effvid-runs list                                   # runs under $EFFVID_RUNS or ./runs
  effvid-runs list --runs-dir /data/runs --format markdown
  effvid-runs compare 20250101-100000-ab12 20250102-093000-cd34   # metrics, config diff, PNG
  effvid-runs compare 20250101-100000-ab12 20250102-093000-cd34 --metrics train/loss,val/digit_accuracy \\
      --x time --out compare.png
  effvid-runs compare 20250101-100000-ab12 20250102-093000-cd34 --format json > compare.json
  effvid-runs compare --group sweep-20250101-100000-ab12 --x both   # every run of a sweep, step + time plots
  effvid-runs compare --tag baseline --tag digits RUN_C               # tagged runs plus one more
  effvid-runs compare --online my-team/effvid --group digits_quickstart --format markdown
  effvid-runs list --online my-team/effvid           # runs on the W&B server (needs login)

A run's history is read from RUNS_DIR/RUN_ID/metrics.jsonl, which effvid-train appends to at
every logged step (a resumed run continues it, minus the steps it runs again); --online reads
the W&B server instead.
Best value: min for metrics named like a loss/error (loss, fvd, fid, mse, mae, lpips, error),
max for everything else.
"""


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--runs-dir", type=Path, default=None,
                        help="folder holding one folder per run (default: $EFFVID_RUNS or ./runs)")
    common.add_argument("--online", metavar="ENTITY/PROJECT", default=None,
                        help="read runs from the W&B server instead of the runs dir (needs an account)")
    common.add_argument("--format", choices=FORMATS, default="table", help="output format (default: table)")

    parser = argparse.ArgumentParser(
        prog="effvid-runs",
        description="List and compare effvid runs from their metrics.jsonl; works without network.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{list,compare}")

    listing = sub.add_parser("list", parents=[common], help="one line per run: status, step, last train/loss",
                             epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    listing.set_defaults(func=cmd_list)

    compare = sub.add_parser("compare", parents=[common],
                             help="last/best metric values, config differences and a plot of runs",
                             epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    compare.add_argument("run_ids", nargs="*", metavar="RUN_ID", help="ids of the runs to compare (any number)")
    compare.add_argument("--group", default=None, help="add every run of this W&B group (logger.group)")
    compare.add_argument("--tag", action="append", default=[], dest="tags",
                         help="add every run with this W&B tag (logger.tags); repeat to require several")
    compare.add_argument("--metrics", default=None,
                         help="comma-separated metric names (default: every metric all the runs logged)")
    compare.add_argument("--out", type=Path, default=None,
                         help="PNG to write (default: RUNS_DIR/compare-<idA>-<idB>.png)")
    compare.add_argument("--x", choices=("step", "time", "both"), default="step",
                         help="x axis of the plot: global step, training time, or both as two PNGs "
                              "(-step.png, -time.png) (default: step)")
    compare.set_defaults(func=cmd_compare)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``effvid-runs``; returns the exit status."""
    args = build_parser().parse_args(argv)
    args.runs_dir = runs_root(args.runs_dir)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            status = args.func(args)
        for message in dict.fromkeys(str(w.message) for w in caught):  # each run lookup re-scans
            print(f"effvid-runs: warning: {message}", file=sys.stderr)
        return status
    except (RunNotFoundError, ValueError) as err:
        print(f"effvid-runs: error: {err}", file=sys.stderr)
        return 1


# --- list ------------------------------------------------------------------------------------


def cmd_list(args: argparse.Namespace) -> int:
    if args.online:
        entries = [(info, summary.get(LIST_METRIC)) for info, summary in online_runs(args.online)]
    else:
        runs = find_runs(args.runs_dir)
        with ThreadPoolExecutor(max_workers=4) as pool:
            entries = list(zip(runs, pool.map(_last_list_metric, runs)))
    if not entries:
        print(f"no runs in {args.online or args.runs_dir}", file=sys.stderr)
        return 0
    headers = ["id", "status", "experiment", "step", "created", LIST_METRIC]
    rows = [[info.id, info.status, info.experiment, info.global_step,
             info.created if args.format in ("csv", "json") else _short_time(info.created), value]
            for info, value in entries]
    print(render(headers, rows, args.format), end="")
    return 0


def _last_list_metric(run: RunInfo) -> float | None:
    try:
        return summarize(load_history(run.path), [LIST_METRIC])[LIST_METRIC]["last"]
    except OSError as err:  # one unreadable run should not hide the others
        warnings.warn(f"run {run.id}: {err}")
        return None


def _short_time(iso: str) -> str:
    return iso[:16].replace("T", " ")


# --- compare ---------------------------------------------------------------------------------


def cmd_compare(args: argparse.Namespace) -> int:
    selected: list[str] = []
    if args.group is not None or args.tags:
        selected = (select_online_runs(args.online, args.group, args.tags) if args.online
                    else select_runs(args.runs_dir, args.group, args.tags))
        if not selected:
            where = args.online or args.runs_dir
            raise ValueError(f"no run in {where} has group={args.group!r} and tags={args.tags}")
    run_ids = list(dict.fromkeys([*args.run_ids, *selected]))  # keep order, drop repeats
    if not run_ids:
        raise ValueError("name runs to compare: RUN_ID ..., --group GROUP or --tag TAG")
    histories, configs = _load_runs(args, run_ids)

    if args.metrics:
        metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
        unknown = [m for m in metrics if all(m not in metric_names(h) for h in histories.values())]
        if unknown:
            known = sorted({m for h in histories.values() for m in metric_names(h)})
            raise ValueError(f"no run logged metric(s) {', '.join(unknown)}; logged: {', '.join(known) or 'none'}")
    else:
        shared = [set(metric_names(h)) for h in histories.values()]
        metrics = sorted(set.intersection(*shared)) if shared else []
        if not metrics:
            print("effvid-runs: note: these runs share no logged metric; use --metrics", file=sys.stderr)

    summaries = {run_id: summarize(history, metrics) for run_id, history in histories.items()}
    with_config = {run_id: cfg for run_id, cfg in configs.items() if cfg is not None}
    for run_id in configs.keys() - with_config.keys():
        print(f"effvid-runs: note: run {run_id} has no config.yaml; left out of the config diff", file=sys.stderr)
    diffs = config_differences(with_config)

    plot = None
    if any(s[m]["last"] is not None for s in summaries.values() for m in metrics):
        from experiments.run_plots import plot_metrics  # matplotlib only when plotting

        name = "-".join(run_ids) if len(run_ids) <= 4 else f"{'-'.join(run_ids[:3])}-and-{len(run_ids) - 3}-more"
        out = args.out or Path(args.runs_dir) / f"compare-{name}.png"
        if args.x == "both":
            plot = plot_metrics(histories, metrics, out.with_name(f"{out.stem}-step.png"), x="step")
            plot_metrics(histories, metrics, out.with_name(f"{out.stem}-time.png"), x="time")
        else:
            plot = plot_metrics(histories, metrics, out, x=args.x)

    print(render_comparison(run_ids, metrics, summaries, diffs, plot, args.format), end="")
    if plot is not None and args.format in ("csv", "json"):
        print(f"plot: {plot}", file=sys.stderr)  # stdout stays machine-readable
    return 0


def _load_runs(args: argparse.Namespace, run_ids: list[str]
               ) -> tuple[dict[str, History], dict[str, dict[str, Any] | None]]:
    """History and flat config of each run, local or (with --online) from the W&B server."""
    if args.online:
        with ThreadPoolExecutor(max_workers=4) as pool:
            loaded = list(pool.map(lambda rid: online_history_and_config(args.online, rid), run_ids))
        return ({rid: h for rid, (h, _) in zip(run_ids, loaded)},
                {rid: c for rid, (_, c) in zip(run_ids, loaded)})
    runs = [get_run(args.runs_dir, run_id) for run_id in run_ids]  # fail fast on a bad id
    with ThreadPoolExecutor(max_workers=4) as pool:
        histories = list(pool.map(lambda run: load_history(run.path), runs))
    return (dict(zip(run_ids, histories)),
            {run_id: load_flat_config(run.path) for run_id, run in zip(run_ids, runs)})


def render_comparison(run_ids: list[str], metrics: list[str], summaries: dict[str, dict[str, dict[str, Any]]],
                      diffs: dict[str, dict[str, Any]], plot: Path | None, fmt: str) -> str:
    """The compare report: metric table, config-difference table, plot path."""
    if fmt == "json":
        report = {
            "runs": run_ids,
            "metrics": {rid: {m: {k: _json_number(v) for k, v in s.items()} for m, s in summaries[rid].items()}
                        for rid in run_ids},
            "config_diff": {key: {rid: (None if v is MISSING else v) for rid, v in values.items()}
                            for key, values in diffs.items()},
            "plot": str(plot) if plot else None,
        }
        return json.dumps(report, indent=2, default=str) + "\n"

    metric_rows = [[m, rid, s["last"], s["last_step"], s["best"], s["best_step"]]
                   for m in metrics for rid in run_ids for s in [summaries[rid][m]]]
    metric_table = render(["metric", "run", "last", "last_step", "best", "best_step"], metric_rows, fmt)
    diff_rows = [[key] + [_config_value(values.get(rid, MISSING)) for rid in run_ids] for key, values in diffs.items()]
    diff_table = render(["config key"] + run_ids, diff_rows, fmt)
    if fmt == "csv":
        return metric_table + "\n" + diff_table

    heading = "### " if fmt == "markdown" else ""
    rule = "best = min for " + ", ".join(sorted({m for m in metrics if lower_is_better(m)})) + ", max otherwise" \
        if any(lower_is_better(m) for m in metrics) else "best = max"
    parts = [f"{heading}Metrics ({rule})\n\n", metric_table if metrics else "(no metrics)\n",
             f"\n{heading}Config differences ({len(diffs)} keys)\n\n", diff_table if diffs else "(none)\n"]
    if plot is not None:
        parts.append(f"\nPlot: {plot}\n")
    return "".join(parts)


def _config_value(value: Any) -> str:
    if value is MISSING:
        return "<absent>"
    return value if isinstance(value, str) else json.dumps(value, default=str)


def _json_number(value: Any) -> Any:
    # W&B's own spelling of non-finite floats; keeps the output valid JSON.
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    return value


# --- tables ----------------------------------------------------------------------------------


def render(headers: list[str], rows: list[list[Any]], fmt: str) -> str:
    """Rows as an aligned text table, a markdown table, CSV or a JSON list of objects."""
    if fmt == "json":
        return json.dumps([dict(zip(headers, map(_json_number, row))) for row in rows], indent=2, default=str) + "\n"
    cells = [[_cell(value) for value in row] for row in rows]
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(headers)
        writer.writerows(cells)
        return buffer.getvalue()
    if fmt == "markdown":
        lines = [headers, ["---"] * len(headers)] + [[c.replace("|", "\\|") for c in row] for row in cells]
        return "".join("| " + " | ".join(line) + " |\n" for line in lines)
    widths = [max(len(str(c)) for c in column) for column in zip(headers, *cells)]
    return "".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() + "\n" for line in [headers] + cells)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


if __name__ == "__main__":
    sys.exit(main())
