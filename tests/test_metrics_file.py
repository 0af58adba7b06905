"""metrics.jsonl through a real run: effvid-train killed with kill -9 (its whole process group)
after it logged steps past its last checkpoint, then `effvid-train resume=RUN_ID`; effvid-runs
then reads every step's loss exactly once, each from the process whose step the run kept."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from experiments.run_history import STEP_KEY, load_history, read_metrics_file
from tests.conftest import cli, tiny_overrides

REPO = Path(__file__).resolve().parents[1]
ENV = os.environ | {"PYTHONPATH": str(REPO)}
TRUST = "trust_targets=[tests.batch_trace.BatchTrace]"  # the resumed config names the test's callback
STEPS, CHECKPOINT_EVERY, KILL_AFTER = 6, 3, 5


def trace_losses(path: Path) -> dict[int, float]:
    """Global step -> the loss of that optimizer step, as tests/batch_trace.py wrote them."""
    return {row["step"]: row["loss"] for row in map(json.loads, path.read_text().splitlines())}


@pytest.mark.slow
def test_a_run_killed_with_kill_9_and_resumed_logs_every_step_once(digits_data_root: Path, tmp_path: Path) -> None:
    killed_trace, resumed_trace = tmp_path / "killed.jsonl", tmp_path / "resumed.jsonl"
    trace_cfg = f"{{_target_: tests.batch_trace.BatchTrace, path: '{killed_trace}', pause_after: {KILL_AFTER}}}"
    args = [*tiny_overrides(digits_data_root, tmp_path, max_steps=STEPS), "run_id=k",
            f"callbacks.checkpoint.every_n_train_steps={CHECKPOINT_EVERY}", f"+callbacks.trace={trace_cfg}",
            "paradigm.val_prompts=[a handwritten 1 moving down]", "~logger"]  # metrics.jsonl needs no W&B
    process = subprocess.Popen([sys.executable, "-m", "experiments.train", *args], cwd=REPO, env=ENV,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.monotonic() + 240
    while KILL_AFTER not in (trace_losses(killed_trace) if killed_trace.exists() else {}):  # paused there
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[0][-4000:]
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    process.communicate()

    metrics = tmp_path / "k" / "metrics.jsonl"
    last = torch.load(tmp_path / "k" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    resumed_from = last["global_step"]
    assert resumed_from == 3
    # Lightning logs the loss of step k at step k-1: the killed process logged steps 1..4, so the
    # loss of step 4 (at 3) is past the checkpoint and must not count twice
    assert [row["step"] for row in read_metrics_file(metrics) if "train/loss" in row] == [0, 1, 2, 3]

    cli("experiments.train", f"runs_dir={tmp_path}", "resume=k", f"callbacks.trace.path={resumed_trace}",
        "callbacks.trace.pause_after=null", TRUST)

    losses = trace_losses(killed_trace) | trace_losses(resumed_trace)  # resumed steps replace the killed ones
    assert sorted(trace_losses(resumed_trace)) == list(range(resumed_from + 1, STEPS + 1))
    rows = read_metrics_file(metrics)
    assert [row["step"] for row in rows if "train/loss" in row] == list(range(STEPS))  # the file: each step once
    validated = [row["step"] for row in rows if "val/loss" in row]
    assert validated == [1, 3, 5]  # validation after steps 2, 4 and 6, once each
    history = load_history(tmp_path / "k")
    assert {row[STEP_KEY]: row["train/loss"] for row in history if "train/loss" in row} == {
        step - 1: loss for step, loss in losses.items()}

    result = cli("experiments.runs", "compare", "k", "--runs-dir", str(tmp_path), "--format", "json",
                 "--metrics", "train/loss", "--out", str(tmp_path / "k.png"))
    summary = json.loads(result.stdout)["metrics"]["k"]["train/loss"]
    assert (summary["last_step"], summary["last"]) == (STEPS - 1, losses[STEPS])
    assert (summary["best_step"], summary["best"]) == min(((s - 1, v) for s, v in losses.items()), key=lambda p: p[1])
