"""Tests of the moving-digits dataset, the probe and the resumable shard writer."""

from __future__ import annotations

import json
import math
import tarfile
from pathlib import Path

import numpy as np
import pytest

from data_tools.cli import main
from data_tools.digits import (
    DIRECTIONS,
    caption_for,
    make_digit_clip,
    source_indices,
    write_digit_images,
    write_digit_videos,
)
from data_tools.probe import VideoProbeError, probe_video
from data_tools.shards import shard_images, shard_videos
from data_tools.video_io import decode_mp4, encode_mp4


def _tar_members(shard_dir: Path) -> dict[str, dict[str, bytes]]:
    """{tar name: {member name: bytes}} for every shard in `shard_dir`."""
    out = {}
    for tar_path in sorted(shard_dir.glob("shard-*.tar")):
        with tarfile.open(tar_path) as tar:
            out[tar_path.name] = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    return out


def _keys(members: dict[str, bytes]) -> list[str]:
    return sorted({name.split(".", 1)[0] for name in members})


def _center_of_mass(frame: np.ndarray) -> np.ndarray:
    weights = frame.astype(np.float64)
    ys, xs = np.indices(frame.shape)
    return np.array([(ys * weights).sum(), (xs * weights).sum()]) / weights.sum()


@pytest.fixture(scope="module")
def digit_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("digits")
    write_digit_videos(out, 8, seed=3)
    return out


# --- digits -----------------------------------------------------------------------------


def test_digit_files_are_deterministic_and_independent_of_count(tmp_path, digit_dir):
    write_digit_videos(tmp_path / "again", 8, seed=3)
    write_digit_videos(tmp_path / "fewer", 3, seed=3)
    write_digit_videos(tmp_path / "other", 3, seed=4)
    for i in range(8):
        for ext in ("mp4", "txt", "json"):
            name = f"{i:06d}.{ext}"
            assert (tmp_path / "again" / name).read_bytes() == (digit_dir / name).read_bytes(), name
            if i < 3:
                assert (tmp_path / "fewer" / name).read_bytes() == (digit_dir / name).read_bytes(), name
    other = [(tmp_path / "other" / f"{i:06d}.mp4").read_bytes() for i in range(3)]
    assert other != [(digit_dir / f"{i:06d}.mp4").read_bytes() for i in range(3)]


def test_digit_sidecars_agree_with_the_caption_template(digit_dir):
    for i in range(8):
        meta = json.loads((digit_dir / f"{i:06d}.json").read_text())
        caption = (digit_dir / f"{i:06d}.txt").read_text()
        assert caption == f"a handwritten {meta['digit']} moving {meta['direction']}"
        assert caption == caption_for(meta["digit"], meta["direction"])
        assert meta["digit_size"] == 16 and meta["canvas"] == 32 and meta["num_frames"] == 16
        assert 0.5 <= meta["speed"] <= 1.0


def test_rerun_keeps_complete_files_and_rewrites_changed_ones(tmp_path):
    write_digit_videos(tmp_path, 2, seed=0)
    first, second = tmp_path / "000000.mp4", tmp_path / "000001.mp4"
    kept_mtime = first.stat().st_mtime_ns
    second.write_bytes(b"stale")
    (tmp_path / "000001.json").write_text("{}")  # as if written with other settings
    write_digit_videos(tmp_path, 2, seed=0)
    assert first.stat().st_mtime_ns == kept_mtime
    assert decode_mp4(second).shape == (16, 32, 32, 3)


@pytest.mark.parametrize("direction", list(DIRECTIONS))
def test_clip_decodes_close_to_render_and_moves_in_captioned_direction(direction):
    frames, meta = make_digit_clip(11, direction=direction)  # (F, H, W)
    assert frames.shape == (16, 32, 32) and frames.dtype == np.uint8
    decoded = decode_mp4(encode_mp4(frames, fps=meta["fps"]))[..., 0]  # (F, H, W), gray
    assert np.abs(decoded.astype(int) - frames.astype(int)).mean() < 3

    # The whole digit stays on the canvas: no intensity is cropped away in any frame.
    mass = frames.reshape(16, -1).astype(np.float64).sum(axis=1)
    assert mass.min() > 0.98 * mass.max()

    displacement = _center_of_mass(decoded[-1]) - _center_of_mass(decoded[0])  # (dy, dx)
    for axis, unit in enumerate(DIRECTIONS[direction]):
        if unit == 0:
            assert abs(displacement[axis]) < 1.0
        else:
            # speed >= 0.5 px/frame over 15 frames: at least ~5 px per moving axis
            assert np.sign(displacement[axis]) == np.sign(unit) and abs(displacement[axis]) > 4


def test_train_and_val_draw_from_disjoint_digit_images(tmp_path):
    assert not set(source_indices("train")) & set(source_indices("val"))
    assert main(["digits", "--out", str(tmp_path), "--num-videos", "4", "--num-val", "3", "--workers", "1"]) == 0
    train = {json.loads(p.read_text())["source_index"] for p in (tmp_path / "train").glob("*.json")}
    val = {json.loads(p.read_text())["source_index"] for p in (tmp_path / "val").glob("*.json")}
    assert len(list((tmp_path / "train").glob("*.mp4"))) == 4 and len(list((tmp_path / "val").glob("*.mp4"))) == 3
    assert train and val and not train & val


# --- probe ------------------------------------------------------------------------------


def test_probe_counts_decoded_frames(digit_dir):
    probe = probe_video(digit_dir / "000000.mp4")
    assert (probe.num_frames, probe.fps, probe.width, probe.height) == (16, 8.0, 32, 32)
    assert probe.duration == pytest.approx(2.0) and probe.codec == "h264"


def test_probe_rejects_garbage_with_its_path(tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00not a video" * 50)
    with pytest.raises(VideoProbeError) as caught:
        probe_video(bad)
    assert caught.value.path == str(bad) and str(bad) in str(caught.value)


# --- shards -----------------------------------------------------------------------------


def test_shards_hold_every_clip_with_probe_fields(tmp_path, digit_dir):
    out = tmp_path / "shards"
    stats = shard_videos(digit_dir, out, shard_size=3, workers=2, progress=False)
    tars = _tar_members(out)
    assert sorted(tars) == [f"shard-{i:06d}.tar" for i in range(math.ceil(8 / 3))]
    assert stats["written"] == 8 and stats["failed"] == 0 and stats["shards"] == 3
    all_keys = []
    for index, (name, members) in enumerate(tars.items()):
        keys = _keys(members)
        assert sorted(members) == sorted(f"{k}.{ext}" for k in keys for ext in ("mp4", "txt", "json"))
        manifest = json.loads((out / f"shard-{index:06d}.manifest.json").read_text())
        assert manifest["keys"] == keys and manifest["num_samples"] == len(keys)
        all_keys += keys
        for key in keys:
            meta = json.loads(members[f"{key}.json"])
            assert (meta["num_frames"], meta["fps"], meta["width"], meta["height"]) == (16, 8.0, 32, 32)
            assert meta["duration"] == pytest.approx(2.0) and meta["status"] == "ok"
            assert meta["source"] == str((digit_dir / f"{key}.mp4").resolve())
            assert members[f"{key}.txt"].decode() == (digit_dir / f"{key}.txt").read_text()
            assert members[f"{key}.mp4"] == (digit_dir / f"{key}.mp4").read_bytes()
    assert all_keys == [f"{i:06d}" for i in range(8)]  # shards follow the sorted input order


def test_corrupt_video_is_reported_counted_and_skipped(tmp_path, digit_dir, capsys):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for path in sorted(digit_dir.glob("00000[0-3].*")):
        (inputs / path.name).write_bytes(path.read_bytes())
    (inputs / "000000.txt").unlink()  # a clip without a caption is kept, flagged
    corrupt = inputs / "000002.mp4"
    corrupt.write_bytes(np.random.default_rng(0).bytes(3000))

    stats = shard_videos(inputs, tmp_path / "shards", shard_size=2, workers=1, progress=False)
    err = capsys.readouterr().err
    assert str(corrupt.resolve()) in err
    assert stats["failed"] == 1 and stats["failed_paths"] == [str(corrupt.resolve())]
    on_disk = json.loads((tmp_path / "shards" / "_stats.json").read_text())
    assert on_disk["failed_paths"] == [str(corrupt.resolve())] and on_disk["written"] == 3
    tars = _tar_members(tmp_path / "shards")
    keys = [k for members in tars.values() for k in _keys(members)]
    assert keys == ["000000", "000001", "000003"]
    no_caption = tars["shard-000000.tar"]
    assert no_caption["000000.txt"] == b"" and json.loads(no_caption["000000.json"])["caption_missing"] is True
    manifest = json.loads((tmp_path / "shards" / "shard-000001.manifest.json").read_text())
    assert [f["path"] for f in manifest["failed"]] == [str(corrupt.resolve())]


def test_rerun_rewrites_only_the_missing_shard(tmp_path, digit_dir):
    out = tmp_path / "shards"
    shard_videos(digit_dir, out, shard_size=3, workers=1, progress=False)
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.glob("shard-*.tar")}
    (out / "shard-000001.tar").unlink()  # a crash before the rename
    (out / "shard-000002.tar.tmp").write_bytes(b"half a shard")

    stats = shard_videos(digit_dir, out, shard_size=3, workers=2, progress=False)
    assert stats["shards_written"] == 1 and stats["shards_skipped"] == 2
    assert not list(out.glob("*.tmp"))
    after = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.glob("shard-*.tar")}
    assert after["shard-000000.tar"] == before["shard-000000.tar"]  # untouched
    assert after["shard-000002.tar"] == before["shard-000002.tar"]
    assert after["shard-000001.tar"][0] == before["shard-000001.tar"][0]  # rewritten identically
    keys = [k for members in _tar_members(out).values() for k in _keys(members)]
    assert sorted(keys) == [f"{i:06d}" for i in range(8)] and len(keys) == len(set(keys))


def test_rerun_after_inputs_change_keeps_each_sample_once(tmp_path, digit_dir):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for path in digit_dir.glob("*"):
        (inputs / path.name).write_bytes(path.read_bytes())
    out = tmp_path / "shards"
    shard_videos(inputs, out, shard_size=3, workers=1, progress=False)
    for path in sorted(inputs.glob("00000[67].*")):
        path.unlink()  # 6 inputs now: shard 2 is stale, shard 1 is unchanged
    stats = shard_videos(inputs, out, shard_size=3, workers=1, progress=False)
    assert stats["shards"] == 2 and stats["shards_skipped"] == 2 and stats["written"] == 6
    assert sorted(p.name for p in out.glob("shard-*")) == [
        "shard-000000.manifest.json", "shard-000000.tar", "shard-000001.manifest.json", "shard-000001.tar"
    ]


def test_image_shards_use_the_img2dataset_layout(tmp_path):
    write_digit_images(tmp_path / "images", 5, seed=1)
    stats = shard_images(tmp_path / "images", tmp_path / "shards", shard_size=4, workers=1, progress=False)
    assert stats["written"] == 5 and stats["shards"] == 2
    members = {n: b for tar in _tar_members(tmp_path / "shards").values() for n, b in tar.items()}
    assert sorted(members) == sorted(f"{i:06d}.{e}" for i in range(5) for e in ("json", "png", "txt"))
    meta = json.loads(members["000003.json"])
    assert (meta["width"], meta["height"]) == (32, 32)
    assert members["000003.txt"].decode() == f"a handwritten {meta['digit']}"


# --- cli --------------------------------------------------------------------------------


@pytest.mark.parametrize("make_input", ["missing", "no_mp4"])
def test_cli_names_a_bad_input_dir_and_exits_2(tmp_path, capsys, make_input):
    input_dir = tmp_path / "videos"
    if make_input == "no_mp4":
        input_dir.mkdir()
        (input_dir / "notes.txt").write_text("no videos here")
    code = main(["shard", "--input", str(input_dir), "--out", str(tmp_path / "shards")])
    err = capsys.readouterr().err
    assert code == 2 and str(input_dir) in err and "Traceback" not in err
    assert not (tmp_path / "shards").exists()  # nothing half-written
