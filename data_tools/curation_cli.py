"""The `curate` and `inspect` subcommands of `effvid-data` (added to its parser by cli.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

from data_tools.stages import default_workers

_CURATE_HELP = """\
Turn raw videos into training-ready clip shards, in stages (each configurable in --config):

  1. probe       decode every input (PyAV): frames, fps, size, codec; unreadable, audio-only
                 or zero-frame files are reported and skipped
  2. cuts        PySceneDetect ContentDetector (threshold 27) or AdaptiveDetector on
                 downscaled frames, run during the probe's decode
  3. clips       scenes -> clips of clips.min_seconds..clips.max_seconds (strategy all /
                 first / longest), exact source-frame spans, re-encoded (H.264) to clips.fps
                 and clips.short_side
  4. scores      motion (Farneback optical flow), sharpness (Laplacian variance),
                 brightness, CLIP similarity / aesthetic (open_clip, only with named
                 weights); all scores go into each clip's json, bounds drop clips
  5. dedup       perceptual hashes of 3 keyframes; the first clip in input order is kept
  6. captions    sidecar NAME.txt / NAME.json "caption", a CSV/parquet column, or none
  7. writing     video2dataset layout (KEY.mp4, KEY.txt, KEY.json), shard i = the clips of
                 inputs i*N..(i+1)*N-1 (inputs_per_shard), rolling over to
                 shard-NNNNNN_01.tar, ... past shard_max_samples / shard_max_bytes; every
                 tar is written as .tmp and renamed when complete

INPUT is a folder (searched recursively for .mp4/.mov/.mkv/.webm/.avi/.m4v), a video file,
a text file of paths (one a line), or a CSV/parquet table with a `path` column. OUT gets
shard-NNNNNN.tar + shard-NNNNNN.manifest.json (keys, every input's status and reason,
drops), manifest.jsonl (one line per input) and _stats.json (the run summary: inputs,
clips, kept, dropped per filter, notes on skipped scores). Interrupted? Run the same command
again: finished shards are kept, the rest is redone, every kept clip appears exactly once.

examples:
  effvid-data curate --input raw_videos/ --out data/curated
  effvid-data curate --input videos.csv --out data/curated --config curation.yaml --workers 8
  effvid-data curate --input raw_videos/ --out data/curated --set clips.fps=8 --set clips.short_side=64
  effvid-data curate --input raw_videos/ --out data/curated --executor ray   # RAY_ADDRESS=... for a cluster
"""

_INSPECT_HELP = """\
Summarise a shard folder (curated or not): sample counts per shard, caption coverage, the
distribution (min / median / mean / max) of duration, fps, size and every score in the
sample jsons, plus OUT/contact_sheet.png (the middle frame of a few samples with key and
scores) and OUT/histograms.png (duration, motion, sharpness, brightness, ...). OUT defaults
to SHARD_DIR/_inspect.

With --buckets CONFIG (a YAML with a `buckets:` table, e.g. a data config), it prints how
the clips fall into the buckets instead: clips and share of batches per bucket, and every
clip that fits no bucket, by shard and key. Nothing is decoded: sizes come from the jsons.

examples:
  effvid-data inspect data/curated --samples 16
  effvid-data inspect data/curated --buckets experiments/conf/data/buckets_example.yaml
"""


def add_curation_commands(commands: argparse._SubParsersAction, positive_int) -> None:  # noqa: ANN001
    raw = argparse.RawDescriptionHelpFormatter
    curate = commands.add_parser("curate", help="raw videos -> cut, filtered, deduplicated clip shards",
                                 description=_CURATE_HELP, formatter_class=raw)
    curate.add_argument("--input", required=True, type=Path, help="folder, video file, list file, or CSV/parquet table")
    curate.add_argument("--out", required=True, type=Path, help="folder for the shards, manifests and _stats.json")
    curate.add_argument("--config", type=Path, help="curation YAML (see README 'Curating videos'); defaults otherwise")
    curate.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config value, e.g. --set clips.fps=8 (repeatable)")
    curate.add_argument("--workers", type=positive_int, default=default_workers(), help="processes (default min(4, CPUs))")
    curate.add_argument("--executor", choices=("local", "ray"), default="local",
                        help="local process pool (default) or Ray (pip install 'effvid[ray]')")
    curate.add_argument("--no-progress", action="store_true", help="no progress bar")

    inspect = commands.add_parser("inspect", help="counts, score distributions and a contact sheet of shards",
                                  description=_INSPECT_HELP, formatter_class=raw)
    inspect.add_argument("shard_dir", type=Path, help="folder of *.tar shards")
    inspect.add_argument("--out", type=Path, help="folder for contact_sheet.png and histograms.png (default SHARD_DIR/_inspect)")
    inspect.add_argument("--samples", type=positive_int, default=16, help="samples on the contact sheet (default 16)")
    inspect.add_argument("--buckets", type=Path, metavar="CONFIG",
                         help="YAML with a `buckets:` table: show how the clips fall into it")


def run_curate(args: argparse.Namespace) -> None:
    from data_tools.curate import curate
    from data_tools.curation_config import load_curation_config

    config = load_curation_config(args.config, args.overrides)
    stats = curate(args.input, args.out, config, workers=args.workers, executor=args.executor, progress=not args.no_progress)
    dropped = ", ".join(f"{name} {count}" for name, count in stats["dropped_by"].items()) or "none"
    print(
        f"{stats['inputs']} inputs ({stats['inputs_failed']} failed, {stats['inputs_without_samples']} without a kept clip): "
        f"kept {stats['written']} clips, dropped {stats['dropped']} ({dropped}), "
        f"{stats['shards']} shards in {args.out} ({stats['shards_skipped']} already complete) in {stats['seconds']:.1f} s"
    )
    for note in stats["notes"]:
        print(f"note: {note}")
    if stats["failed_paths"]:
        print(f"failed inputs are listed with their reasons in {args.out / 'manifest.jsonl'}")


def run_inspect(args: argparse.Namespace) -> None:
    from data_tools.inspect_shards import inspect_shards

    if args.buckets is not None:
        from data_tools.cli import UsageError
        from data_tools.inspect_buckets import bucket_report, load_bucket_table

        try:
            table = load_bucket_table(args.buckets)
        except ValueError as error:  # a bad table: one line naming the file and the bucket
            raise UsageError(f"{args.buckets}: {error}") from None
        print(bucket_report(args.shard_dir, table))
        return

    report = inspect_shards(args.shard_dir, args.out, num_samples=args.samples)
    print(report.text)
