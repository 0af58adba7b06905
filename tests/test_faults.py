"""Fault injection: every kind of bad input is named in its message and either skipped and
counted (data) or stops the run before it starts (config, checkpoint)."""

from __future__ import annotations

import io
import json
import os
import tarfile
import time
import warnings
from pathlib import Path

import av
import pytest
import torch

import datamodules.video_decoding as video_decoding
from data_tools.video_io import encode_mp4
from datamodules import VideoShardDataModule
from datamodules.video_shards import SkippedSampleWarning
from experiments.checkpoints import AtomicCheckpointIO
from experiments.train import run_training
from tests.conftest import cli, compose_config, tiny_overrides
from tests.test_video_datamodule import indexed_clip

GOOD = encode_mp4(indexed_clip(0, num_frames=6))
HANG = b"hang" * 64


def zero_frame_mp4() -> bytes:
    """An mp4 with a video stream and no frames in it."""
    buf = io.BytesIO()
    container = av.open(buf, "w", format="mp4")
    stream = container.add_stream("libx264", rate=8)
    stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
    container.start_encoding()
    for packet in stream.encode(None):
        container.mux(packet)
    container.close()
    return buf.getvalue()


def write_tar(path: Path, members: dict[str, bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), time.time()
            tar.addfile(info, io.BytesIO(data))
    return path


def good(key: str) -> dict[str, bytes]:
    return {f"{key}.mp4": GOOD, f"{key}.txt": f"clip {key}".encode(), f"{key}.json": b"{}"}


def read_all(shards: Path, **options) -> tuple[list[str], list[str], VideoShardDataModule]:
    """Keys of every validation batch, the SkippedSampleWarning messages, the datamodule."""
    dm = VideoShardDataModule(shards, val_shards=shards, batch_size=4, num_workers=0, num_frames=4,
                              frame_stride=1, size=16, **options)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        keys = [k for batch in dm.val_dataloader() for k in batch["key"]]
    return keys, [str(w.message) for w in caught if issubclass(w.category, SkippedSampleWarning)], dm


BAD_SAMPLES = {
    "garbage mp4": ({"bad.mp4": b"\x00\x00\x00 not an mp4" * 30, "bad.txt": b"a clip"}, "cannot decode mp4"),
    "zero-frame mp4": ({"bad.mp4": zero_frame_mp4(), "bad.txt": b"a clip"}, "cannot decode mp4"),
    "missing caption": ({"bad.mp4": GOOD, "bad.json": b"{}"}, "no .txt caption"),
    "caption not UTF-8": ({"bad.mp4": GOOD, "bad.txt": b"\xff\xfe\xfa"}, "not UTF-8"),
    "member outside the archive": ({"../bad.mp4": GOOD, "../bad.txt": b"escape"}, "outside the archive"),
    "hanging decode": ({"bad.mp4": HANG, "bad.txt": b"a clip"}, "took longer than 0.5 s"),
}


@pytest.mark.parametrize("fault", list(BAD_SAMPLES))
def test_bad_sample_is_skipped_counted_and_named(tmp_path, monkeypatch, fault):
    members, message = BAD_SAMPLES[fault]
    shard = write_tar(tmp_path / "shards" / "shard-000000.tar", good("a") | members | good("z"))
    real_decode = video_decoding._decode_frames

    def maybe_hang(data, *args):
        if data == HANG:
            time.sleep(60)  # a decoder that never returns
        return real_decode(data, *args)

    monkeypatch.setattr(video_decoding, "_decode_frames", maybe_hang)
    started = time.monotonic()
    keys, messages, dm = read_all(tmp_path / "shards", decode_timeout=0.5)
    assert time.monotonic() - started < 30
    assert keys == ["a", "z"]  # the run goes on with the good samples
    assert dm.num_skipped_samples == 1
    assert len(messages) == 1 and message in messages[0] and str(shard) in messages[0], messages
    assert "bad" in messages[0]


def test_truncated_shard_keeps_its_readable_samples_and_names_the_shard(tmp_path):
    members = good("a") | good("b") | good("c") | good("d")
    shard = write_tar(tmp_path / "shards" / "shard-000000.tar", members)
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) * 3 // 5])  # cut inside sample c
    keys, messages, dm = read_all(tmp_path / "shards")
    assert keys[:2] == ["a", "b"] and "d" not in keys
    assert dm.num_skipped_samples == 1  # one truncation, counted once (webdataset reports it twice)
    assert len(messages) == 1 and "unreadable shard data" in messages[0] and str(shard) in messages[0], messages


def test_unknown_config_key_stops_the_cli_naming_it_and_leaves_no_run(tmp_path, digits_data_root):
    result = cli("experiments.train", *tiny_overrides(digits_data_root, tmp_path), "run_id=x", "trainer.max_stepz=3",
                 check=False)
    assert result.returncode != 0
    assert "max_stepz" in result.stderr
    assert not (tmp_path / "x").exists()


def test_checkpoint_from_another_model_is_refused_by_name(tmp_path, digits_data_root):
    foreign = tmp_path / "foreign.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"net.conv_in.weight": torch.zeros(3, 3)}}, foreign)
    cfg = compose_config([*tiny_overrides(digits_data_root, tmp_path / "runs"), "run_id=r", f"resume={foreign}", "~logger"])
    with pytest.raises(SystemExit, match=r"foreign\.ckpt was saved by a different model.*missing"):
        run_training(cfg)


def test_pickled_code_in_a_checkpoint_is_not_run(tmp_path):
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.ckpt"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"state_dict": {}, "x": Payload()}, evil)
    with pytest.raises(Exception, match="weights_only"):
        AtomicCheckpointIO().load_checkpoint(evil)
    assert not marker.exists()


def test_training_on_faulty_shards_finishes_and_logs_the_skipped_count(tmp_path, digits_data_root):
    shards = tmp_path / "shards"
    write_tar(shards / "shard-000000.tar",
              {k: v for i in range(8) for k, v in good(f"g{i}").items()} | BAD_SAMPLES["garbage mp4"][0])
    write_tar(shards / "shard-000001.tar", {k: v for i in range(8, 16) for k, v in good(f"g{i}").items()}
              | {"nocap.mp4": GOOD})
    cfg = compose_config([
        *tiny_overrides(digits_data_root, tmp_path / "runs", max_steps=3), "run_id=faulty", "~logger",
        f"data.train_shards={shards}", "trainer.limit_val_batches=0", "data.num_frames=4", "data.frame_stride=1",
    ])
    with pytest.warns(SkippedSampleWarning):
        metrics = run_training(cfg)
    status = json.loads((tmp_path / "runs" / "faulty" / "run.json").read_text())
    assert status["status"] == "completed" and status["global_step"] == 3
    assert metrics["data/skipped_samples"] == 2


def test_a_failed_frame_allocation_skips_the_clip_naming_it(tmp_path, monkeypatch):
    # numpy raises MemoryError when the decoded frames cannot be allocated: the clip is skipped
    # with its shard and key, counted, and the batch goes on with the others.
    from datamodules import video_decoders

    write_tar(tmp_path / "shards" / "shard-000000.tar", good("a") | good("big") | good("z"))
    real = video_decoders.DECODERS["decord"]

    def decode(data, choose):
        if decode.calls == 1:  # the second clip, "big"
            decode.calls += 1
            raise MemoryError("Unable to allocate 3.00 GiB for an array with shape (64, 4096, 4096, 3)")
        decode.calls += 1
        return real(data, choose)

    decode.calls = 0
    monkeypatch.setitem(video_decoders.DECODERS, "decord", decode)
    dm = VideoShardDataModule(tmp_path / "shards", val_shards=tmp_path / "shards", batch_size=3, num_workers=0,
                              num_frames=None, frame_stride=1, size=16)
    with pytest.warns(SkippedSampleWarning) as caught:
        keys = [k for batch in dm.val_dataloader() for k in batch["key"]]
    shard = tmp_path / "shards" / "shard-000000.tar"
    assert keys == ["a", "z"] and dm.num_skipped_samples == 1
    assert [str(w.message) for w in caught if issubclass(w.category, SkippedSampleWarning)] == [
        f"skipping mp4 of sample big in shard {shard}: cannot allocate memory to decode it"]
