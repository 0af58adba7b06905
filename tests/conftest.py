"""Fixtures shared across test files: tiny moving-digit shards made with the real data tools,
and the overrides that shrink the quickstart experiment to a few seconds (debug=tiny)."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(scope="session", autouse=True)
def metric_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A temporary `$EFFVID_CACHE` (for this process and the CLIs tests start) holding a video
    classifier fit in seconds: every validation on digit prompts reports `video_fd`, and the
    full classifier (a minute or more to fit) has no place in a test or in the user's cache."""
    import torch

    from lit_models.video_classifier import DigitVideoClassifier, cache_path

    cache = tmp_path_factory.mktemp("effvid_cache")
    os.environ["EFFVID_CACHE"] = str(cache)
    torch.manual_seed(0)
    classifier = DigitVideoClassifier()
    classifier.fit(num_clips=256, epochs=2, test_clips=16)
    classifier.save(cache_path())
    return cache


@pytest.fixture(scope="session")
def digits_data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`ROOT/digits/shards/{train,val}` as the digits data config expects, 24 + 8 clips."""
    from data_tools.digits import write_digit_videos
    from data_tools.shards import shard_videos

    root = tmp_path_factory.mktemp("data")
    for split, count, shard_size in (("train", 24, 12), ("val", 8, 4)):
        videos = root / "digits" / "videos" / split
        write_digit_videos(videos, count, seed=0, split=split)
        shard_videos(videos, root / "digits" / "shards" / split, shard_size=shard_size, workers=1, progress=False)
    return root


@pytest.fixture(scope="session")
def tiny_pipeline_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny random diffusers pipeline folders of every supported family (`tests/tiny_pipelines.py`),
    plus an AnimateDiff `motion_adapter` for the SD folder."""
    from tests.tiny_pipelines import FOLDER_WRITERS, write_motion_adapter

    root = tmp_path_factory.mktemp("pipelines")
    folders = {name: write(root / name) for name, write in FOLDER_WRITERS.items()}
    folders["motion_adapter"] = write_motion_adapter(root / "motion_adapter")
    return folders


@pytest.fixture(scope="session")
def folders(tiny_pipeline_folders: dict[str, Path]) -> dict[str, Path]:
    """`tiny_pipeline_folders` by the short name the pretrained-bundle tests use."""
    return tiny_pipeline_folders


def tiny_overrides(data_root: Path, runs_dir: Path, max_steps: int = 4, debug: str = "tiny") -> list[str]:
    """The quickstart experiment at test size for `max_steps` steps: experiments/conf/debug/tiny.yaml,
    or `debug="tiny_latent"` for latent diffusion with the digits VAE."""
    return [
        "experiment=digits_quickstart",  # first: test_scale_configs drops it
        f"debug={debug}",
        f"data_root={data_root}",
        f"runs_dir={runs_dir}",
        f"trainer.max_steps={max_steps}",
    ]


def compose_config(overrides: list[str], config_name: str = "train"):
    """A composed experiments/conf config (`train` or `sample`), as the CLIs would build it."""
    from hydra import compose, initialize_config_module

    with initialize_config_module(version_base="1.3", config_module="experiments.conf"):
        return compose(config_name, overrides=overrides)


def cli(module: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """`python -m module args`, run in this process (the CLIs' own entry points; no interpreter
    start-up per command): its exit status and output."""
    import importlib

    main = importlib.import_module(module).main
    stdout, stderr = io.StringIO(), io.StringIO()
    argv = sys.argv
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            if module == "experiments.runs":
                code = main(list(args))
            else:
                sys.argv = [module, *args]
                main()
                code = 0
    except SystemExit as stop:  # a message instead of a number: printed to stderr, status 1
        code = stop.code if isinstance(stop.code, int) or stop.code is None else 1
        if not isinstance(stop.code, int) and stop.code is not None:
            stderr.write(f"{stop.code}\n")
    finally:
        sys.argv = argv
    result = subprocess.CompletedProcess([module, *args], code or 0, stdout.getvalue(), stderr.getvalue())
    if check and result.returncode != 0:
        raise AssertionError(f"{module} {args} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result
