"""Every command of the README's command table and of its "From the laptop to a cluster" table
runs as written, with tiny sizes added, so a documented command cannot break unseen. The
commands are read from README.md itself: a new row fails here until it is run or given a
reason it cannot run on a CPU. The laptop DDP command goes through effvid-train (2 gloo
ranks: trains, checkpoints once, then `effvid-train resume=RUN_ID` continues it on 2 ranks)."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from data_tools import cli as data_cli
from experiments import runs as runs_cli
from experiments import sample as sample_cli
from experiments import train as train_cli
from tests.conftest import tiny_overrides
from tests.test_encode import vae_weights

REPO = Path(__file__).resolve().parents[1]

NOT_HERE = {
    "gpu": "needs a GPU",
    "slurm": "needs a SLURM cluster",
    "pip": "installs an optional extra from the network",
    "online": "reads a W&B server",
    "compile": "torch.compile: GPU runs (the switch is tested in test_scale_configs without compiling)",
    "pretrained": "run as written on tiny pipeline folders by test_readme_pretrained.py (the README's "
                  "pretrained-commands block holds the same command)",
}
# Each backticked command of the two tables, in README order: run here (the step that does),
# or why a CPU cannot run it.
COMMANDS = {
    "effvid-data digits --out DIR --num-videos N --num-val M": "run",
    "effvid-data shard --input DIR --out SHARD_DIR": "run",
    "effvid-data curate --input PATH_OR_LIST --out SHARD_DIR [--config curation.yaml]": "run",
    "effvid-data inspect SHARD_DIR": "run",
    "effvid-data encode --input SHARD_DIR --out ENCODED_DIR OVERRIDES": "run",
    "effvid-data pairs --ckpt CKPT --prompts FILE --out PAIR_DIR": "run",
    "effvid-train experiment=digits_quickstart": "run",
    "effvid-train experiment=cogvideox_lora pretrained=PATH_OR_HUB_ID": NOT_HERE["pretrained"],
    "effvid-train resume=RUN_ID": "run",
    "effvid-sample run=RUN_ID prompts='[a handwritten 3 moving up]' sampler=dpmpp steps=20 guidance=3": "run",
    "effvid-runs list": "run",
    "effvid-runs compare RUN_A RUN_B": "run",
    "effvid-export run=RUN_ID out=DIR": NOT_HERE["pretrained"],
    "effvid-train experiment=digits_quickstart trainer=ddp_cpu data.num_workers=1": "run",
    "effvid-train experiment=... trainer=ddp +trainer/precision=bf16": NOT_HERE["gpu"],
    "trainer=fsdp": NOT_HERE["gpu"],
    "trainer=deepspeed": NOT_HERE["gpu"],
    "pip install 'effvid[deepspeed]'": NOT_HERE["pip"],
    "model.gradient_checkpointing=true": "run",  # added to the sweep below
    "compile=true": NOT_HERE["compile"],
    "effvid-data encode --input SHARDS --out ENCODED OVERRIDES": "run",
    "effvid-train OVERRIDES data=digits_encoded": "run",
    "pip install 'effvid[slurm]'": NOT_HERE["pip"],
    "effvid-train -m hydra/launcher=slurm trainer=slurm hydra.launcher.nodes=N experiment=...": NOT_HERE["slurm"],
    "effvid-train -m paradigm.optimizer.lr=1e-3,2e-3": "run",
    "hydra/launcher=local": "run",  # the sweep runs through it
    "effvid-runs compare --group sweep-RUN_ID --x both": "run",
    "--online ENTITY/PROJECT": NOT_HERE["online"],
}


def table_commands(heading: str, column: int) -> list[str]:
    """The backticked commands in column `column` of the first table under `heading`."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")][2:]  # past header and rule
    cells = [re.split(r"(?<!\\)\|", row)[1 + column] for row in rows]
    return [command for cell in cells for command in re.findall(r"`([^`]+)`", cell)]


def readme_commands() -> list[str]:
    return table_commands("Commands", 0) + table_commands("From the laptop to a cluster", 1)


def argv(command: str, **placeholders: str | list[str]) -> list[str]:
    """The command's words after the program, optional [...] parts dropped, placeholders filled."""
    out: list[str] = []
    for word in shlex.split(re.sub(r"\s*\[[^\]]*\]", "", command))[1:]:
        if word in placeholders:
            value = placeholders[word]
            out.extend(value if isinstance(value, list) else [value])
            continue
        for name, value in placeholders.items():  # inside a word: resume=RUN_ID, sweep-RUN_ID
            if isinstance(value, str):
                word = re.sub(rf"(?<=[=-]){name}\b", value, word)
        out.append(word)
    return out


def tiny_for(words: list[str], tiny: list[str]) -> list[str]:
    """The tiny overrides a command does not set itself."""
    own = {word.split("=", 1)[0].lstrip("+") for word in words if "=" in word}
    return [o for o in tiny if o.split("=", 1)[0].lstrip("+") not in own]


def run_cli(program: str, words: list[str], capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> str:
    """One command, in this process; its output (the command is named when it fails)."""
    if program == "effvid-data":
        code = data_cli.main(words)
    elif program == "effvid-runs":
        code = runs_cli.main(words)
    else:
        main = {"effvid-train": train_cli.main, "effvid-sample": sample_cli.main}[program]
        monkeypatch.setattr(sys, "argv", [program, *words])
        try:
            main()
            code = 0
        except SystemExit as stop:
            code = stop.code
    out = capsys.readouterr()
    assert code in (0, None), f"{program} {shlex.join(words)} -> {code}\n{out.out[-3000:]}\n{out.err[-3000:]}"
    return out.out


def start(words: list[str]) -> subprocess.Popen:
    env = os.environ | {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "experiments.train", *words], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(process: subprocess.Popen, what: str) -> str:
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, f"{what} -> {process.returncode}\n{output[-4000:]}"
    return output


def test_the_readme_lists_exactly_the_commands_this_test_knows():
    assert readme_commands() == list(COMMANDS), "a README command changed: run it here or say why a CPU cannot"


@pytest.mark.slow
def test_every_readme_command_a_cpu_can_run_runs_as_written(tmp_path, capsys, monkeypatch):
    c = {command: command for command in COMMANDS}  # spelled as in the README
    root, runs = tmp_path / "data", tmp_path / "runs"
    videos, shards = root / "digits" / "videos", root / "digits" / "shards"
    monkeypatch.setenv("EFFVID_RUNS", str(runs))
    monkeypatch.setenv("EFFVID_DATA", str(root))
    tiny = tiny_overrides(root, runs, max_steps=2)  # the quickstart experiment, a tiny net, 2 steps

    def run(command: str, *extra: str, **placeholders: str | list[str]) -> str:
        words = argv(command, **placeholders)
        if command.startswith("effvid-train"):
            extra = (*tiny_for(words, tiny), *extra)
        return run_cli(command.split()[0], [*words, *extra], capsys, monkeypatch)

    run(c["effvid-data digits --out DIR --num-videos N --num-val M"], "--workers", "1", DIR=str(videos), N="8", M="4")
    for split, size in (("train", "4"), ("val", "2")):  # two shards per split: one per DDP rank
        run(c["effvid-data shard --input DIR --out SHARD_DIR"], "--shard-size", size, "--workers", "1",
            DIR=str(videos / split), SHARD_DIR=str(shards / split))

    # The laptop DDP command on 2 gloo ranks, in the background while the rest runs here.
    ddp = c["effvid-train experiment=digits_quickstart trainer=ddp_cpu data.num_workers=1"]
    ddp_run = start([*argv(ddp), *tiny_for(argv(ddp), tiny), "run_id=ddp"])
    sweep = c["effvid-train -m paradigm.optimizer.lr=1e-3,2e-3"]
    sweep_words = [*argv(sweep), c["hydra/launcher=local"], c["model.gradient_checkpointing=true"]]
    sweep_run = start([*sweep_words, *tiny_for(sweep_words, tiny), "trainer.limit_val_batches=0", "run_id=sw"])

    run(c["effvid-train experiment=digits_quickstart"], "run_id=a")
    assert json.loads((runs / "a" / "run.json").read_text())["status"] == "completed"
    out = run(c["effvid-sample run=RUN_ID prompts='[a handwritten 3 moving up]' sampler=dpmpp steps=20 guidance=3"],
              f"out={tmp_path / 'samples'}", RUN_ID="a")
    assert "sampler=dpmpp steps=20 guidance=3" in out and (tmp_path / "samples" / "grid.png").exists()
    (tmp_path / "prompts.txt").write_text("a handwritten 3 moving up\na handwritten 7 moving left\n")
    run(c["effvid-data pairs --ckpt CKPT --prompts FILE --out PAIR_DIR"], "--per-prompt", "2", "--steps", "2",
        CKPT=str(runs / "a" / "checkpoints" / "last.ckpt"), FILE=str(tmp_path / "prompts.txt"),
        PAIR_DIR=str(tmp_path / "pairs"))
    assert (tmp_path / "pairs" / "_stats.json").exists()
    curate = c["effvid-data curate --input PATH_OR_LIST --out SHARD_DIR [--config curation.yaml]"]
    run(curate, "--workers", "1", "--no-progress", PATH_OR_LIST=str(videos / "train"), SHARD_DIR=str(tmp_path / "curated"))
    assert json.loads((tmp_path / "curated" / "_stats.json").read_text())["inputs"] == 8
    assert "samples" in run(c["effvid-data inspect SHARD_DIR"], SHARD_DIR=str(shards / "train"))

    # A latent quickstart with a frozen text tower (the README's example: experiment=magicvideo ...).
    overrides = [*tiny_overrides(root, runs, max_steps=2, debug="tiny_latent"),
                 f"paradigm.autoencoder.weights={vae_weights(tmp_path / 'vae.ckpt', 0)}", "paradigm.text_encoder.trainable=false"]
    encoded = root / "digits" / "encoded"
    run(c["effvid-data encode --input SHARD_DIR --out ENCODED_DIR OVERRIDES"],
        SHARD_DIR=str(shards / "train"), ENCODED_DIR=str(encoded / "train"), OVERRIDES=overrides)
    run(c["effvid-data encode --input SHARDS --out ENCODED OVERRIDES"],
        SHARDS=str(shards / "val"), ENCODED=str(encoded / "val"), OVERRIDES=overrides)
    run(c["effvid-train OVERRIDES data=digits_encoded"], "run_id=enc", OVERRIDES=overrides)
    assert json.loads((runs / "enc" / "run.json").read_text())["status"] == "completed"

    finish(ddp_run, ddp)
    assert sorted(p.name for p in (runs / "ddp" / "checkpoints").iterdir()) == ["last.ckpt", "step=000002.ckpt"]
    assert OmegaConf.load(runs / "ddp" / "config.yaml").trainer.devices == 2
    resume = c["effvid-train resume=RUN_ID"]
    finish(start([*argv(resume, RUN_ID="ddp"), "trainer.max_steps=4"]), resume)  # 2 ranks again, from its config
    last = torch.load(runs / "ddp" / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert last["global_step"] == 4 and json.loads((runs / "ddp" / "run.json").read_text())["status"] == "completed"

    listing = run(c["effvid-runs list"])
    assert all(run_id in listing for run_id in ("a", "ddp", "enc"))
    assert "ddp" in run(c["effvid-runs compare RUN_A RUN_B"], "--out", str(tmp_path / "cmp.png"), RUN_A="a", RUN_B="ddp")

    finish(sweep_run, sweep)
    assert (runs / "sweep-sw" / ".submitit").is_dir()  # the jobs went through submitit
    for job, lr in ((0, 1e-3), (1, 2e-3)):
        cfg = OmegaConf.load(runs / f"sw-{job}" / "config.yaml")
        assert cfg.paradigm.optimizer.lr == lr and cfg.logger.group == "sweep-sw"  # one W&B group per sweep
        assert cfg.model.gradient_checkpointing and json.loads((runs / f"sw-{job}" / "run.json").read_text())["global_step"] == 2
    compared = run(c["effvid-runs compare --group sweep-RUN_ID --x both"], "--out", str(tmp_path / "sweep.png"), RUN_ID="sw")
    assert "sw-0" in compared and "sw-1" in compared
