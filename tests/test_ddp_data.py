"""DDP on CPU (Lightning, 2 processes, gloo) over uneven shards: every rank gets the same
number of batches in every epoch and no clip is seen twice within an epoch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import webdataset as wds

from data_tools.video_io import encode_mp4
from tests.test_video_datamodule import indexed_clip

pytestmark = pytest.mark.slow  # 2 DDP processes per test (make test-fast leaves them out)

REPO = Path(__file__).resolve().parents[1]


def uneven_shards(shard_dir: Path, sizes: list[int], bad_per_shard: int = 0) -> None:
    shard_dir.mkdir(parents=True)
    clip = encode_mp4(indexed_clip(0, num_frames=2, height=16, width=16))
    for index, size in enumerate(sizes):
        with wds.TarWriter(str(shard_dir / f"shard-{index:06d}.tar")) as sink:
            for j in range(size):
                sink.write({"__key__": f"s{index}-{j}", "mp4": clip, "txt": b"a clip", "json": b"{}"})
            for j in range(bad_per_shard):
                sink.write({"__key__": f"bad{index}-{j}", "mp4": b"not an mp4" * 20, "txt": b"a clip"})


def run_probe(shards: Path, out: Path, *buckets: str) -> None:
    out.mkdir()
    env = os.environ | {"PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, str(REPO / "tests" / "ddp_probe.py"), str(shards), str(out), "1", *buckets],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_ddp_ranks_get_equal_batches_and_no_duplicate_keys_on_uneven_shards(tmp_path: Path) -> None:
    uneven_shards(tmp_path / "shards", [10, 10, 10, 3])
    out = tmp_path / "out"
    run_probe(tmp_path / "shards", out)
    ranks = [json.loads((out / f"rank-{r}.json").read_text()) for r in range(2)]
    for epoch in ("0", "1"):
        counts = [len(rank[epoch]) for rank in ranks]
        assert counts[0] == counts[1] == 6  # loads 20 and 13 samples: 6 batches of 2 each
        seen = [k for rank in ranks for batch in rank[epoch] for k in batch]
        assert len(seen) == len(set(seen)) == 24


def test_skipped_samples_are_summed_across_ranks(tmp_path: Path) -> None:
    uneven_shards(tmp_path / "shards", [3, 3], bad_per_shard=1)  # one shard, one bad clip per rank
    out = tmp_path / "out"
    run_probe(tmp_path / "shards", out)
    skipped = [json.loads((out / f"skipped-{r}.json").read_text()) for r in range(2)]
    assert [s["local"] for s in skipped] == [2, 2]  # one bad clip per rank and epoch, 2 epochs
    assert [s["logged"] for s in skipped] == [4, 4]  # what W&B shows: the whole run's count


def test_ddp_ranks_get_equal_bucketed_batches_of_one_shape_each(tmp_path: Path) -> None:
    from tests.test_buckets import CLIPS, TABLE, bucket_shards

    bucket_shards(tmp_path / "shards", num_shards=4, per_kind=2)
    out = tmp_path / "out"
    run_probe(tmp_path / "shards", out, json.dumps(TABLE))
    ranks = [json.loads((out / f"rank-{r}.json").read_text()) for r in range(2)]
    shapes = [json.loads((out / f"shapes-{r}.json").read_text()) for r in range(2)]
    for epoch in ("0", "1"):
        assert len(ranks[0][epoch]) == len(ranks[1][epoch]) > 0
        for keys, shape in zip(ranks[0][epoch] + ranks[1][epoch], shapes[0][epoch] + shapes[1][epoch]):
            buckets = {CLIPS[key.split("-")[0]][1] for key in keys}
            assert len(buckets) == 1 and shape == [TABLE[b][k] for b in buckets for k in ("frames", "height", "width")]
