"""Aspect-ratio and length buckets: which bucket a clip goes to, bad tables, and bucketed
training batches (one shape per batch, no clip upscaled, batch shares as the table's weights,
exact resume, equal batches on every rank)."""

from __future__ import annotations

import json
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch
import webdataset as wds

from data_tools.video_io import encode_mp4
from datamodules import VideoShardDataModule
from datamodules import shard_datamodule
from datamodules.buckets import BucketTable, ClipSize, size_from_meta
from tests.test_data_resume import consume
from tests.test_video_datamodule import indexed_clip

TABLE = [
    {"frames": 4, "height": 16, "width": 16, "batch_size": 2, "weight": 5},
    {"frames": 4, "height": 16, "width": 28, "batch_size": 2, "weight": 3},
    {"frames": 8, "height": 16, "width": 28, "batch_size": 1, "weight": 2},
]
# (frames, height, width) of the clips written, and the bucket each goes to (None: fits none).
CLIPS = {"square": ((6, 32, 32), 0), "wide": ((6, 32, 56), 1), "wide_long": ((10, 32, 56), 2),
         "small": ((6, 12, 12), None), "short": ((3, 32, 32), None)}


def bucket_shards(shard_dir: Path, num_shards: int = 2, per_kind: int = 3) -> None:
    """Shards mixing every kind of `CLIPS`; the wide clips' json has no size (read from the mp4 header)."""
    shard_dir.mkdir(parents=True)
    for s in range(num_shards):
        with wds.TarWriter(str(shard_dir / f"shard-{s:06d}.tar")) as sink:
            for kind, ((frames, height, width), _) in CLIPS.items():
                for j in range(per_kind):
                    meta = {"kind": kind} if kind == "wide" else {"kind": kind, "width": width, "height": height,
                                                                   "num_frames": frames}
                    sink.write({"__key__": f"{kind}-{s}-{j}", "txt": f"a {kind} clip".encode(),
                                "mp4": encode_mp4(indexed_clip(s * 10 + j, frames, height, width)),
                                "json": json.dumps(meta).encode()})


def datamodule(shards: Path, **options) -> VideoShardDataModule:
    defaults = dict(buckets=TABLE, batch_size=2, num_workers=0, num_frames=4, frame_stride=1, size=16,
                    shuffle_buffer=4, seed=1, decoded_cache_mb=16)
    dm = VideoShardDataModule(shards, **(defaults | options))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dm.setup("fit")
    return dm


def test_a_clip_goes_to_the_largest_bucket_of_its_aspect_that_needs_no_upscaling():
    table = BucketTable(TABLE + [{"frames": 4, "height": 32, "width": 32, "batch_size": 1, "weight": 1}])
    assert table.assign(ClipSize(width=32, height=32, frames=6)) == 3  # the larger square
    assert table.assign(ClipSize(width=30, height=30, frames=6)) == 0  # 32x32 would upscale it
    assert table.assign(ClipSize(width=56, height=32, frames=6)) == 1  # wide, not the larger square
    assert table.assign(ClipSize(width=56, height=32, frames=9)) == 2  # long enough for 8 frames
    assert table.assign(ClipSize(width=16, height=40, frames=6)) == 0  # portrait: only the square covers it
    assert table.assign(ClipSize(width=12, height=12, frames=6)) is None
    assert table.assign(ClipSize(width=32, height=32, frames=3)) is None
    assert BucketTable(TABLE, max_upscale=1.5).assign(ClipSize(width=12, height=12, frames=6)) == 0
    assert BucketTable(TABLE, stride=2).assign(ClipSize(width=56, height=32, frames=9)) == 1  # 8 at stride 2 need 15


@pytest.mark.parametrize("table,max_upscale,message", [
    ([], 1.0, "data.buckets is empty"),
    ([TABLE[0], dict(TABLE[0], batch_size=4)], 1.0, r"data.buckets\[1\] and data.buckets\[0\] are the same shape 4x16x16"),
    (TABLE, 3.0, r"data.max_upscale=3.0 is outside \[1, 2\]"),
    ([TABLE[0], {k: v for k, v in TABLE[1].items() if k != "weight"}], 1.0, r"data.buckets\[1\] have no weight"),
    ([dict(TABLE[0], height=0)], 1.0, r"data.buckets\[0\].height must be a positive integer"),
    ([dict(TABLE[0], fps=8)], 1.0, r"data.buckets\[0\] has unknown keys \['fps'\]"),
])
def test_a_bad_bucket_table_is_one_clear_error(table, max_upscale, message):
    with pytest.raises(ValueError, match=message):
        BucketTable(table, max_upscale)


def test_clip_size_is_read_from_effvid_and_video2dataset_json():
    assert size_from_meta({"width": 64, "height": 36, "num_frames": 9}) == ClipSize(64, 36, 9)
    v2d = {"video_metadata": {"streams": [{"codec_type": "audio"}, {"codec_type": "video", "width": 640,
                                                                    "height": 360, "nb_frames": "120"}]}}
    assert size_from_meta(v2d) == ClipSize(640, 360, 120)
    assert size_from_meta({"width": 64, "height": 36}) is None


def test_bucketed_batches_have_one_shape_and_never_upscale_and_unfit_clips_are_named(tmp_path):
    bucket_shards(tmp_path / "shards")
    with pytest.warns(UserWarning, match=r"12 training clips fit no bucket .* shard-00000\d.tar/s"):
        dm = VideoShardDataModule(tmp_path / "shards", buckets=TABLE, num_workers=0, frame_stride=1)
        dm.setup("fit")
    assert len(dm.unfit_clips) == 12
    assert any("small-0-0: 6 frames of 12x12 fit no bucket" in clip for clip in dm.unfit_clips)
    batches = list(dm.train_dataloader())
    assert batches
    for batch in batches:
        kinds = {key.split("-")[0] for key in batch["key"]}
        assert len(kinds) == 1, batch["key"]
        (frames, height, width), bucket = CLIPS[kinds.pop()]
        expected = TABLE[bucket]
        assert batch["frames"].shape == (expected["batch_size"], expected["frames"], expected["height"],
                                         expected["width"], 3)  # (B, F, H, W, 3) uint8, as decoded
        assert expected["height"] <= height and expected["width"] <= width  # cropped, never upscaled


def test_batch_shares_follow_the_weights_within_one_batch_over_1000_batches(tmp_path):
    bucket_shards(tmp_path / "shards", per_kind=2)
    dm = datamodule(tmp_path / "shards", epoch_samples=1800)  # mean batch 0.5*2 + 0.3*2 + 0.2*1 = 1.8
    shapes = Counter(tuple(batch["frames"].shape[1:4]) for batch in dm.train_dataloader())
    assert sum(shapes.values()) == 1000
    for entry in TABLE:
        share = shapes[(entry["frames"], entry["height"], entry["width"])] / 1000
        assert abs(share - entry["weight"] / 10) <= 0.001


def test_without_weights_batch_shares_follow_the_clips(tmp_path):
    bucket_shards(tmp_path / "shards", per_kind=4)
    unweighted = [{k: v for k, v in entry.items() if k != "weight"} for entry in TABLE]
    dm = datamodule(tmp_path / "shards", buckets=unweighted)
    shapes = Counter(tuple(batch["frames"].shape[1:4]) for batch in dm.train_dataloader())
    # 8 clips per bucket: 4, 4 and 8 batches (batch sizes 2, 2, 1)
    assert [shapes[(e["frames"], e["height"], e["width"])] for e in TABLE] == [4, 4, 8]


@pytest.mark.parametrize("num_workers,stop_after", [(0, 5), (2, 3)])
def test_a_bucketed_stream_resumes_with_the_same_batches(tmp_path, num_workers, stop_after):
    bucket_shards(tmp_path / "shards")
    options = dict(num_workers=num_workers, decoded_cache_mb=0)
    reference = consume(first := datamodule(tmp_path / "shards", **options), first.train_dataloader())
    interrupted = datamodule(tmp_path / "shards", **options)
    consume(interrupted, interrupted.train_dataloader(), limit=stop_after)
    resumed = datamodule(tmp_path / "shards", **options)
    resumed.load_state_dict(interrupted.state_dict())
    rest = consume(resumed, resumed.train_dataloader())
    assert len(reference) > stop_after + 2
    assert [b["key"] for b in rest] == [b["key"] for b in reference[stop_after:]]
    for ours, theirs in zip(rest, reference[stop_after:]):
        assert torch.equal(ours["frames"], theirs["frames"])


def test_every_rank_gets_the_same_number_of_bucketed_batches(tmp_path, monkeypatch):
    bucket_shards(tmp_path / "shards", num_shards=3)
    counts = []
    for rank in range(2):
        monkeypatch.setattr(shard_datamodule, "rank_and_world_size", lambda rank=rank: (rank, 2))
        dm = datamodule(tmp_path / "shards")
        counts.append(sum(1 for _ in dm.train_dataloader()))
    assert counts[0] == counts[1] > 0


def test_a_weighted_bucket_no_clip_goes_to_is_refused_at_setup(tmp_path):
    bucket_shards(tmp_path / "shards", num_shards=1, per_kind=1)
    table = TABLE + [{"frames": 4, "height": 64, "width": 64, "batch_size": 1, "weight": 1}]
    with pytest.raises(ValueError, match=r"data.buckets \['4x64x64'\] have a weight but no training clip"):
        datamodule(tmp_path / "shards", buckets=table)


def test_inspect_shows_how_a_folder_falls_into_a_bucket_table(tmp_path, capsys):
    from data_tools.cli import main

    bucket_shards(tmp_path / "shards", num_shards=1, per_kind=2)
    config = tmp_path / "data.yaml"
    config.write_text(json.dumps({"buckets": TABLE, "frame_stride": 1}))  # JSON is YAML
    assert main(["inspect", str(tmp_path / "shards"), "--buckets", str(config)]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split() for line in lines[2:6]}
    assert [rows[name][2] for name in ("4x16x16", "4x16x28", "8x16x28")] == ["2", "2", "2"]
    assert rows["fit"][2] == "4"  # "fit none": the small and the short clips
    assert any("fits no bucket: shard-000000.tar/short-0-1: 3 frames of 32x32" in line for line in lines)
    config.write_text(json.dumps({"buckets": [TABLE[0], TABLE[0]]}))
    assert main(["inspect", str(tmp_path / "shards"), "--buckets", str(config)]) == 2
    assert "are the same shape 4x16x16" in capsys.readouterr().err


def test_a_clip_without_a_size_in_its_json_or_mp4_header_is_named_not_bucketed(tmp_path):
    from datamodules.bucket_batches import scan_shard

    bucket_shards(tmp_path / "shards", num_shards=1, per_kind=1)
    with wds.TarWriter(str(tmp_path / "shards" / "shard-000001.tar")) as sink:
        sink.write({"__key__": "nosize", "mp4": b"\x00\x00\x00 not an mp4" * 8, "txt": b"a clip", "json": b"{}"})
    scan = scan_shard(str(tmp_path / "shards" / "shard-000001.tar"), BucketTable(TABLE, stride=1))
    assert scan.counts == [0, 0, 0]
    assert scan.unfit == ["shard-000001.tar/nosize: no width/height/frames in its json or mp4 header"]
