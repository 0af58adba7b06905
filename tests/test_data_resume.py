"""The datamodule's position survives a checkpoint: a fresh datamodule loaded with the state
after k batches yields exactly the batches the first one yielded after k; shards of uneven
sizes give every reader the same number of batches without repeating a sample."""

from __future__ import annotations

import warnings

import pytest
import torch

from datamodules import VideoShardDataModule
from datamodules.shard_readers import deal_shards
from tests.test_video_datamodule import write_shards

OPTIONS = dict(batch_size=2, num_frames=2, frame_stride=1, size=8, shuffle_buffer=4, seed=3)


def consume(dm: VideoShardDataModule, loader, limit: int | None = None) -> list[dict]:
    """Batches as the trainer sees them (positions taken off by the datamodule's hook)."""
    out = []
    for batch in loader:
        out.append(dm.on_before_batch_transfer(batch, 0))
        if limit is not None and len(out) == limit:
            break
    return out


@pytest.mark.parametrize("num_workers,stop_after", [(0, 3), (2, 3), (2, 4)])
def test_datamodule_state_after_k_batches_resumes_the_same_stream(tmp_path, num_workers, stop_after):
    write_shards(tmp_path / "shards", num_shards=3, per_shard=6, corrupt={"0010002"})
    options = OPTIONS | {"num_workers": num_workers}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first = VideoShardDataModule(tmp_path / "shards", **options)
        first.setup("fit")
        reference = consume(first, first.train_dataloader())
        interrupted = VideoShardDataModule(tmp_path / "shards", **options)
        interrupted.setup("fit")
        consume(interrupted, interrupted.train_dataloader(), limit=stop_after)
        state = interrupted.state_dict()
        resumed = VideoShardDataModule(tmp_path / "shards", **options)
        resumed.setup("fit")
        resumed.load_state_dict(state)
        rest = consume(resumed, resumed.train_dataloader())
    assert len(reference) > stop_after
    assert [b["key"] for b in rest] == [b["key"] for b in reference[stop_after:]]
    for ours, theirs in zip(rest, reference[stop_after:]):
        assert torch.equal(ours["frames"], theirs["frames"])  # same random start frames too


def test_uneven_shards_are_dealt_to_balance_readers():
    sizes = {"a": 10, "b": 10, "c": 10, "d": 3}
    for epoch in range(4):
        dealt = deal_shards(list(sizes), sizes, 2, seed=0, epoch=epoch)
        assert sorted(u for mine in dealt for u in mine) == sorted(sizes)
        assert sorted(sum(sizes[u] for u in mine) for mine in dealt) == [13, 20]
