"""Curation throughput per stage, one process (= per core), on the same synthetic inputs.

    python -m benchmarks.curation [--inputs 8] [--width 320] [--height 240] [--fps 30]
                                  [--scene-seconds 2.5] [--scenes 4] [--workers 2]

Writes `--inputs` H.264 videos of `--scenes` scenes each (sliding random blocks, a hard cut
between scenes) to a temporary folder, then times each stage of `effvid-data curate` with
the default config (24 fps, short side 256) in this one process:
  probe + cuts   PyAV decode of every source frame + ContentDetector on 128-px-wide frames
  extract        second decode, resampling to 24 fps, resize to the short side
  scores         Farneback motion (8 pairs), Laplacian sharpness, brightness, pHash
  encode         H.264 re-encode of each clip (libx264, one thread, preset medium; and veryfast)
  dedup + write  pHash dedup and the shard writer over the encoded clips
and finally the whole `curate` end to end with 1 and with `--workers` processes.
"source frames/s" counts decoded input frames, "clip frames/s" output frames.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import webdataset  # noqa: F401 - imports torch; loaded before any timing

from data_tools.clips import extract_clips, plan_clips
from data_tools.curate import curate
from data_tools.curation_config import load_curation_config
from data_tools.dedup import PerceptualDedup
from data_tools.filters import opencv_scores
from data_tools.scenes import scan_video
from data_tools.shards import write_planned_shards
from data_tools.stages import ClipRecord
from data_tools.synthetic_scenes import multi_scene_video
from data_tools.video_io import encode_mp4


def write_inputs(folder: Path, count: int, width: int, height: int, fps: int, scene_seconds: float, scenes: int) -> None:
    for i in range(count):
        frames = multi_scene_video([round(scene_seconds * fps)] * scenes, seed=i, height=height, width=width)
        (folder / f"input_{i:03d}.mp4").write_bytes(encode_mp4(frames, fps=fps, crf=20))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inputs", type=int, default=8)
    parser.add_argument("--width", type=int, default=320)
    parser.add_argument("--height", type=int, default=240)
    parser.add_argument("--fps", type=int, default=30)
    parser.add_argument("--scene-seconds", type=float, default=2.5)
    parser.add_argument("--scenes", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    config = load_curation_config()

    with tempfile.TemporaryDirectory(prefix="effvid-curation-bench-") as tmp:
        inputs = Path(tmp) / "inputs"
        inputs.mkdir()
        write_inputs(inputs, args.inputs, args.width, args.height, args.fps, args.scene_seconds, args.scenes)
        paths = sorted(inputs.glob("*.mp4"))

        seconds = dict.fromkeys(("probe + cuts", "extract", "scores", "encode", "encode (preset veryfast)", "dedup + write"), 0.0)
        source_frames = clip_frames = clips = 0
        records: list[list[ClipRecord]] = []
        for path in paths:
            started = time.perf_counter()
            scan = scan_video(path, config.cuts)
            spans, _ = plan_clips(scan, config.clips)
            seconds["probe + cuts"] += time.perf_counter() - started
            source_frames += scan.probe.num_frames

            started = time.perf_counter()
            all_frames = list(extract_clips(path, scan, spans, config.clips))
            seconds["extract"] += time.perf_counter() - started

            started = time.perf_counter()
            scores = [opencv_scores(frames, config.filters) for frames in all_frames]
            seconds["scores"] += time.perf_counter() - started

            started = time.perf_counter()
            data = [encode_mp4(frames, fps=config.clips.fps, crf=config.clips.crf) for frames in all_frames]
            seconds["encode"] += time.perf_counter() - started
            started = time.perf_counter()
            for frames in all_frames:
                encode_mp4(frames, fps=config.clips.fps, crf=config.clips.crf, preset="veryfast")
            seconds["encode (preset veryfast)"] += time.perf_counter() - started
            clips += len(all_frames)
            clip_frames += sum(len(frames) for frames in all_frames)
            records.append([
                ClipRecord(key=f"{path.stem}_{c}", source=str(path), data=d, meta={"phash": s["phash"]})
                for c, (d, s) in enumerate(zip(data, scores))
            ])

        started = time.perf_counter()
        write_planned_shards([[str(p)] for p in paths], Path(tmp) / "written", lambda pending: iter(records),
                             gate=PerceptualDedup(6), progress=False)
        seconds["dedup + write"] = time.perf_counter() - started

        end_to_end = {}
        for workers in (1, args.workers):
            started = time.perf_counter()
            stats = curate(inputs, Path(tmp) / f"curated-{workers}", config, workers=workers, progress=False)
            end_to_end[workers] = (time.perf_counter() - started, stats["written"])

    print(f"{args.inputs} inputs of {args.scenes} x {args.scene_seconds} s scenes, {args.width}x{args.height} "
          f"@ {args.fps} fps ({source_frames} source frames) -> {clips} clips ({clip_frames} frames, "
          f"{config.clips.fps:g} fps, short side {config.clips.short_side}); {os.cpu_count()} CPUs\n")
    print(f"| {'stage (1 process)':<26} | {'seconds':>8} | {'clips/s':>8} | {'source frames/s':>15} | {'clip frames/s':>13} |")
    print(f"|{'-' * 28}|{'-' * 10}|{'-' * 10}|{'-' * 17}|{'-' * 15}|")
    for stage, took in seconds.items():
        print(f"| {stage:<26} | {took:>8.2f} | {clips / took:>8.1f} | {source_frames / took:>15.0f} | {clip_frames / took:>13.0f} |")
    for workers, (took, written) in end_to_end.items():
        per_core = f" (per process: {clips / took / workers:.1f} clips/s)" if workers > 1 else ""
        label = f"curate end to end, {workers} proc"
        print(f"| {label:<26} | {took:>8.2f} | {written / took:>8.1f} | {source_frames / took:>15.0f} | {clip_frames / took:>13.0f} |{per_core}")


if __name__ == "__main__":
    main()
