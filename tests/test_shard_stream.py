"""The train loader's position at the edges of an epoch: a state saved after the last batch of an
epoch resumes with the next epoch (whether or not the loader had been asked past its end yet),
a trainer's loader saves the position of the batches the trainer took, not of those fetched
ahead, and a state saved with another worker count is dropped with a warning instead of
crashing the resume."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest

from datamodules import VideoShardDataModule
from tests.test_video_datamodule import write_shards

OPTIONS = dict(batch_size=2, num_frames=2, frame_stride=1, size=8, shuffle_buffer=4, seed=3)


def datamodule(shards, num_workers: int, state: dict | None = None) -> VideoShardDataModule:
    dm = VideoShardDataModule(shards, num_workers=num_workers, **OPTIONS)
    dm.setup("fit")
    if state is not None:
        dm.load_state_dict(state)
    return dm


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("asked_past_the_end", [False, True])
def test_a_state_saved_at_the_end_of_an_epoch_resumes_with_the_next_epoch(tmp_path, num_workers, asked_past_the_end):
    write_shards(tmp_path / "shards", num_shards=2, per_shard=4)
    reference = datamodule(tmp_path / "shards", num_workers).train_dataloader()
    epochs = [[b["key"] for b in reference] for _ in range(2)]
    assert len(epochs[0]) == reference.dataset.batches_per_pass == 4 and epochs[0] != epochs[1]

    first = datamodule(tmp_path / "shards", num_workers)
    loader = first.train_dataloader()
    batches = iter(loader)
    for _ in range(loader.dataset.batches_per_pass):
        next(batches)
    if asked_past_the_end:
        assert next(batches, None) is None
    resumed = datamodule(tmp_path / "shards", num_workers, state=first.state_dict()).train_dataloader()
    assert [b["key"] for b in resumed] == epochs[1]


def test_a_state_for_another_worker_count_restarts_the_epoch_with_a_warning(tmp_path):
    write_shards(tmp_path / "shards", num_shards=2, per_shard=4)
    first = datamodule(tmp_path / "shards", 0)
    batches = iter(first.train_dataloader())
    next(batches)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        epoch = [b["key"] for b in datamodule(tmp_path / "shards", 2).train_dataloader()]
    with pytest.warns(UserWarning, match="num_workers=0; this run has 1, 2: the epoch restarts"):
        resumed = datamodule(tmp_path / "shards", 2, state=first.state_dict()).train_dataloader()
    assert [b["key"] for b in resumed] == epoch


def test_a_trainers_loader_saves_the_position_of_the_batches_taken_not_of_those_fetched_ahead(tmp_path):
    write_shards(tmp_path / "shards", num_shards=2, per_shard=4)
    keys = [b["key"] for b in datamodule(tmp_path / "shards", 2).train_dataloader()]
    first = datamodule(tmp_path / "shards", 2)
    first.trainer = trainer = SimpleNamespace(training=True, current_epoch=0)
    trainer.datamodule = first
    batches = iter(first.train_dataloader())
    first.on_before_batch_transfer(next(batches), 0)
    next(batches)  # fetched ahead (Lightning's prefetch), never taken by the trainer
    resumed = datamodule(tmp_path / "shards", 2, state=first.state_dict()).train_dataloader()
    assert [b["key"] for b in resumed] == keys[1:]
