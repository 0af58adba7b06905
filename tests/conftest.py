"""Fixtures shared across test files: tiny moving-digit shards made with the real data tools,
and the overrides that shrink the quickstart experiment to a few seconds."""

from __future__ import annotations

import os
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


def tiny_overrides(data_root: Path, runs_dir: Path, max_steps: int = 4) -> list[str]:
    """The quickstart experiment with a tiny network and a few steps, for tests."""
    return [
        "experiment=digits_quickstart",
        f"data_root={data_root}",
        f"runs_dir={runs_dir}",
        f"trainer.max_steps={max_steps}",
        "trainer.val_check_interval=2",
        "trainer.limit_val_batches=1",
        "trainer.log_every_n_steps=1",
        "trainer.enable_model_summary=false",
        "+trainer.enable_progress_bar=false",
        "callbacks.checkpoint.every_n_train_steps=2",
        "callbacks.ema.update_starting_at_step=1",
        "model.channels=[8,16,16]",
        "paradigm.text_encoder.text_cfg.width=16",
        "paradigm.text_encoder.text_cfg.layers=1",
        "paradigm.text_encoder.embed_dim=16",
        "paradigm.sample_steps=2",
        "paradigm.val_samples_per_prompt=1",
        "paradigm.lr_scheduler.num_warmup_steps=1",
        "data.batch_size=4",
        "data.val_batch_size=4",
        "data.num_workers=0",
        "data.shuffle_buffer=8",
    ]


def compose_config(overrides: list[str], config_name: str = "train"):
    """A composed experiments/conf config (`train` or `sample`), as the CLIs would build it."""
    from hydra import compose, initialize_config_module

    with initialize_config_module(version_base="1.3", config_module="experiments.conf"):
        return compose(config_name, overrides=overrides)
