"""`effvid-data curate` on small real-codec videos made here: concatenated scenes of different
content (sliding random blocks of different colours and sizes), static, blurred, dark and
duplicated clips, broken inputs, and a run killed with SIGKILL and resumed."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import yaml

from data_tools.clips import plan_clips
from data_tools.curate import curate
from data_tools.curation_config import (
    ClipsConfig,
    CurationConfigError,
    CutsConfig,
    config_to_dict,
    load_curation_config,
)
from data_tools.probe import VideoProbe
from data_tools.scenes import VideoScan, scan_video
from data_tools.synthetic_scenes import scene
from data_tools.video_io import decode_mp4, encode_mp4

FPS = 24
REPO = Path(__file__).resolve().parents[1]


def write_video(path: Path, frames: np.ndarray, crf: int = 10) -> Path:
    path.write_bytes(encode_mp4(frames, fps=FPS, crf=crf))
    return path


def config(*overrides: str):
    return load_curation_config(overrides=["clips.fps=12", "clips.short_side=null", *overrides])


def tar_samples(out: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    for tar_path in sorted(out.glob("shard-*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def tar_keys(out: Path) -> list[str]:
    keys = []
    for tar_path in sorted(out.glob("shard-*.tar")):
        with tarfile.open(tar_path) as tar:
            keys += [m.name.split(".", 1)[0] for m in tar.getmembers() if m.name.endswith(".mp4")]
    return keys


# Scenes of 0.75 s, 3.5 s and 2 s: cuts at frames 18 and 102.
SCENE_LENGTHS = (18, 84, 48)


@pytest.fixture(scope="module")
def three_scenes(tmp_path_factory) -> tuple[Path, list[np.ndarray]]:
    folder = tmp_path_factory.mktemp("three_scenes")
    scenes = [scene(n, seed) for n, seed in zip(SCENE_LENGTHS, (1, 2, 3))]
    video = write_video(folder / "three.mp4", np.concatenate(scenes))
    (folder / "three.txt").write_text("three checkerboards")
    return video, scenes


# --- cut detection and clip splitting -----------------------------------------------------


@pytest.mark.parametrize("detector", ["content", "adaptive"])
def test_cuts_are_found_within_one_frame(three_scenes, detector):
    video, _ = three_scenes
    scan = scan_video(video, CutsConfig(detector=detector))
    expected = np.cumsum(SCENE_LENGTHS)[:-1]  # 18, 102
    assert len(scan.cuts) == len(expected)
    assert np.abs(np.array(scan.cuts) - expected).max() <= 1
    assert scan.probe.num_frames == sum(SCENE_LENGTHS) and scan.times[1] == pytest.approx(1 / FPS)


def test_clips_respect_the_bounds_and_start_exactly_at_the_cuts(three_scenes, tmp_path):
    video, scenes = three_scenes
    stats = curate(video.parent, tmp_path / "out", config("clips.min_seconds=1.0", "clips.max_seconds=1.5"),
                   progress=False)
    samples = tar_samples(tmp_path / "out")
    # 0.75 s scene: too short; 3.5 s: 1.5 + 1.5 (+ 0.5 s remainder dropped); 2 s: 1.5 (+ 0.5).
    assert sorted(samples) == ["00000000_000", "00000000_001", "00000000_002"]
    assert stats["written"] == 3
    source = np.concatenate(scenes)
    spans = []
    for key, sample in sorted(samples.items()):
        meta = json.loads(sample["json"])
        frames = decode_mp4(sample["mp4"])  # (F, H, W, 3)
        assert 1.0 <= len(frames) / 12 <= 1.5 and meta["num_frames"] == len(frames) == 18
        assert meta["fps"] == 12 and meta["duration"] == pytest.approx(1.5)
        assert sample["txt"] == b"three checkerboards" and meta["caption_missing"] is False
        clip = meta["clip"]
        spans.append((clip["start_frame"], clip["end_frame"]))
        # Output frame k is source frame start + 2k (24 -> 12 fps): the closest source frame
        # to each decoded one is exactly that, so none comes from outside the span.
        errors = np.abs(frames[:, None].astype(np.int16) - source[None].astype(np.int16)).mean(axis=(2, 3, 4))
        assert errors.argmin(axis=1).tolist() == list(range(clip["start_frame"], clip["end_frame"], 2))
    assert spans == [(18, 54), (54, 90), (102, 138)]


def _scan(num_frames: int, cuts: tuple[int, ...], fps: float = 10.0) -> VideoScan:
    probe = VideoProbe("x.mp4", num_frames, fps, 64, 48, num_frames / fps, "h264")
    return VideoScan(probe, np.arange(num_frames) / fps, cuts)


@pytest.mark.parametrize(("strategy", "expected"), [
    ("all", [(0, 20), (25, 55), (55, 85), (85, 105)]),
    ("first", [(0, 20)]),
    ("longest", [(25, 55)]),  # the first clip of the longest scene
])
def test_clip_strategies_split_long_scenes_and_skip_short_ones(strategy, expected):
    # Scenes at 10 fps: 2 s (0-20), 0.5 s (20-25, too short), 8 s (25-105).
    spans, skipped = plan_clips(_scan(105, (20, 25)), ClipsConfig(min_seconds=1.5, max_seconds=3.0, strategy=strategy))
    assert [(s.start, s.end) for s in spans] == expected
    assert all(1.5 <= s.seconds <= 3.0 for s in spans)
    assert any("0.50 s < min_seconds" in reason for reason in skipped)


# --- filters and dedup --------------------------------------------------------------------


def test_filters_drop_static_blurred_dark_and_duplicate_clips(tmp_path):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    write_video(inputs / "a_moving.mp4", scene(48, seed=1))
    write_video(inputs / "b_static.mp4", scene(48, seed=2, speed=0))
    write_video(inputs / "c_blurred.mp4", scene(48, seed=3, blur=4))
    write_video(inputs / "d_dark.mp4", scene(48, seed=4, gain=0.05))
    write_video(inputs / "e_copy_of_a.mp4", scene(48, seed=1), crf=30)  # re-encoded duplicate
    write_video(inputs / "f_other.mp4", scene(48, seed=5, speed=-1.5))
    out = tmp_path / "out"
    stats = curate(inputs, out, config("clips.min_seconds=1.0", "clips.max_seconds=2.0"), progress=False)

    assert tar_keys(out) == ["00000000_000", "00000005_000"]
    assert stats["dropped_by"] == {"brightness": 1, "dedup": 1, "motion": 1, "sharpness": 1}
    lines = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    by_name = {Path(line["path"]).name: line for line in lines}
    assert by_name["b_static.mp4"]["reason"].startswith("motion: ") and "< min 0.1" in by_name["b_static.mp4"]["reason"]
    assert by_name["c_blurred.mp4"]["reason"].startswith("sharpness: ")
    assert by_name["d_dark.mp4"]["reason"].startswith("brightness: ")
    assert by_name["e_copy_of_a.mp4"]["reason"].startswith("dedup: near-duplicate of 00000000_000")
    assert by_name["a_moving.mp4"]["status"] == "ok" and by_name["a_moving.mp4"]["samples"] == 1
    meta = json.loads(tar_samples(out)["00000000_000"]["json"])
    assert set(meta["scores"]) == {"motion", "sharpness", "brightness"} and meta["caption_missing"] is True
    assert any("clip_similarity and aesthetic: skipped" in note for note in stats["notes"])


# --- bad input ----------------------------------------------------------------------------


def _audio_only_mp4() -> bytes:
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("aac", rate=8000)
        for i in range(4):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 8000, i * 1024
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def _variable_frame_rate_mp4(frames: np.ndarray) -> bytes:
    """Frames shown alternately for 1/30 s and 1/15 s (average 20 fps)."""
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.codec_context.time_base = Fraction(1, 30)
        pts = 0
        for i, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts, frame.time_base = pts, Fraction(1, 30)
            pts += 1 if i % 2 == 0 else 2
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def test_bad_inputs_are_reported_by_path_and_never_stop_the_run(tmp_path):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    good = write_video(inputs / "good.mp4", scene(48, seed=1))
    (inputs / "corrupt.mp4").write_bytes(np.random.default_rng(0).bytes(4000))
    (inputs / "empty.mp4").write_bytes(b"")
    (inputs / "audio.mp4").write_bytes(_audio_only_mp4())
    (inputs / "truncated.mp4").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    write_video(inputs / "latin1.mp4", scene(48, seed=6))
    (inputs / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    (inputs / "vfr.mp4").write_bytes(_variable_frame_rate_mp4(scene(40, seed=7)))
    listing = tmp_path / "videos.txt"
    names = ["good.mp4", "corrupt.mp4", "empty.mp4", "audio.mp4", "truncated.mp4", "latin1.mp4", "vfr.mp4", "gone.mp4"]
    listing.write_text("".join(f"inputs/{name}\n" for name in names))

    out = tmp_path / "out"
    stats = curate(listing, out, config("clips.min_seconds=1.0", "clips.max_seconds=2.0", "inputs_per_shard=3"),
                   progress=False)
    lines = {Path(line["path"]).name: line for line in map(json.loads, (out / "manifest.jsonl").read_text().splitlines())}
    assert sorted(lines) == sorted(names)
    reasons = {name: line["reason"] for name, line in lines.items() if line["status"] == "failed"}
    assert set(reasons) == {"corrupt.mp4", "empty.mp4", "audio.mp4", "truncated.mp4", "latin1.mp4", "gone.mp4"}
    assert reasons["audio.mp4"] == "probe: no video stream"
    assert reasons["gone.mp4"] == "probe: file not found"
    assert reasons["latin1.mp4"].startswith("caption: caption latin1.txt is not UTF-8")
    assert all(reason.startswith("probe: cannot decode") for name, reason in reasons.items()
               if name in ("corrupt.mp4", "empty.mp4", "truncated.mp4"))
    assert stats["inputs_failed"] == 6 and len(stats["failed_paths"]) == 6
    assert str((inputs / "gone.mp4").resolve()) in stats["failed_paths"]

    samples = tar_samples(out)
    assert sorted(samples) == ["00000000_000", "00000006_000"]  # good and the variable-rate one
    vfr = json.loads(samples["00000006_000"]["json"])
    # 40 frames over 40 * 1.5 / 30 = 2 s, resampled to a constant 12 fps.
    assert vfr["source_video"]["num_frames"] == 40 and vfr["num_frames"] == len(decode_mp4(samples["00000006_000"]["mp4"]))
    assert vfr["clip"]["end_time"] - vfr["clip"]["start_time"] == pytest.approx(2.0, abs=0.05)
    assert not list(out.glob("*.tmp"))


def test_config_errors_name_the_key_and_the_file(tmp_path):
    path = tmp_path / "curation.yaml"
    path.write_text("clips:\n  max_second: 4\n")
    with pytest.raises(CurationConfigError, match=r"curation.yaml.*max_second"):
        load_curation_config(path)
    path.write_text("clips:\n  strategy: middle\n")
    with pytest.raises(CurationConfigError, match=r"clips.strategy must be one of all/first/longest"):
        load_curation_config(path)


# --- interruption -------------------------------------------------------------------------


@pytest.mark.slow
def test_kill_9_then_rerun_gives_every_clip_exactly_once(tmp_path):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for i in range(8):
        # Two scenes each; input 6 repeats input 1, so dedup must see shards of the killed run.
        seeds = (1 + 2 * (1 if i == 6 else i), 2 + 2 * (1 if i == 6 else i))
        write_video(inputs / f"v{i}.mp4", np.concatenate([scene(30, seeds[0]), scene(30, seeds[1], speed=-1)]))
    overrides = ["clips.fps=12", "clips.short_side=null", "clips.min_seconds=1.0", "inputs_per_shard=1"]
    reference = tmp_path / "reference"
    curate(inputs, reference, load_curation_config(overrides=overrides), progress=False)

    out = tmp_path / "out"
    command = [sys.executable, "-m", "data_tools.cli", "curate", "--input", str(inputs), "--out", str(out),
               "--workers", "1", "--no-progress", *[arg for o in overrides for arg in ("--set", o)]]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 60
    while len(list(out.glob("shard-*.manifest.json"))) < 2 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    finished = len(list(out.glob("shard-*.manifest.json")))
    assert process.returncode == -signal.SIGKILL and 2 <= finished < 8, process.stderr.read().decode()

    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    stats = json.loads((out / "_stats.json").read_text())
    assert stats["shards_skipped"] >= 2 and stats["dropped_by"] == {"dedup": 2}
    keys = tar_keys(out)
    assert keys == tar_keys(reference) and len(keys) == len(set(keys)) == stats["written"] >= 12
    assert not list(out.glob("*.tmp"))
    # Same spans, captions and scores (mp4 bytes are not compared: this libx264 build is
    # occasionally not bit-exact between two encodes of the same frames).
    resumed, uninterrupted = tar_samples(out), tar_samples(reference)
    assert all(resumed[k]["json"] == uninterrupted[k]["json"] and resumed[k]["txt"] == uninterrupted[k]["txt"]
               for k in keys)


def test_readme_config_example_lists_every_key_with_its_default(tmp_path):
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Curating videos"):]
    example = section[section.index("```yaml") + len("```yaml"): section.index("```", section.index("```yaml") + 3)]
    path = tmp_path / "curation.yaml"
    path.write_text(example)
    assert load_curation_config(path) == load_curation_config()

    def keys(tree: dict, prefix: str = "") -> set[str]:
        return {k for name, value in tree.items()
                for k in (keys(value, f"{prefix}{name}.") if isinstance(value, dict) else {f"{prefix}{name}"})}

    assert keys(yaml.safe_load(example)) == keys(config_to_dict(load_curation_config()))
