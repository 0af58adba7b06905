"""effvid-train / effvid-sample / effvid-runs end to end on tiny runs, through the real CLIs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.errors import ConfigCompositionException

from data_tools.video_io import decode_mp4
from experiments.run_dir import RunError
from experiments.run_history import read_metrics_file
from experiments.train import prepare_argv, run_training
from tests.conftest import cli, compose_config, tiny_overrides

def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def adam_steps(checkpoint: dict) -> set[int]:
    return {int(s["step"]) for s in checkpoint["optimizer_states"][0]["state"].values()}


@pytest.fixture(scope="module")
def runs(digits_data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two finished 4-step runs, `a` and `b` (different learning rates)."""
    runs_dir = tmp_path_factory.mktemp("runs")
    cli("experiments.train", *tiny_overrides(digits_data_root, runs_dir), "run_id=a")
    cli("experiments.train", *tiny_overrides(digits_data_root, runs_dir), "run_id=b", "paradigm.optimizer.lr=3e-4")
    return runs_dir


@pytest.mark.slow
def test_a_run_leaves_config_checkpoints_samples_and_a_wandb_run(runs: Path) -> None:
    run = runs / "a"
    status = json.loads((run / "run.json").read_text())
    assert status["status"] == "completed" and status["global_step"] == 4
    assert {"val/loss", "val/digit_accuracy", "train/loss"} <= set(status["metrics"])
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt", "step=000002.ckpt", "step=000004.ckpt"]
    checkpoint = load(run / "checkpoints" / "last.ckpt")
    assert checkpoint["global_step"] == 4 and adam_steps(checkpoint) == {4}
    assert checkpoint["effvid"]["run_id"] == "a" and checkpoint["effvid"]["wandb_run_id"] == "a"
    assert "current_model_state" in checkpoint  # EMA weights in state_dict, raw weights kept to resume
    assert (run / "samples" / "step_000004" / "grid.png").exists()
    assert len(list((run / "samples" / "step_000004").glob("*.mp4"))) == 10
    assert list(run.glob("wandb/offline-run-*-a/run-a.wandb"))
    rows = read_metrics_file(run / "metrics.jsonl")
    assert [row["step"] for row in rows if "train/loss" in row] == [0, 1, 2, 3]
    assert [row["step"] for row in rows if "val/loss" in row] == [1, 3]  # validation after steps 2 and 4
    assert (run / "config.yaml").exists()


@pytest.mark.slow
def test_resume_continues_step_optimizer_and_wandb_run(runs: Path, digits_data_root: Path) -> None:
    again = cli("experiments.train", f"runs_dir={runs}", "resume=a", check=False)
    assert again.returncode != 0
    assert "already completed at step 4" in again.stderr and "trainer.max_steps=" in again.stderr

    # 7 is off the every-2-steps save interval: the final step must still be checkpointed.
    cli("experiments.train", f"runs_dir={runs}", "resume=a", "trainer.max_steps=7")
    checkpoint = load(runs / "a" / "checkpoints" / "last.ckpt")
    assert checkpoint["global_step"] == 7
    assert adam_steps(checkpoint) == {7}  # the optimizer continued; a restart would show 3
    assert (runs / "a" / "checkpoints" / "step=000007.ckpt").exists()
    assert checkpoint["effvid"]["wandb_run_id"] == "a"
    assert len(list((runs / "a").glob("wandb/offline-run-*-a"))) == 2  # same W&B id, two segments
    status = json.loads((runs / "a" / "run.json").read_text())
    assert status["status"] == "completed" and status["global_step"] == 7

    # metrics.jsonl, written beside W&B, continues: each step's loss once (Lightning logs step k's at k-1)
    rows = read_metrics_file(runs / "a" / "metrics.jsonl")
    assert [row["step"] for row in rows if "train/loss" in row] == list(range(7))


@pytest.mark.slow
def test_validation_samples_come_from_the_checkpointed_ema_weights(runs: Path, tmp_path: Path) -> None:
    # effvid-sample loads last.ckpt's state_dict (the EMA weights); with the run's prompts and
    # seed it must redraw exactly the videos that validation wrote at the same step.
    cli("experiments.sample", f"runs_dir={runs}", "run=b", f"out={tmp_path}")
    validation = sorted((runs / "b" / "samples" / "step_000004").glob("*.mp4"))
    resampled = sorted(tmp_path.glob("*.mp4"))
    assert [p.name for p in resampled] == [p.name for p in validation]
    for ours, theirs in zip(resampled, validation):
        assert np.array_equal(decode_mp4(ours), decode_mp4(theirs)), ours.name


@pytest.mark.slow
def test_sample_writes_requested_videos_from_a_run(runs: Path, tmp_path: Path) -> None:
    out = tmp_path / "samples"
    cli(
        "experiments.sample", f"runs_dir={runs}", "run=b", "prompts=[a handwritten 3 moving up]",
        "samples_per_prompt=2", "steps=3", "sampler=ddim", f"out={out}",
    )  # fmt: skip
    assert len(list(out.glob("*.mp4"))) == 2 and (out / "grid.png").exists()
    assert (out / "captions.txt").read_text().splitlines() == ["a handwritten 3 moving up"] * 2


@pytest.mark.slow
def test_runs_compare_lists_both_runs_with_final_metrics(runs: Path, tmp_path: Path) -> None:
    out = tmp_path / "cmp.png"
    result = cli("experiments.runs", "compare", "a", "b", "--runs-dir", str(runs), "--format", "json", "--out", str(out))
    report = json.loads(result.stdout)
    text = json.dumps(report)
    assert '"a"' in text and '"b"' in text and "train/loss" in text
    assert "paradigm.optimizer.lr" in text
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_unknown_resume_id_names_the_id(tmp_path: Path) -> None:
    with pytest.raises(RunError, match="no run with id 'nope'"):
        prepare_argv([f"runs_dir={tmp_path}", "resume=nope"])


def test_unknown_config_key_is_named(digits_data_root: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigCompositionException, match="max_stepz"):
        compose_config([*tiny_overrides(digits_data_root, tmp_path), "trainer.max_stepz=3"])


def test_missing_shards_stop_with_the_path_and_leave_no_run(tmp_path: Path) -> None:
    cfg = compose_config([*tiny_overrides(tmp_path / "nowhere", tmp_path / "runs"), "run_id=x"])
    with pytest.raises(SystemExit, match="nowhere"):
        run_training(cfg)
    assert not (tmp_path / "runs" / "x").exists()
