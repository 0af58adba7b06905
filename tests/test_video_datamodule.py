"""VideoShardDataModule over tiny synthetic shards written in each test."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from data_tools.video_io import decode_mp4, encode_mp4
from datamodules import VideoShardDataModule
from datamodules.shard_lists import resolve_shards
from datamodules import video_decoders, video_decoding
from datamodules.video_decoding import (
    ClipTooShortError,
    VideoDecodeError,
    decode_clip,
    sample_frame_indices,
)
from datamodules.video_shards import SkippedSampleWarning

NUM_FRAMES = 16


def indexed_clip(seed: int, num_frames: int = NUM_FRAMES, height: int = 32, width: int = 32) -> np.ndarray:
    """Frames whose background grey level encodes the frame index, plus a moving bright square."""
    frames = np.zeros((num_frames, height, width, 3), np.uint8)
    for i in range(num_frames):
        frames[i] = 10 + 14 * i  # index i -> grey 10 + 14 i, far apart enough to survive H.264
        top = (seed + i) % (height - 8)
        frames[i, top : top + 6, 20:26] = 255
    return frames


def frame_index(video: torch.Tensor) -> list[int]:
    """Recover frame indices from a decoded (3, F, H, W) clip in [-1, 1] (top-left corner)."""
    grey = (video[:, :, :4, :4].mean(dim=(0, 2, 3)) + 1) * 127.5
    return [round((g - 10) / 14) for g in grey.tolist()]


def write_shards(shard_dir: Path, num_shards: int, per_shard: int, *, corrupt: set[str] = frozenset(),
                 bad_caption: set[str] = frozenset(), frames_of=indexed_clip) -> dict[str, dict]:
    """Write shards in the video2dataset layout; return {key: {"mp4", "txt", "json"}}."""
    shard_dir.mkdir(parents=True, exist_ok=True)
    samples = {}
    for s in range(num_shards):
        with wds.TarWriter(str(shard_dir / f"shard-{s:06d}.tar")) as sink:
            for j in range(per_shard):
                key = f"{s:03d}{j:04d}"
                clip = encode_mp4(frames_of(s * 100 + j))
                mp4 = b"\x00\x00\x00 this is not an mp4" * 20 if key in corrupt else clip
                txt = b"\xff\xfe bad" if key in bad_caption else f"clip {key} moves down".encode()
                meta = {"digit": j % 10, "direction": "down", "index": s * 100 + j}
                sink.write({"__key__": key, "mp4": mp4, "txt": txt, "json": json.dumps(meta).encode()})
                samples[key] = {"mp4": mp4, "txt": txt.decode("utf-8", "replace"), "json": meta}
        (shard_dir / f"shard-{s:06d}.manifest.json").write_text("{}")
    (shard_dir / "_stats.json").write_text("{}")
    return samples


def all_batches(loader, dm) -> list[dict]:
    """The loader's batches as the trainer hands them to the model: uint8 frames made float clips."""
    return [dm.on_after_batch_transfer(batch, 0) for batch in loader]


def test_batches_have_shape_range_captions_and_partial_batch_policy(tmp_path):
    samples = write_shards(tmp_path / "shards", num_shards=2, per_shard=3)
    dm = VideoShardDataModule(tmp_path / "shards", val_shards=tmp_path / "shards", batch_size=4,
                              num_workers=0, num_frames=4, frame_stride=2, size=16)
    dm.setup("fit")
    train = all_batches(dm.train_dataloader(), dm)
    val = all_batches(dm.val_dataloader(), dm)
    assert [len(b["key"]) for b in train] == [4]  # 6 samples: the partial batch is dropped
    assert [len(b["key"]) for b in val] == [4, 2]  # validation keeps it
    for batch in train + val:
        video = batch["video"]
        assert video.shape == (len(batch["key"]), 3, 4, 16, 16)
        assert video.dtype == torch.float32
        assert video.min() >= -1 and video.max() <= 1 and video.min() < -0.5 and video.max() > 0.5
        assert batch["caption"] == [samples[k]["txt"] for k in batch["key"]]
        assert batch["meta"] == [samples[k]["json"] for k in batch["key"]]
    assert sorted(k for b in val for k in b["key"]) == sorted(samples)


def test_decoded_frames_equal_pyav_decode(tmp_path):
    samples = write_shards(tmp_path / "shards", num_shards=1, per_shard=2)
    dm = VideoShardDataModule(tmp_path / "shards", val_shards=tmp_path / "shards", batch_size=2,
                              num_workers=0, num_frames=None, frame_stride=1, size=None, channels=3)
    (batch,) = all_batches(dm.val_dataloader(), dm)
    for key, video in zip(batch["key"], batch["video"]):
        reference = torch.from_numpy(decode_mp4(samples[key]["mp4"])).permute(3, 0, 1, 2)  # (3, F, H, W)
        as_uint8 = ((video + 1) * 127.5).round().to(torch.uint8)
        # decord and PyAV give bit-identical RGB here: exact equality, no tolerance.
        assert torch.equal(as_uint8, reference)


def test_width_decord_cannot_return_falls_back_to_identical_pyav_frames(monkeypatch):
    # decord 0.6 fails on some widths (dmlc/decord#336), 48 among them. The warning is given
    # once per process, so another test may already have used it up.
    monkeypatch.setattr(video_decoders, "_warned_decord_fallback", False)
    mp4 = encode_mp4(indexed_clip(0, num_frames=6, height=32, width=48))
    with pytest.warns(UserWarning, match="decord#336"):
        video = decode_clip(mp4, url="u", key="k", num_frames=None, stride=1, random_start=False,
                            rng=None, size=None, channels=3)
    reference = torch.from_numpy(decode_mp4(mp4)).permute(3, 0, 1, 2)
    assert torch.equal(((video + 1) * 127.5).round().to(torch.uint8), reference)


def test_frame_sampling_with_stride_picks_the_right_frames():
    mp4 = encode_mp4(indexed_clip(3))
    assert frame_index(decode_clip(mp4, url="u", key="k", num_frames=5, stride=3, random_start=False,
                                   rng=None, size=None, channels=3)) == [0, 3, 6, 9, 12]
    rng = np.random.default_rng(0)
    starts = set()
    for _ in range(20):
        picked = frame_index(decode_clip(mp4, url="u", key="k", num_frames=4, stride=2,
                                         random_start=True, rng=rng, size=None, channels=3))
        assert picked == list(range(picked[0], picked[0] + 8, 2))
        starts.add(picked[0])
    assert starts <= set(range(0, NUM_FRAMES - 7 + 1)) and len(starts) > 3  # 0..9 valid, varied
    all_starts = {int(sample_frame_indices(10, 3, 4, True, rng)[0]) for _ in range(200)}
    assert all_starts == {0, 1}  # span 9 in 10 frames: exactly two valid starts, both reached
    with pytest.raises(ClipTooShortError, match="8 frames at stride 3 need 22"):
        sample_frame_indices(16, 8, 3, False, None)


def test_resize_crops_centre_to_requested_square_and_grayscale_is_luma():
    frames = np.zeros((4, 40, 64, 3), np.uint8)
    frames[:, 10:30, 22:42] = 255  # a white square at the centre of a wide frame
    mp4 = encode_mp4(frames)
    video = decode_clip(mp4, url="u", key="k", num_frames=4, stride=1, random_start=False, rng=None,
                        size=16, channels=3)
    assert video.shape == (3, 4, 16, 16)
    weight = (video[0, 0] + 1).clamp(min=0)  # (16, 16) brightness
    rows, cols = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    centroid = ((weight * rows).sum() / weight.sum(), (weight * cols).sum() / weight.sum())
    assert abs(centroid[0] - 7.5) < 1 and abs(centroid[1] - 7.5) < 1  # cropped at the centre
    assert video[0, 0, 0, 0] < -0.9 and video[0, 0, 8, 8] > 0.9

    red = np.zeros((2, 32, 32, 3), np.uint8)
    red[..., 0] = 200
    grey = decode_clip(encode_mp4(red), url="u", key="k", num_frames=2, stride=1, random_start=False,
                       rng=None, size=32, channels=1)
    assert grey.shape == (1, 2, 32, 32)
    assert torch.allclose(grey, torch.full_like(grey, 0.299 * 200 / 127.5 - 1), atol=0.03)

    same = decode_clip(mp4, url="u", key="k", num_frames=4, stride=1, random_start=False, rng=None,
                       size=None, channels=3)[..., 12:52]  # already 40 high: only the crop
    kept = decode_clip(mp4, url="u", key="k", num_frames=4, stride=1, random_start=False, rng=None,
                       size=40, channels=3)
    assert torch.equal(kept, same)


@pytest.mark.parametrize("channels", [3, 1])
def test_frames_to_video_matches_the_plain_per_frame_formula(channels):
    # `frames_to_video` converts a whole batch of (B, F, H, W, 3) uint8 frames in one go; a
    # layout slip (frames swapped with channels, a luma weight on the wrong axis) changes
    # pixels. Exact: the same float operations on the same values.
    frames = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (2, 5, 24, 40, 3), dtype=np.uint8))
    expected = torch.empty(2, channels, 5, 24, 40)
    for b, f in np.ndindex(2, 5):
        image = frames[b, f].float().permute(2, 0, 1)  # (3, H, W)
        if channels == 1:
            image = (image * torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)).sum(dim=0, keepdim=True)
        expected[b, :, f] = (image / 127.5 - 1.0).clamp(-1.0, 1.0)
    video = video_decoding.frames_to_video(frames, channels)
    assert video.is_contiguous() and video.dtype == torch.float32
    assert torch.allclose(video, expected, atol=1e-6, rtol=0)
    assert torch.equal(video_decoding.frames_to_video(frames[0], channels), video[0])  # one clip alike


@pytest.mark.parametrize("size", [16, 24, (12, 30)])
def test_uint8_resize_is_within_one_level_of_the_float_resize(size):
    # The loaders resize uint8 frames (torch's uint8 kernel, ~10x faster than floats at 256p):
    # every pixel within one level of resizing the float frames and rounding; a crop-only
    # size (24: the frames are 24 high already) is exact.
    frames = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (6, 24, 40, 3), dtype=np.uint8))
    resized = video_decoding.resize_center_crop_frames(frames, size)
    floats = video_decoding._resize_center_crop(frames.permute(0, 3, 1, 2).float(), size)  # (F, 3, h, w)
    reference = floats.round().clamp(0, 255).permute(0, 2, 3, 1)
    target = (size, size) if isinstance(size, int) else size
    assert resized.dtype == torch.uint8 and resized.shape == (6, *target, 3)
    difference = (resized.float() - reference).abs().max()
    assert difference <= (0 if size == 24 else 1)


def test_validation_is_deterministic_and_training_reproducible_per_epoch(tmp_path):
    write_shards(tmp_path / "shards", num_shards=2, per_shard=4)
    options = dict(batch_size=2, num_workers=0, num_frames=3, frame_stride=2, size=16, seed=5,
                   shuffle_buffer=8)
    dm = VideoShardDataModule(tmp_path / "shards", val_shards=tmp_path / "shards", **options)
    val = dm.val_dataloader()
    first, second = all_batches(val, dm), all_batches(val, dm)
    assert [b["key"] for b in first] == [b["key"] for b in second]
    assert all(torch.equal(a["video"], b["video"]) for a, b in zip(first, second))
    assert all(torch.isfinite(b["video"]).all() for b in first)

    def epochs(datamodule, n):
        loader = datamodule.train_dataloader()
        return [[k for b in loader for k in b["key"]] for _ in range(n)]

    run_a = epochs(dm, 2)
    run_b = epochs(VideoShardDataModule(tmp_path / "shards", **options), 2)
    assert run_a == run_b  # same seed, same epochs -> same order
    assert run_a[0] != run_a[1] and sorted(run_a[0]) == sorted(run_a[1])  # new order per epoch
    resumed = VideoShardDataModule(tmp_path / "shards", **options)
    resumed.set_epoch(1)
    assert epochs(resumed, 1)[0] == run_a[1]  # set_epoch reproduces epoch 1 directly


def test_corrupt_mp4_and_bad_caption_are_skipped_with_warnings_naming_shard_and_key(tmp_path):
    samples = write_shards(tmp_path / "shards", num_shards=1, per_shard=4, corrupt={"0000001"},
                           bad_caption={"0000003"})
    dm = VideoShardDataModule(tmp_path / "shards", val_shards=tmp_path / "shards", batch_size=4,
                              num_workers=0, num_frames=4, size=16)
    with pytest.warns(SkippedSampleWarning) as caught:
        (batch,) = all_batches(dm.val_dataloader(), dm)
    messages = [str(w.message) for w in caught]
    shard = str(tmp_path / "shards" / "shard-000000.tar")
    assert any("0000001" in m and shard in m and "decode" in m for m in messages)
    assert any("0000003" in m and shard in m and "UTF-8" in m for m in messages)
    assert batch["key"] == ["0000000", "0000002"]
    assert batch["caption"] == [samples["0000000"]["txt"], samples["0000002"]["txt"]]
    assert dm.num_skipped_samples == 2
    with pytest.raises(VideoDecodeError, match=r"sample 0000001 in shard x\.tar"):
        decode_clip(samples["0000001"]["mp4"], url="x.tar", key="0000001", num_frames=4, stride=1,
                    random_start=False, rng=None, size=None, channels=3)


def test_too_short_clips_are_skipped_with_a_warning(tmp_path):
    write_shards(tmp_path / "shards", num_shards=1, per_shard=2,
                 frames_of=lambda seed: indexed_clip(seed, num_frames=4 if seed == 1 else NUM_FRAMES))
    dm = VideoShardDataModule(tmp_path / "shards", val_shards=tmp_path / "shards", batch_size=2,
                              num_workers=0, num_frames=4, frame_stride=2, size=16)
    with pytest.warns(SkippedSampleWarning, match="0000001.*4 frames but 4 frames at stride 2 need 7"):
        (batch,) = all_batches(dm.val_dataloader(), dm)
    assert batch["key"] == ["0000000"]


def test_bad_shard_specs_fail_at_setup_naming_the_directory(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        VideoShardDataModule(missing, num_workers=0).setup("fit")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "_stats.json").write_text("{}")
    with pytest.raises(ValueError, match=f"no \\*\\.tar shards in directory {empty}"):
        VideoShardDataModule(empty, num_workers=0).setup("fit")
    write_shards(tmp_path / "two", num_shards=2, per_shard=1)
    too_many = rf"2 shards in {tmp_path / 'two'} but num_workers x world_size = 4 x 1"
    with pytest.raises(ValueError, match=too_many):
        VideoShardDataModule(tmp_path / "two", num_workers=4).setup("fit")
    with pytest.raises(FileNotFoundError, match="shard-000002.tar"):
        resolve_shards(str(tmp_path / "two" / "shard-{000000..000002}.tar"))


def test_resolve_shards_accepts_dirs_braces_globs_and_lists_and_ignores_manifests(tmp_path):
    write_shards(tmp_path / "a", num_shards=2, per_shard=1)
    write_shards(tmp_path / "b", num_shards=1, per_shard=1)
    a0, a1 = (str(tmp_path / "a" / f"shard-{i:06d}.tar") for i in range(2))
    b0 = str(tmp_path / "b" / "shard-000000.tar")
    assert resolve_shards(tmp_path / "a") == [a0, a1]
    assert resolve_shards(str(tmp_path / "a" / "shard-{000000..000001}.tar")) == [a0, a1]
    assert resolve_shards(str(tmp_path / "*" / "shard-*.tar")) == [a0, a1, b0]
    assert resolve_shards([tmp_path / "b", a1]) == [b0, a1]
    with pytest.raises(ValueError, match="more than once"):
        resolve_shards([tmp_path / "a", a0])


@pytest.mark.slow
def test_two_workers_over_two_shards_see_every_sample_exactly_once_per_epoch(tmp_path):
    samples = write_shards(tmp_path / "shards", num_shards=2, per_shard=5)
    dm = VideoShardDataModule(tmp_path / "shards", val_shards=tmp_path / "shards", batch_size=1,
                              num_workers=2, num_frames=2, frame_stride=1, size=8, shuffle_buffer=4)
    dm.setup("fit")
    train = dm.train_dataloader()
    epochs = [[k for b in train for k in b["key"]] for _ in range(2)]  # persistent workers reused
    for keys in epochs:
        assert sorted(keys) == sorted(samples)  # each sample once: no duplicates across workers
    assert epochs[0] != epochs[1]  # workers advanced their epoch and reshuffled
    val_keys = [k for b in dm.val_dataloader() for k in b["key"]]
    assert sorted(val_keys) == sorted(samples)


def test_epoch_samples_fixes_the_batch_count_by_cycling_through_shards(tmp_path):
    samples = write_shards(tmp_path / "shards", num_shards=2, per_shard=3)
    dm = VideoShardDataModule(tmp_path / "shards", batch_size=2, num_workers=0, num_frames=2,
                              frame_stride=1, size=8, epoch_samples=10, shuffle_buffer=1)
    loader = dm.train_dataloader()
    for _ in range(2):
        keys = [k for b in loader for k in b["key"]]
        assert len(keys) == 10  # 5 full batches from 6 samples: the shard list wraps around
        assert set(keys) == set(samples)
    with pytest.raises(ValueError, match="epoch_samples=3 gives no batch"):
        VideoShardDataModule(tmp_path / "shards", batch_size=2, num_workers=2, epoch_samples=3).setup("fit")


@pytest.mark.parametrize("cache_mb, decodes_per_clip", [(1.0, 1), (0.01, 3)])
def test_decoded_clip_cache_gives_the_same_batches_and_decodes_each_clip_once(tmp_path, monkeypatch, cache_mb, decodes_per_clip):
    from datamodules import video_shards

    write_shards(tmp_path / "shards", num_shards=2, per_shard=4)
    options = dict(batch_size=2, num_workers=0, num_frames=3, frame_stride=2, size=16, seed=5, shuffle_buffer=8)

    def three_epochs(datamodule):
        loader = datamodule.train_dataloader()
        return [batch for _ in range(3) for batch in loader]  # uint8 frames, compared as decoded

    plain = three_epochs(VideoShardDataModule(tmp_path / "shards", **options))
    decoded = []
    decode = video_shards.decode_frames
    monkeypatch.setattr(video_shards, "decode_frames", lambda data, **kw: decoded.append(kw["key"]) or decode(data, **kw))
    cached = three_epochs(VideoShardDataModule(tmp_path / "shards", decoded_cache_mb=cache_mb, **options))
    assert [b["key"] for b in cached] == [b["key"] for b in plain]
    assert all(torch.equal(a["frames"], b["frames"]) for a, b in zip(cached, plain))  # random start frames too
    assert len(decoded) == 8 * decodes_per_clip and len(set(decoded)) == 8  # 0.01 MB holds no 16-frame clip


def test_batches_reach_the_device_with_their_tensors_moved_and_everything_else_kept(tmp_path):
    dm = VideoShardDataModule(tmp_path / "shards", num_workers=0)
    batch = {"frames": torch.zeros(2, 3, 4, 4, 3, dtype=torch.uint8), "caption": ["a", "b"], "meta": [{"digit": 1}, {}]}
    assert dm.transfer_batch_to_device(batch, torch.device("cpu"), 0) is batch  # already there
    moved = dm.transfer_batch_to_device(batch, torch.device("meta"), 0)  # any other device: moved
    assert moved["frames"].device.type == "meta" and moved["caption"] == ["a", "b"] and moved["meta"] == batch["meta"]
