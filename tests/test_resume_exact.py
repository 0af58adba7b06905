"""Exact resume: a training run killed with kill -9 between two checkpoints, or stopped by a
signal to its whole process group (loader workers included), then resumed with
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

import pytest
import torch

from tests.conftest import tiny_overrides

REPO = Path(__file__).resolve().parents[1]
ENV = os.environ | {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "PYTHONPATH": str(REPO)}
# A resumed run's config.yaml is an artifact: the test's own callback must be trusted by name.
TRUST = "trust_targets=[tests.batch_trace.BatchTrace]"


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
    """effvid-train in a process group of its own (a signal to the group reaches its workers too)."""
    return subprocess.Popen([sys.executable, "-m", "experiments.train", *args], cwd=REPO, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def wait_for_step(process: subprocess.Popen, trace: Path, step: int) -> None:
    deadline = time.monotonic() + 240
    while step not in (rows(trace) if trace.exists() else {}):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[0][-4000:]
        time.sleep(0.2)


def finish(process: subprocess.Popen) -> None:
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output[-4000:]


def rows(trace: Path) -> dict[int, dict]:
    return {row["step"]: row for row in map(json.loads, trace.read_text().splitlines())}


def weights(path: Path) -> dict[str, torch.Tensor]:
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    return checkpoint["state_dict"] | {f"raw.{k}": v for k, v in checkpoint["current_model_state"].items()}


@pytest.mark.slow
def test_kill_9_or_a_signal_to_the_group_then_resume_continues_bitwise(digits_data_root: Path, tmp_path: Path) -> None:
    """Ctrl-C in a terminal signals the whole group, loader workers included: the run saves the
    step it finished, exits 130 with status interrupted, and resumes like a kill -9'd run."""
    kill_after = random.choice([4, 5])  # checkpoints at 3 and 6: killed in between
    stop_after = 9 - kill_after  # the other one: Ctrl-C to the whole group, 2 loader workers in it
    full = train(*overrides(digits_data_root, tmp_path, tmp_path / "full.jsonl"), "run_id=full")
    killed = train(*overrides(digits_data_root, tmp_path, tmp_path / "killed.jsonl", kill_after), "run_id=killed")
    stopped = train(*overrides(digits_data_root, tmp_path, tmp_path / "stopped.jsonl", stop_after), "run_id=stopped")
    wait_for_step(killed, tmp_path / "killed.jsonl", kill_after)
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    last = torch.load(tmp_path / "killed" / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert last["global_step"] == 3, f"killed after step {kill_after}"

    wait_for_step(stopped, tmp_path / "stopped.jsonl", stop_after)
    os.killpg(stopped.pid, signal.SIGINT)
    output, _ = stopped.communicate(timeout=120)
    assert stopped.returncode == 130, output[-4000:]
    assert "killed by signal" not in output and "Traceback" not in output, output[-4000:]
    assert f"stopped by SIGINT at step {stop_after}; continue with: effvid-train resume=stopped" in output
    assert json.loads((tmp_path / "stopped" / "run.json").read_text())["status"] == "interrupted"
    last = torch.load(tmp_path / "stopped" / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert last["global_step"] == stop_after  # the last finished step, not the periodic save at 3

    resumed = {
        name: train(f"runs_dir={tmp_path}", f"resume={name}", f"callbacks.trace.path={tmp_path / f'{name}-resumed.jsonl'}",
                    "callbacks.trace.pause_after=null", TRUST)
        for name in ("killed", "stopped")
    }
    finish(full)
    for process in resumed.values():
        finish(process)
    expected = rows(tmp_path / "full.jsonl")
    reference = weights(tmp_path / "full" / "checkpoints" / "last.ckpt")
    # The periodic save at step 6 overwrote the last.ckpt the signal had written: one last.ckpt, the newest.
    assert sorted(p.name for p in (tmp_path / "stopped" / "checkpoints").iterdir()) == [
        "last.ckpt", "step=000003.ckpt", "step=000006.ckpt", "step=000008.ckpt"]
    for name, first in (("killed", 4), ("stopped", stop_after + 1)):
        got = rows(tmp_path / f"{name}-resumed.jsonl")
        assert sorted(got) == list(range(first, 9)), name
        for step in got:  # same clips in the same order, bitwise-equal losses (CPU is deterministic here)
            assert got[step]["keys"] == expected[step]["keys"], f"{name}: step {step} (kill {kill_after})"
            assert got[step]["loss"] == expected[step]["loss"], f"{name}: step {step} (kill {kill_after})"
        assert got[7]["epoch"] == 1  # the resumed run crossed into the next epoch at the same step
        ours = weights(tmp_path / name / "checkpoints" / "last.ckpt")  # the resumed run's
        assert set(ours) == set(reference)
        for key, tensor in reference.items():  # EMA and raw weights, bitwise
            assert torch.equal(ours[key], tensor), f"{name}: {key}"


@pytest.mark.parametrize("signum, exit_code", [(signal.SIGUSR1, 0), (signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_stop_signal_asks_lightning_to_stop_and_sets_the_exit_code(signum: int, exit_code: int) -> None:
    # SIGUSR1 is SLURM's pre-emption warning (exit 0, so a requeued job is not marked failed);
    # outside SLURM's auto-requeue it takes the same path as the others.
    from types import SimpleNamespace

    from experiments.run_callbacks import PreemptionCheckpoint
    from experiments.train import stopped_by_signal

    callback = PreemptionCheckpoint("ckpts", "run")
    trainer = SimpleNamespace(_signal_connector=SimpleNamespace(received_sigterm=False), callbacks=[callback],
                              global_step=7)
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    try:
        callback.on_train_start(trainer, None)
        os.kill(os.getpid(), signum)
        time.sleep(0.05)
        assert trainer._signal_connector.received_sigterm and callback.signal_received == signum
        assert stopped_by_signal(trainer, "r", owner=True) == exit_code
        assert stopped_by_signal(trainer, "r", owner=False) == 0  # other ranks: Lightning's launcher reads non-zero as a crash
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


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


@pytest.mark.slow
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
