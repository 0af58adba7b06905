"""The documented path on real-shaped footage: raw videos of three aspect ratios ->
`effvid-data curate` -> LoRA training of a pretrained bundle (tiny random Wan) on bucketed
batches, every bucket a shape the family's VAE takes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from data_tools.video_io import encode_mp4
from tests.conftest import cli

pytestmark = pytest.mark.slow  # curates and trains (~30 s)

BUCKETS = "[{frames:9,height:32,width:32,batch_size:2,weight:1},{frames:9,height:32,width:48,batch_size:1,weight:1},{frames:9,height:48,width:32,batch_size:1,weight:1}]"  # fmt: skip


def raw_video(path: Path, width: int, height: int, seed: int) -> None:
    """3 s at 8 fps: a bright square moving across a noise background (no cuts, no duplicates)."""
    rng = np.random.default_rng(seed)
    background = rng.integers(0, 120, (height, width, 3), dtype=np.uint8)
    frames = np.repeat(background[None], 24, axis=0)
    for t in range(24):
        top, left = (t * 2) % (height - 12), (t * 3) % (width - 12)
        frames[t, top : top + 12, left : left + 12] = (255, 200 - seed * 20, 40)
    path.write_bytes(encode_mp4(frames, fps=8))


def test_raw_videos_curate_and_train_a_pretrained_bundle_on_bucketed_batches(tiny_pipeline_folders, tmp_path, capsys):
    from data_tools.cli import main as effvid_data

    raw = tmp_path / "raw"
    raw.mkdir()
    for seed, (width, height) in enumerate([(96, 54), (96, 54), (54, 96), (54, 96), (64, 64), (64, 64)]):
        raw_video(raw / f"video{seed}.mp4", width, height, seed)
        (raw / f"video{seed}.txt").write_text(f"a square crossing clip {seed}")
    curated = tmp_path / "curated"
    assert effvid_data(["curate", "--input", str(raw), "--out", str(curated), "--workers", "1", "--no-progress",
                        "--set", "clips.fps=8", "--set", "clips.short_side=32", "--set", "clips.min_seconds=1.5"]) == 0
    sizes = sorted({(m["width"], m["height"]) for m in _metas(curated)})
    assert len(sizes) == 3, sizes  # landscape, portrait and square clips survived curation

    config = tmp_path / "buckets.yaml"
    config.write_text(json.dumps({"buckets": json.loads(_as_json(BUCKETS))}))
    capsys.readouterr()
    assert effvid_data(["inspect", str(curated), "--buckets", str(config)]) == 0
    report = capsys.readouterr().out
    counts = {line.split()[0]: int(line.split()[2]) for line in report.splitlines()[2:6]}
    assert counts["9x32x32"] and counts["9x32x48"] and counts["9x48x32"] and not counts["fit"], report

    runs = tmp_path / "runs"
    result = cli("experiments.train", "experiment=wan_t2v_lora", f"pretrained={tiny_pipeline_folders['wan']}",
                 "data=buckets_example", f"data.train_shards={curated}", f"data.val_shards={curated}",
                 f"data.buckets={BUCKETS}", "data.size=32", "data.num_frames=9", "data.num_workers=0",
                 "data.shuffle_buffer=4", "debug=few_steps", "trainer.max_steps=4", "~logger",
                 f"runs_dir={runs}", "run_id=bucketed", check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (runs / "bucketed" / "metrics.jsonl").read_text().splitlines()]
    losses = [row["train/loss"] for row in rows if "train/loss" in row]
    # weights 1:1:1: the first three batches are one of each bucket, so all three shapes trained
    assert len(losses) == 4 and all(math.isfinite(loss) for loss in losses)


def test_a_bucket_the_family_vae_cannot_take_is_refused_before_training(tiny_pipeline_folders, tmp_path, digits_data_root):
    shards = digits_data_root / "digits" / "shards"
    result = cli("experiments.train", "experiment=wan_t2v_lora", f"pretrained={tiny_pipeline_folders['wan']}",
                 "data=buckets_example", f"data.train_shards={shards / 'train'}", f"data.val_shards={shards / 'val'}",
                 "data.buckets=[{frames:8,height:32,width:32,batch_size:2}]", "data.size=32", "data.num_frames=9",
                 "debug=few_steps", "~logger", f"runs_dir={tmp_path}", check=False)
    assert result.returncode != 0
    assert "data.buckets 8x32x32 (frames x height x width): 8 frames" in result.stderr
    assert "takes 4k+1 frames" in result.stderr


def _metas(shard_dir: Path) -> list[dict]:
    import tarfile

    metas = []
    for tar_path in sorted(shard_dir.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            metas += [json.loads(tar.extractfile(m).read()) for m in tar if m.name.endswith(".json")]
    return metas


def _as_json(hydra_list: str) -> str:
    """The Hydra override list `[{frames:9,...}]` as JSON."""
    import re

    return re.sub(r"(\w+):", r'"\1":', hydra_list)
