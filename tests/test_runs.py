"""effvid-runs over runs' metrics.jsonl, written by the logger effvid-train uses
(experiments/metrics_log.py), called the way Lightning calls it, a kill and a resume included."""

from __future__ import annotations

import itertools
import json
import math
import sys
from pathlib import Path

import pytest

from experiments import runs as runs_cli
from experiments.metrics_log import MetricsFileLogger
from experiments.run_history import (
    STEP_KEY,
    TIME_KEY,
    RunNotFoundError,
    config_differences,
    find_runs,
    get_run,
    load_history,
    lower_is_better,
    read_metrics_file,
    summarize,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# run A: one segment. The last loss is not the best one and the last accuracy is not the best one,
# so a swapped min/max rule or "best = last" shows up.
A_LOSS = {0: 1.0, 10: 0.5, 20: 0.25, 30: 0.3}
A_ACC = {10: 0.7, 30: 0.6}
# run B: killed after logging step 30, resumed from its checkpoint at step 20: the resumed process
# logs steps 20 and 30 again (Lightning logs the loss of step k+1 at step k).
B_SEGMENT_1 = {"loss": {0: 2.0, 10: 1.5, 20: 1.2, 30: 1.0}, "acc": {30: 0.5}}
B_SEGMENT_2 = {"loss": {20: 0.8, 30: 0.6, 40: 0.4}, "acc": {40: 0.65}}
B_RESUMED_FROM = 20


def _log_segment(run_dir: Path, loss: dict[int, float], acc: dict[int, float], resume_step: int | None = None,
                 killed: bool = False) -> MetricsFileLogger:
    """One process's logging, as Lightning calls the logger: a train log and a separate
    validation log at the same step. A killed process never finalizes, and was cut short in
    the middle of writing a row."""
    logger = MetricsFileLogger(run_dir, resume_step=resume_step)
    for step in sorted(set(loss) | set(acc)):
        if step in loss:
            logger.log_metrics({"train/loss": loss[step], "epoch": 0}, step=step)
        if step in acc:
            logger.log_metrics({"val/digit_accuracy": acc[step], "epoch": 0}, step=step)
    if killed:  # left open (a close would flush what the logger failed to); kill -9 leaves half a row
        with open(run_dir / "metrics.jsonl", "a") as file:
            file.write('{"step": 40, "train/lo')
    else:
        logger.finalize("success")
    return logger


def _write_run_files(run_dir: Path, run_id: str, lr: float, status: str, created: str, step: int) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "run.json").write_text(json.dumps(
        {"run_id": run_id, "status": status, "created": created, "experiment": "digits_quickstart",
         "global_step": step}))
    (run_dir / "config.yaml").write_text(
        f"run_id: {run_id}\n"
        "model:\n  channels: [32, 64]\n"
        f"optim:\n  lr: {lr}\n"
        f"logger:\n  id: ${{run_id}}\n  save_dir: runs/{run_id}\n"
        "hydra_cwd: ${hydra:runtime.cwd}\n")


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    runs = tmp_path_factory.mktemp("effvid-runs") / "runs"
    clock = itertools.count(start=100.0, step=1.5)  # each reading of the clock: 1.5 s later
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("experiments.metrics_log.time.monotonic", lambda: next(clock))
        _write_run_files(runs / "aaa11111", "aaa11111", 0.001, "completed", "2025-01-01T10:00:00", 30)
        _log_segment(runs / "aaa11111", A_LOSS, A_ACC)
        _write_run_files(runs / "bbb22222", "bbb22222", 0.002, "running", "2025-01-02T10:00:00", 40)
        killed = _log_segment(runs / "bbb22222", B_SEGMENT_1["loss"], B_SEGMENT_1["acc"], killed=True)
        _log_segment(runs / "bbb22222", B_SEGMENT_2["loss"], B_SEGMENT_2["acc"], resume_step=B_RESUMED_FROM)
        killed._file.close()  # noqa: SLF001 - what the OS does for a killed process
    (runs / "notes").mkdir()  # a folder without run.json is not a run
    return runs


def test_resumed_run_reads_as_one_history_without_the_killed_process_steps(runs_dir: Path) -> None:
    # the file itself holds each step the run kept once: the killed process's rows at and past
    # the checkpoint (and its half-written row) are gone, not merely hidden by the reader
    rows = read_metrics_file(runs_dir / "bbb22222" / "metrics.jsonl")
    assert [(row["step"], row.get("train/loss")) for row in rows if "train/loss" in row] == [
        (0, 2.0), (10, 1.5), (20, 0.8), (30, 0.6), (40, 0.4)]
    assert [row["step"] for row in rows if "val/digit_accuracy" in row] == [40]

    history = load_history(runs_dir / "bbb22222")
    assert [row[STEP_KEY] for row in history] == [0, 10, 20, 30, 40]
    assert {row[STEP_KEY]: row["train/loss"] for row in history} == {0: 2.0, 10: 1.5, 20: 0.8, 30: 0.6, 40: 0.4}
    # step 30 was re-run: the killed process's accuracy there belongs to the abandoned run
    assert {row[STEP_KEY]: row["val/digit_accuracy"] for row in history if "val/digit_accuracy" in row} == {40: 0.65}
    # training time continues from the last kept row (step 10) instead of restarting at 0
    elapsed = [row[TIME_KEY] for row in history]
    assert elapsed == sorted(elapsed) and len(set(elapsed)) == len(elapsed) and elapsed[2] > elapsed[1]


def test_a_resume_from_a_checkpoint_of_unknown_step_cuts_where_it_starts_logging(tmp_path: Path) -> None:
    _log_segment(tmp_path, {0: 1.0, 1: 0.9, 2: 0.8}, {})
    _log_segment(tmp_path, {1: 0.5}, {}, resume_step=sys.maxsize)  # what effvid-train passes then
    assert [(row["step"], row["train/loss"]) for row in read_metrics_file(tmp_path / "metrics.jsonl")] == [
        (0, 1.0), (1, 0.5)]


def test_a_torn_row_mid_file_is_left_out_by_name_and_a_run_from_before_metrics_files_is_named(
        tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0, "train/loss": 1.0}\n{"step": 1, "train/lo\n{"step": 2, "train/loss": NaN}\n')
    with pytest.warns(UserWarning, match=r"metrics.jsonl:2: unreadable row"):
        history = load_history(tmp_path)
    assert [row[STEP_KEY] for row in history] == [0, 2] and math.isnan(history[1]["train/loss"])

    old = tmp_path / "old-run"
    (old / "wandb").mkdir(parents=True)
    with pytest.warns(UserWarning, match=r"run old-run has no metrics.jsonl .*--online"):
        assert load_history(old) == []


def test_one_segment_history_merges_train_and_val_logs_of_a_step(runs_dir: Path) -> None:
    history = load_history(runs_dir / "aaa11111")
    assert [row[STEP_KEY] for row in history] == [0, 10, 20, 30]
    assert history[1]["train/loss"] == 0.5 and history[1]["val/digit_accuracy"] == 0.7
    assert summarize(history, ["train/loss", "val/digit_accuracy", "val/nothing"]) == {
        "train/loss": {"last": 0.3, "last_step": 30, "best": 0.25, "best_step": 20},
        "val/digit_accuracy": {"last": 0.6, "last_step": 30, "best": 0.7, "best_step": 10},
        "val/nothing": {"last": None, "last_step": None, "best": None, "best_step": None},
    }


def test_compare_reports_final_values_config_difference_and_plot(runs_dir: Path, capsys) -> None:
    assert runs_cli.main(["compare", "aaa11111", "bbb22222", "--runs-dir", str(runs_dir), "--format", "json"]) == 0
    report = json.loads(capsys.readouterr().out)

    metrics = report["metrics"]
    # default metrics: the shared ones, without W&B/Lightning bookkeeping (_step, trainer/*, epoch)
    assert set(metrics["aaa11111"]) == set(metrics["bbb22222"]) == {"train/loss", "val/digit_accuracy"}
    assert metrics["aaa11111"]["train/loss"] == {"last": 0.3, "last_step": 30, "best": 0.25, "best_step": 20}
    assert metrics["bbb22222"]["train/loss"] == {"last": 0.4, "last_step": 40, "best": 0.4, "best_step": 40}
    assert metrics["aaa11111"]["val/digit_accuracy"]["best"] == 0.7
    assert metrics["bbb22222"]["val/digit_accuracy"]["last"] == 0.65
    # lr differs; run_id / logger.id / logger.save_dir differ only by the run's own id
    assert report["config_diff"] == {"optim.lr": {"aaa11111": 0.001, "bbb22222": 0.002}}

    png = Path(report["plot"])
    assert png == runs_dir / "compare-aaa11111-bbb22222.png"
    assert png.read_bytes()[:8] == PNG_MAGIC
    import matplotlib.pyplot as plt

    assert plt.imread(png).shape[0] > 100


def test_compare_table_shows_both_runs_and_the_differing_key(runs_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "plots" / "cmp.png"
    code = runs_cli.main(["compare", "aaa11111", "bbb22222", "--runs-dir", str(runs_dir),
                          "--metrics", "train/loss", "--out", str(out), "--x", "time"])
    text = capsys.readouterr().out
    assert code == 0
    lines = text.splitlines()
    assert any(line.split()[:3] == ["train/loss", "aaa11111", "0.3"] for line in lines)
    assert any(line.split()[:3] == ["train/loss", "bbb22222", "0.4"] for line in lines)
    assert not any("val/digit_accuracy" in line for line in lines)
    assert any(line.split() == ["optim.lr", "0.001", "0.002"] for line in lines)
    assert not any(line.startswith(("model.channels", "run_id", "logger.")) for line in lines)
    assert out.read_bytes()[:8] == PNG_MAGIC


def test_list_shows_both_runs_with_last_train_loss(runs_dir: Path, capsys) -> None:
    assert runs_cli.main(["list", "--runs-dir", str(runs_dir), "--format", "csv"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "id,status,experiment,step,created,train/loss"
    assert lines[1:] == ["aaa11111,completed,digits_quickstart,30,2025-01-01T10:00:00,0.3",
                         "bbb22222,running,digits_quickstart,40,2025-01-02T10:00:00,0.4"]


def test_unknown_run_id_names_it_the_runs_dir_and_the_closest_ids(runs_dir: Path, capsys) -> None:
    with pytest.raises(RunNotFoundError, match=r"no run 'aaa1111x' in runs dir .*closest ids: aaa11111"):
        get_run(runs_dir, "aaa1111x")
    assert runs_cli.main(["compare", "aaa11111", "zzz", "--runs-dir", str(runs_dir)]) == 1
    captured = capsys.readouterr()
    assert "no run 'zzz'" in captured.err and str(runs_dir) in captured.err
    assert captured.out == ""


def test_env_var_sets_the_runs_dir_and_bad_run_json_is_skipped_by_name(
        runs_dir: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    broken = tmp_path / "runs" / "broken"
    broken.mkdir(parents=True)
    (broken / "run.json").write_text("{not json")
    (tmp_path / "runs" / "notes").mkdir()
    monkeypatch.setenv("EFFVID_RUNS", str(tmp_path / "runs"))
    assert runs_cli.main(["list"]) == 0
    captured = capsys.readouterr()
    assert "run.json" in captured.err and str(broken) in captured.err
    assert captured.out == ""  # no readable run there
    assert [run.id for run in find_runs(runs_dir)] == ["aaa11111", "bbb22222"]


def test_best_rule_and_nan_handling() -> None:
    for name in ("train/loss", "val/loss_simple", "val/fvd16", "val/lpips", "eval/mse"):
        assert lower_is_better(name), name
    for name in ("val/digit_accuracy", "val/clip_score", "val/psnr", "val/confidence"):
        assert not lower_is_better(name), name
    history = [{STEP_KEY: 0, "train/loss": 1.0}, {STEP_KEY: 1, "train/loss": 0.5},
               {STEP_KEY: 2, "train/loss": math.nan}]
    summary = summarize(history, ["train/loss"])["train/loss"]
    assert math.isnan(summary["last"]) and summary["last_step"] == 2  # a diverged run must show it
    assert (summary["best"], summary["best_step"]) == (0.5, 1)


def test_config_differences_marks_a_key_only_one_run_has() -> None:
    diffs = config_differences({"a": {"x": 1, "name": "runs/a"}, "b": {"x": 1, "name": "runs/b", "y": 2}})
    assert list(diffs) == ["y"] and diffs["y"]["b"] == 2 and repr(diffs["y"]["a"]) == "<absent>"


def test_help_has_examples(capsys) -> None:
    with pytest.raises(SystemExit):
        runs_cli.main(["--help"])
    assert "effvid-runs compare" in capsys.readouterr().out


@pytest.mark.slow
def test_compare_selects_runs_by_group_and_tag_and_plots_step_and_time(runs_dir: Path, tmp_path: Path, capsys) -> None:
    import shutil

    local = tmp_path / "runs"
    for run_id, extra in (("aaa11111", "  group: sweep-1\n  tags: [lr, digits]\n"),
                          ("bbb22222", "  group: sweep-1\n  tags: [digits]\n")):
        shutil.copytree(runs_dir / run_id, local / run_id)
        config = local / run_id / "config.yaml"
        config.write_text(config.read_text().replace("logger:\n", "logger:\n" + extra))
    out = tmp_path / "cmp.png"
    assert runs_cli.main(["compare", "--group", "sweep-1", "--runs-dir", str(local), "--format", "json",
                          "--x", "both", "--out", str(out)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["runs"] == ["aaa11111", "bbb22222"]
    assert report["metrics"]["bbb22222"]["train/loss"]["last"] == 0.4  # resumed run: one continuous history
    for axis in ("step", "time"):
        assert (tmp_path / f"cmp-{axis}.png").read_bytes()[:8] == PNG_MAGIC
    assert runs_cli.main(["compare", "--tag", "lr", "--runs-dir", str(local), "--format", "csv"]) == 0
    text = capsys.readouterr().out
    assert "aaa11111" in text and "bbb22222" not in text
    assert runs_cli.main(["compare", "--group", "nope", "--runs-dir", str(local)]) == 1
    assert "group='nope'" in capsys.readouterr().err


@pytest.mark.slow
def test_compare_online_selects_by_group_and_tag_through_the_wandb_api(monkeypatch) -> None:
    import wandb

    from experiments.wandb_history import select_online_runs

    asked = []

    class FakeApi:
        def runs(self, path, filters=None):
            asked.append((path, filters))
            return [type("Run", (), {"id": "r1"})(), type("Run", (), {"id": "r2"})()]

    monkeypatch.setattr(wandb, "Api", FakeApi)
    assert select_online_runs("team/effvid", "sweep-1", ["lr"]) == ["r1", "r2"]
    assert asked == [("team/effvid", {"group": "sweep-1", "tags": {"$all": ["lr"]}})]


def test_online_history_is_read_through_the_wandb_api_by_lightning_step(monkeypatch) -> None:
    import wandb

    from experiments.wandb_history import online_history_and_config

    # scan_history as the server returns a resumed Lightning run: W&B's own _step runs on, one
    # row per log call (train and validation at one global step), NaN as a string, media as dicts
    server_rows = [
        {"_step": 0, "_runtime": 1.0, "trainer/global_step": 0, "train/loss": 1.0, "epoch": 0},
        {"_step": 1, "_runtime": 2.0, "trainer/global_step": 10, "train/loss": 0.5, "epoch": 0},
        {"_step": 2, "_runtime": 2.5, "trainer/global_step": 10, "val/digit_accuracy": 0.7,
         "samples/grid": {"_type": "image-file", "path": "x.png"}},
        {"_step": 3, "_runtime": 9.0, "trainer/global_step": 20, "train/loss": "NaN", "val/digit_accuracy": None},
        {"_step": 4, "_runtime": 9.5, "train/loss": 0.1},  # logged outside Lightning: no global step
    ]
    asked = []

    class FakeApi:
        def run(self, path):
            asked.append(path)
            return type("Run", (), {"scan_history": lambda self: iter(server_rows),
                                    "config": {"optim": {"lr": 0.001}}})()

    monkeypatch.setattr(wandb, "Api", FakeApi)
    history, config = online_history_and_config("team/effvid", "r1")
    assert asked == ["team/effvid/r1"] and config == {"optim.lr": 0.001}
    assert [row[STEP_KEY] for row in history] == [0, 10, 20]
    assert history[1]["train/loss"] == 0.5 and history[1]["val/digit_accuracy"] == 0.7
    assert "samples/grid" not in history[1] and history[1][TIME_KEY] == 2.5
    assert math.isnan(history[2]["train/loss"]) and history[2][TIME_KEY] == 9.0
    assert summarize(history, ["train/loss"])["train/loss"] == {"last": history[2]["train/loss"], "last_step": 20,
                                                                "best": 0.5, "best_step": 10}
