"""Clips per second: the datamodule's train loader vs raw decord vs naive PyAV, same clips.

    python -m benchmarks.loader [--shards DIR] [--num-clips 256] [--num-frames 8] [--stride 2]
                                [--size 16] [--workers 2] [--batch-size 16]

Without `--shards` it writes a temporary set of moving-digit clips (32x32, 16 frames, H.264).
Rows: (a) `VideoShardDataModule.train_dataloader()` (decord + sampling + resize + shuffle +
collate, in `--workers` processes; the second pass is timed, after worker start-up);
(b) decord opening each clip's bytes and reading the sampled frames, one process;
(c) PyAV decoding every frame of each clip, one process. (b) and (c) read the mp4 bytes from
the tars into memory first and time only the decoding.
"""

from __future__ import annotations

import argparse
import io
import json
import tarfile
import tempfile
import time
from pathlib import Path

import decord
import numpy as np
import webdataset as wds

from data_tools.video_io import decode_mp4, encode_mp4
from datamodules import VideoShardDataModule
from datamodules.shard_lists import resolve_shards
from datamodules.video_decoding import sample_frame_indices


def synthetic_clip(index: int) -> tuple[np.ndarray, str, dict]:
    """A moving digit when `data_tools.digits` is available, else a moving square."""
    try:
        from data_tools.digits import caption_for, make_digit_clip
    except ImportError:
        frames = np.zeros((16, 32, 32, 3), np.uint8)
        for t in range(16):
            top = (index + t) % 24
            frames[t, top : top + 8, 12:20] = 255
        return frames, f"a square moving down, clip {index}", {"index": index}
    frames, meta = make_digit_clip(index, canvas=32, num_frames=16)
    return frames, caption_for(meta["digit"], meta["direction"]), meta


def write_synthetic_shards(out_dir: Path, num_clips: int, num_shards: int) -> None:
    per_shard = -(-num_clips // num_shards)
    for s in range(num_shards):
        with wds.TarWriter(str(out_dir / f"shard-{s:06d}.tar")) as sink:
            for i in range(s * per_shard, min(num_clips, (s + 1) * per_shard)):
                frames, caption, meta = synthetic_clip(i)
                sink.write({"__key__": f"{i:09d}", "mp4": encode_mp4(frames),
                            "txt": caption.encode(), "json": json.dumps(meta).encode()})


def read_mp4_bytes(urls: list[str], limit: int) -> list[bytes]:
    clips = []
    for url in urls:
        with tarfile.open(url) as tar:
            for member in tar:
                if member.name.endswith(".mp4"):
                    clips.append(tar.extractfile(member).read())
                    if len(clips) == limit:
                        return clips
    return clips


def time_loader(args: argparse.Namespace, shards: str) -> tuple[float, int]:
    dm = VideoShardDataModule(shards, batch_size=args.batch_size, num_workers=args.workers,
                              num_frames=args.num_frames, frame_stride=args.stride, size=args.size,
                              shuffle_buffer=64)
    dm.setup("fit")
    loader = dm.train_dataloader()
    for _ in loader:  # first pass starts the persistent workers
        pass
    start = time.perf_counter()
    clips = sum(len(batch["key"]) for batch in loader)
    return time.perf_counter() - start, clips


def time_decord(clips: list[bytes], num_frames: int, stride: int) -> float:
    start = time.perf_counter()
    for data in clips:
        reader = decord.VideoReader(io.BytesIO(data), ctx=decord.cpu(0), num_threads=1)
        reader.get_batch(sample_frame_indices(len(reader), num_frames, stride, False).tolist()).asnumpy()
    return time.perf_counter() - start


def time_pyav(clips: list[bytes]) -> float:
    start = time.perf_counter()
    for data in clips:
        decode_mp4(data)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", help="shard directory / pattern (default: a temporary synthetic set)")
    parser.add_argument("--num-clips", type=int, default=256)
    parser.add_argument("--num-frames", type=int, default=8)
    parser.add_argument("--stride", type=int, default=2)
    parser.add_argument("--size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        shards = args.shards
        if shards is None:
            shards = tmp
            write_synthetic_shards(Path(tmp), args.num_clips, num_shards=2 * max(args.workers, 1))
        urls = resolve_shards(shards)
        clips = read_mp4_bytes(urls, args.num_clips)
        # (a) runs over the whole shard set; (b) and (c) over its first --num-clips clips.
        loader_s, loader_clips = time_loader(args, shards)
        rows = [
            (f"(a) datamodule train loader, {args.workers} workers", loader_clips, loader_s),
            ("(b) decord, sampled frames, 1 process", len(clips),
             time_decord(clips, args.num_frames, args.stride)),
            ("(c) PyAV full decode, 1 process", len(clips), time_pyav(clips)),
        ]
    print(f"{args.num_frames} frames at stride {args.stride}, size {args.size}, batch {args.batch_size}")
    print(f"{'path':<44} {'clips':>6} {'seconds':>8} {'clips/s':>9}")
    for name, count, seconds in rows:
        print(f"{name:<44} {count:>6} {seconds:>8.2f} {count / seconds:>9.1f}")


if __name__ == "__main__":
    main()
