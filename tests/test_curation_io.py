"""Curation around the pipeline: the CLI and `inspect`, shards in video2dataset's and
img2dataset's layouts, captions from a table, CLIP scores with a tiny random open_clip model,
and the Ray executor."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from data_tools.cli import main
from data_tools.curate import curate
from data_tools.curation_config import load_curation_config
from data_tools.shards import shard_images
from data_tools.video_io import encode_mp4
from datamodules import VideoShardDataModule
from datamodules.video_shards import SkippedSampleWarning
from data_tools.synthetic_scenes import scene
from test_curation import tar_keys, tar_samples, write_video


@pytest.fixture(scope="module")
def two_videos(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("two_videos")
    write_video(folder / "a.mp4", np.concatenate([scene(30, 1), scene(30, 2, speed=-1)]))
    write_video(folder / "b.mp4", scene(36, 3))
    return folder


SMALL = ["--set", "clips.fps=12", "--set", "clips.short_side=32", "--set", "clips.min_seconds=1.0"]


def test_cli_curate_then_inspect(two_videos, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["curate", "--input", str(two_videos), "--out", str(out), "--workers", "2", "--no-progress", *SMALL]) == 0
    printed = capsys.readouterr().out
    assert "3 clips" in printed and "note: clip_similarity and aesthetic: skipped" in printed
    samples = tar_samples(out)
    assert sorted(samples) == ["00000000_000", "00000000_001", "00000001_000"]
    meta = json.loads(samples["00000000_001"]["json"])
    assert (meta["width"], meta["height"]) == (42, 32)  # 64x48 -> short side 32, even width
    assert meta["clip"]["start_frame"] == 30 and meta["source"] == str((two_videos / "a.mp4").resolve())

    assert main(["inspect", str(out), "--samples", "3"]) == 0
    report = capsys.readouterr().out
    assert "1 shards, 3 samples (0 with a caption)" in report
    assert any(line.startswith("scores.motion") and line.split()[1] == "3" for line in report.splitlines())
    for name in ("contact_sheet.png", "histograms.png"):
        with Image.open(out / "_inspect" / name) as image:
            assert image.width > 100 and image.height > 100


def test_cli_reports_a_bad_config_and_an_unwritable_output(two_videos, tmp_path, capsys):
    config = tmp_path / "curation.yaml"
    config.write_text("clips:\n  max_second: 4\n")
    assert main(["curate", "--input", str(two_videos), "--out", str(tmp_path / "o"), "--config", str(config)]) == 2
    assert "max_second" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert main(["curate", "--input", str(two_videos), "--out", str(blocker / "out"), "--no-progress", *SMALL]) == 2
    err = capsys.readouterr().err
    assert str(blocker) in err and "Traceback" not in err


def test_captions_from_a_csv_column_with_missing_rows(two_videos, tmp_path):
    table = tmp_path / "captions.csv"
    table.write_text(f"path,caption\n{two_videos / 'a.mp4'},two scenes\n{two_videos / 'b.mp4'},\n")
    config = load_curation_config(overrides=["clips.fps=12", "clips.min_seconds=1.0", "captions.source=table",
                                             f"captions.table={table}"])
    curate(table, tmp_path / "out", config, progress=False)
    samples = tar_samples(tmp_path / "out")
    assert samples["00000000_000"]["txt"] == samples["00000000_001"]["txt"] == b"two scenes"
    assert samples["00000001_000"]["txt"] == b"" and json.loads(samples["00000001_000"]["json"])["caption_missing"]


# --- compatibility with video2dataset / img2dataset shards ---------------------------------


def test_datamodule_reads_video2dataset_shards_and_skips_failed_entries_quietly(tmp_path):
    """video2dataset layout: `00000.tar` with keys `{shard:05d}{index:04d}`, `.mp4/.txt/.json`;
    a failed download is a `.json` with status "failed_to_download" and no `.mp4`."""
    folder = tmp_path / "v2d"
    folder.mkdir()
    with wds.TarWriter(str(folder / "00000.tar")) as sink:
        for index in range(5):
            key = f"00000{index:04d}"
            meta = {"url": f"https://example.com/{index}.mp4", "key": key, "caption": f"clip {index}",
                    "status": "success", "error_message": None}
            sample = {"__key__": key, "json": json.dumps(meta).encode()}
            if index in (1, 3):
                meta.update(status="failed_to_download", error_message="HTTP Error 404: Not Found")
                sample["json"] = json.dumps(meta).encode()
            else:
                sample["mp4"] = encode_mp4(scene(8, index, height=32, width=32), fps=8)
                sample["txt"] = f"clip {index}".encode()
            sink.write(sample)
    (folder / "00000_stats.json").write_text(json.dumps({"count": 5, "successes": 3, "failed_to_download": 2}))

    data = VideoShardDataModule(str(folder), val_shards=str(folder), batch_size=8, num_workers=0,
                                num_frames=4, size=16)
    data.setup("validate")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = list(data.val_pipeline())
    assert [key for batch in batches for key in batch["key"]] == ["000000000", "000000002", "000000004"]
    assert batches[0]["caption"] == ["clip 0", "clip 2", "clip 4"] and batches[0]["frames"].shape == (3, 4, 16, 16, 3)
    assert data.num_skipped_samples == 2
    assert not [w for w in caught if issubclass(w.category, SkippedSampleWarning)]


def test_images_writes_img2dataset_layout_with_hashes(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(images / "a.jpg", quality=90)
    Image.fromarray(rng.integers(0, 255, (24, 16, 3), dtype=np.uint8)).save(images / "b.png")
    (images / "a.txt").write_text("noise")
    assert main(["images", "--input", str(images), "--out", str(tmp_path / "shards"), "--image-format", "jpg",
                 "--workers", "1"]) == 0
    with tarfile.open(tmp_path / "shards" / "shard-000000.tar") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    assert sorted(members) == ["a.jpg", "a.json", "a.txt", "b.jpg", "b.json", "b.txt"]
    assert members["a.jpg"] == (images / "a.jpg").read_bytes()  # JPEGs are stored as they are
    for key, size in (("a", (30, 20)), ("b", (16, 24))):
        meta = json.loads(members[f"{key}.json"])
        assert meta["sha256"] == hashlib.sha256(members[f"{key}.jpg"]).hexdigest()
        assert (meta["width"], meta["height"]) == (meta["original_width"], meta["original_height"]) == size
        with Image.open(io.BytesIO(members[f"{key}.jpg"])) as image:
            assert image.format == "JPEG" and image.size == size
    assert json.loads(members["b.json"])["original_format"] == "png"
    kept = shard_images(images, tmp_path / "kept", workers=1, progress=False)  # default: bytes as they are
    assert kept["written"] == 2


# --- optional backends ---------------------------------------------------------------------


def test_clip_scores_with_a_tiny_random_open_clip_model(two_videos, tmp_path):
    pytest.importorskip("open_clip")
    import torch

    model_config = tmp_path / "tiny-clip.json"
    model_config.write_text(json.dumps({
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1},
    }))
    head = tmp_path / "aesthetic.pt"
    torch.save({"weight": torch.ones(1, 16), "bias": torch.tensor([5.0])}, head)
    (two_videos / "a.txt").write_text("a sliding pattern")
    try:
        config = load_curation_config(overrides=[
            "clips.fps=12", "clips.min_seconds=1.0", "clip_score.model=tiny-clip",
            f"clip_score.model_config={model_config}", f"clip_score.aesthetic_head={head}",
            "clip_score.similarity.min=-1.0",
        ])
        stats = curate(two_videos, tmp_path / "out", config, progress=False)
    finally:
        (two_videos / "a.txt").unlink()
    metas = {k: json.loads(s["json"]) for k, s in tar_samples(tmp_path / "out").items()}
    assert len(metas) == 3
    for key, meta in metas.items():
        scores = meta["scores"]
        # bias 5 + the sum of a unit vector's 16 entries, which lies in [-4, 4]
        assert 1.0 <= scores["aesthetic"] <= 9.0 and scores["aesthetic"] != 5.0
        assert ("clip_similarity" in scores) == key.startswith("00000000")  # only captioned clips
        if "clip_similarity" in scores:
            assert -1.0 <= scores["clip_similarity"] <= 1.0
    assert any("randomly initialised tiny-clip" in note for note in stats["notes"])


def test_ray_executor_gives_the_same_shards(two_videos, tmp_path):
    ray = pytest.importorskip("ray")
    overrides = ["clips.fps=12", "clips.short_side=32", "clips.min_seconds=1.0", "inputs_per_shard=1"]
    curate(two_videos, tmp_path / "local", load_curation_config(overrides=overrides), progress=False)
    try:
        stats = curate(two_videos, tmp_path / "ray", load_curation_config(overrides=overrides), workers=2,
                       executor="ray", progress=False)
    finally:
        ray.shutdown()
    assert stats["executor"] == "ray" and tar_keys(tmp_path / "ray") == tar_keys(tmp_path / "local")
    local, remote = tar_samples(tmp_path / "local"), tar_samples(tmp_path / "ray")
    assert all(local[key]["json"] == remote[key]["json"] for key in local)


def test_shards_roll_over_at_the_sample_limit_and_resume(two_videos, tmp_path):
    overrides = ["clips.fps=12", "clips.short_side=32", "clips.min_seconds=1.0", "shard_max_samples=2"]
    out = tmp_path / "out"
    curate(two_videos, out, load_curation_config(overrides=overrides), progress=False)
    assert sorted(p.name for p in out.glob("*.tar")) == ["shard-000000.tar", "shard-000000_01.tar"]
    manifest = json.loads((out / "shard-000000.manifest.json").read_text())
    assert [part["num_samples"] for part in manifest["parts"]] == [2, 1]
    assert tar_keys(out) == manifest["keys"] == ["00000000_000", "00000000_001", "00000001_000"]
    (out / "shard-000000_01.tar").unlink()  # a lost part makes the shard unfinished
    stats = curate(two_videos, out, load_curation_config(overrides=overrides), progress=False)
    assert stats["shards_written"] == 1 and tar_keys(out) == manifest["keys"]
    stats = curate(two_videos, out, load_curation_config(overrides=overrides), progress=False)
    assert stats["shards_skipped"] == 1
