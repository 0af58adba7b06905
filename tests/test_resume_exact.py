"""Exact resume: a training run killed with kill -9 between two checkpoints, then resumed with
`effvid-train resume=RUN_ID`, continues with the same batches, losses and weights as a run that
was never interrupted; and a kill during a checkpoint save keeps the previous checkpoint."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from tests.conftest import tiny_overrides

REPO = Path(__file__).resolve().parents[1]
ENV = os.environ | {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "PYTHONPATH": str(REPO)}


def overrides(data_root: Path, runs_dir: Path, trace: Path, pause_after: int | None = None) -> list[str]:
    """8 steps over 24 clips in 2 shards with 2 loader workers (an epoch is 6 steps, so the
    runs cross an epoch boundary), checkpoints every 3 steps, validation every 4, no W&B."""
    trace_cfg = f"{{_target_: tests.batch_trace.BatchTrace, path: '{trace}', pause_after: {pause_after or 'null'}}}"
    return [
        *tiny_overrides(data_root, runs_dir, max_steps=8),
        "trainer.val_check_interval=4",
        "callbacks.checkpoint.every_n_train_steps=3",
        "data.num_workers=2",
        "paradigm.val_prompts=[a handwritten 1 moving down]",
        "~logger",
        f"+callbacks.trace={trace_cfg}",
    ]


def train(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "experiments.train", *args], cwd=REPO, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(process: subprocess.Popen) -> None:
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output[-4000:]


def rows(trace: Path) -> dict[int, dict]:
    return {row["step"]: row for row in map(json.loads, trace.read_text().splitlines())}


def weights(path: Path) -> dict[str, torch.Tensor]:
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    return checkpoint["state_dict"] | {f"raw.{k}": v for k, v in checkpoint["current_model_state"].items()}


def test_kill_9_between_checkpoints_then_resume_continues_bitwise(digits_data_root: Path, tmp_path: Path) -> None:
    kill_after = random.choice([4, 5])  # checkpoints at 3 and 6: killed in between
    full = train(*overrides(digits_data_root, tmp_path, tmp_path / "full.jsonl"), "run_id=full")
    killed = train(*overrides(digits_data_root, tmp_path, tmp_path / "killed.jsonl", kill_after), "run_id=killed")
    deadline = time.monotonic() + 240
    while kill_after not in (rows(tmp_path / "killed.jsonl") if (tmp_path / "killed.jsonl").exists() else {}):
        assert killed.poll() is None and time.monotonic() < deadline, killed.communicate()[0][-4000:]
        time.sleep(0.2)
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    last = torch.load(tmp_path / "killed" / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert last["global_step"] == 3, f"killed after step {kill_after}"

    resumed = train(f"runs_dir={tmp_path}", "resume=killed", f"callbacks.trace.path={tmp_path / 'resumed.jsonl'}",
                    "callbacks.trace.pause_after=null")
    finish(full)
    finish(resumed)
    expected, got = rows(tmp_path / "full.jsonl"), rows(tmp_path / "resumed.jsonl")
    assert sorted(got) == [4, 5, 6, 7, 8]
    for step in got:  # same clips in the same order, bitwise-equal losses (CPU is deterministic here)
        assert got[step]["keys"] == expected[step]["keys"], f"step {step} (killed after {kill_after})"
        assert got[step]["loss"] == expected[step]["loss"], f"step {step} (killed after {kill_after})"
    assert got[7]["epoch"] == 1  # the resumed run crossed into the next epoch at the same step
    ours = weights(tmp_path / "killed" / "checkpoints" / "last.ckpt")  # the resumed run's
    reference = weights(tmp_path / "full" / "checkpoints" / "last.ckpt")
    assert set(ours) == set(reference)
    for name, tensor in reference.items():  # EMA and raw weights, bitwise
        assert torch.equal(ours[name], tensor), name


def test_sigterm_saves_a_checkpoint_exits_cleanly_and_the_run_resumes(digits_data_root: Path, tmp_path: Path) -> None:
    args = [*overrides(digits_data_root, tmp_path, tmp_path / "trace.jsonl", pause_after=3), "data.num_workers=0",
            "trainer.limit_val_batches=0", "callbacks.checkpoint.every_n_train_steps=2", "run_id=pre"]
    run = train(*args)
    deadline = time.monotonic() + 240
    while 3 not in (rows(tmp_path / "trace.jsonl") if (tmp_path / "trace.jsonl").exists() else {}):
        assert run.poll() is None and time.monotonic() < deadline, run.communicate()[0][-4000:]
        time.sleep(0.2)
    run.send_signal(signal.SIGTERM)
    output, _ = run.communicate(timeout=120)
    assert run.returncode == 0, output[-4000:]
    assert "continue with: effvid-train resume=pre" in output
    last = torch.load(tmp_path / "pre" / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert last["global_step"] == 3  # saved on the signal, not the periodic one at step 2
    assert json.loads((tmp_path / "pre" / "run.json").read_text())["status"] == "interrupted"
    finish(train(f"runs_dir={tmp_path}", "resume=pre", "callbacks.trace.pause_after=null", "trainer.max_steps=5"))
    assert [r["step"] for r in map(json.loads, (tmp_path / "trace.jsonl").read_text().splitlines())] == [1, 2, 3, 4, 5]


def test_sigusr1_asks_lightning_to_stop_like_sigterm() -> None:
    # SLURM's pre-emption warning; outside SLURM's auto-requeue it takes SIGTERM's path above.
    from types import SimpleNamespace

    from experiments.run_callbacks import PreemptionCheckpoint

    trainer = SimpleNamespace(_signal_connector=SimpleNamespace(received_sigterm=False))
    previous = signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    try:
        PreemptionCheckpoint("ckpts", "run").on_train_start(trainer, None)
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.05)
        assert trainer._signal_connector.received_sigterm
    finally:
        signal.signal(signal.SIGUSR1, previous)


KILL_DURING_SAVE = """
import os, sys, torch
from experiments.checkpoints import AtomicCheckpointIO
io, path = AtomicCheckpointIO(), sys.argv[1]
io.save_checkpoint({"global_step": 1, "w": torch.arange(1000.0)}, path)

def dying_save(obj, handle):
    handle.write(b"PK" + bytes(5000))  # half a checkpoint on disk, then the process dies
    handle.flush()
    os.kill(os.getpid(), 9)

torch.save = dying_save
io.save_checkpoint({"global_step": 2, "w": torch.zeros(1000)}, path)
"""


def test_kill_during_checkpoint_save_leaves_the_previous_checkpoint_loadable(tmp_path: Path) -> None:
    path = tmp_path / "checkpoints" / "last.ckpt"
    result = subprocess.run([sys.executable, "-c", KILL_DURING_SAVE, str(path)], cwd=REPO, env=ENV,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    assert list(path.parent.glob(".last.ckpt.tmp-*"))  # the interrupted write went to a temp file
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["global_step"] == 1 and torch.equal(checkpoint["w"], torch.arange(1000.0))


def test_validation_does_not_shift_the_training_random_stream() -> None:
    from types import SimpleNamespace

    from experiments.run_callbacks import RNGStateKeeper

    keeper, trainer = RNGStateKeeper(), SimpleNamespace()
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    keeper.on_validation_start(trainer, None)
    torch.rand(100)  # whatever validation draws
    keeper.on_validation_end(trainer, None)
    assert torch.equal(torch.rand(3), expected)
