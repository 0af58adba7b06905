"""`effvid-data`: make the embedded moving-digits dataset and write WebDataset shards."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from data_tools.curation_cli import add_curation_commands, run_curate, run_inspect
from data_tools.atomic_files import WriteError
from data_tools.curation_config import CurationConfigError
from data_tools.mp4_header import DEFAULT_MAX_DECODE_PIXELS
from data_tools.pairs import PairInputError
from data_tools.probe import ProbeError
from data_tools.shards import ShardInputError
from data_tools.stages import default_workers

_EPILOG = """\
examples:
  effvid-data digits --out data/digits --num-videos 2000 --num-val 200
  effvid-data shard --input data/digits/train --out data/shards/train
  effvid-data shard --input data/digits/val --out data/shards/val
  effvid-data digits --images --out data/digit_images --num-videos 5000
  effvid-data images --input data/digit_images/train --out data/shards/images
  effvid-data curate --input raw_videos/ --out data/curated --config curation.yaml
  effvid-data inspect data/curated
  effvid-data encode --input data/digits/shards/train --out data/digits/encoded/train experiment=... --skip-text
"""

_DIGITS_HELP = """\
Render handwritten digits (scikit-learn's bundled 8x8 set, no download) moving in one of 8
directions. Writes OUT/train/ and OUT/val/, each holding NNNNNN.mp4 (H.264), NNNNNN.txt
(caption "a handwritten 7 moving up-left") and NNNNNN.json (digit, direction, speed, start,
seed, ...). With --images writes NNNNNN.png stills captioned "a handwritten 7" instead.
Train and val draw from disjoint digit images and seed streams. Deterministic for a seed;
files already written with the same settings are kept, so a re-run is cheap.

example: effvid-data digits --out data/digits --num-videos 2000 --num-val 200 --seed 0
"""

_SHARD_HELP = """\
Pack every *.mp4 in INPUT (sorted) with its NAME.txt caption and NAME.json meta into
WebDataset tar shards (video2dataset layout: KEY.mp4, KEY.txt, KEY.json). Each clip is
decoded to check it; the json gains num_frames, fps, width, height, duration, codec, source
and status. Writes OUT/shard-000000.tar, ..., one OUT/shard-000000.manifest.json per shard
(keys, sources, failed) and OUT/_stats.json. Undecodable videos are reported on stderr and
skipped. Re-running skips finished shards.

example: effvid-data shard --input data/digits/train --out data/shards/train --shard-size 256
"""

_IMAGES_HELP = """\
Like `shard`, for still images: packs every *.jpg / *.jpeg / *.png in INPUT with its
NAME.txt and NAME.json into img2dataset-layout shards (KEY.jpg or KEY.png, KEY.txt, KEY.json
with width, height, original_width, original_height and sha256 of the stored bytes), plus
manifests and OUT/_stats.json. --image-format jpg re-encodes PNGs to JPEG (quality 95).

example: effvid-data images --input data/digit_images/train --out data/shards/images
"""


class UsageError(Exception):
    """Arguments that parse but do not make sense together."""


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="effvid-data",
        description="Make the embedded moving-digits dataset, curate raw videos and write WebDataset shards.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    raw = argparse.RawDescriptionHelpFormatter

    digits = commands.add_parser("digits", help="write moving-digit clips (or stills) with captions", description=_DIGITS_HELP, formatter_class=raw)
    digits.add_argument("--out", required=True, type=Path, help="output folder; gets train/ and val/")
    digits.add_argument("--num-videos", type=_non_negative_int, default=2000, help="training clips (or images with --images) (default 2000)")
    digits.add_argument("--num-val", type=_non_negative_int, default=200, help="validation clips (or images) (default 200)")
    digits.add_argument("--seed", type=int, default=0, help="dataset seed (default 0)")
    digits.add_argument("--canvas", type=_positive_int, default=32, help="frame height and width in pixels, even (default 32)")
    digits.add_argument("--num-frames", type=_positive_int, default=16, help="frames per clip (default 16)")
    digits.add_argument("--fps", type=_positive_int, default=8, help="frames per second (default 8)")
    digits.add_argument("--digit-scale", type=_positive_int, default=2, help="upscaling of the 8x8 digits (default 2: 16x16)")
    digits.add_argument("--images", action="store_true", help="write still images (.png) instead of videos")
    digits.add_argument("--workers", type=_positive_int, default=default_workers(), help="processes (default min(4, CPUs))")

    for name, help_text, description in (
        ("shard", "pack *.mp4 + .txt + .json into WebDataset shards", _SHARD_HELP),
        ("images", "pack *.jpg/*.png + .txt + .json into WebDataset shards", _IMAGES_HELP),
    ):
        sub = commands.add_parser(name, help=help_text, description=description, formatter_class=raw)
        sub.add_argument("--input", required=True, type=Path, help="folder of media files with sidecar .txt/.json")
        sub.add_argument("--out", required=True, type=Path, help="folder for shard-NNNNNN.tar, manifests and _stats.json")
        sub.add_argument("--shard-size", type=_positive_int, default=256, help="inputs per shard (default 256)")
        sub.add_argument("--workers", type=_positive_int, default=default_workers(), help="processes (default min(4, CPUs))")
    commands.choices["shard"].add_argument(
        "--max-decode-pixels", type=_positive_int, default=DEFAULT_MAX_DECODE_PIXELS,
        help="refuse a video whose header declares more pixels than this (width x height x frames), before "
             "decoding it: training would have to (default 2^28 = 268435456)")
    commands.choices["images"].add_argument(
        "--image-format", choices=("keep", "jpg"), default="keep",
        help="keep: store each file's bytes (PNG stays .png); jpg: re-encode to JPEG like img2dataset (default keep)")
    add_curation_commands(commands, _positive_int)
    _add_pairs_parser(commands)
    _add_encode_parser(commands)
    return parser


# --- encode: latents and text embeddings precomputed into shards ---------------------------

_ENCODE_HELP = """\
Precompute what a training run would compute at every step with frozen encoders: the VAE
latents of every frame (paradigm.autoencoder) and the text embeddings of the captions
(paradigm.text_encoder, when frozen), written as KEY.latent.npy, KEY.text.npz, KEY.txt and
KEY.json into one output shard per input shard, plus _encoder.json naming the encoders by
weight fingerprint. The encoders come from the training config, composed from the same
overrides you train with (or from --run's config.yaml); frames are resized to data.size and
data.channels. Train on the result with data=digits_encoded (or data._target_=
datamodules.EncodedShardDataModule data.train_shards=OUT): the run checks that its encoders
are the ones recorded. Re-running keeps finished shards.

examples:
  effvid-data encode --input data/digits/shards/train --out data/digits/encoded/train \\
      experiment=magicvideo +autoencoder=digits paradigm.autoencoder.weights=runs/VAE/checkpoints/last.ckpt --skip-text
  effvid-data encode --input data/digits/shards/train --out data/digits/encoded/train \\
      experiment=lora_t2v pretrained=runs/base-digits
"""


def _add_encode_parser(commands: argparse._SubParsersAction) -> None:
    encode = commands.add_parser("encode", help="precompute VAE latents and text embeddings into shards",
                                 description=_ENCODE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    encode.add_argument("--input", required=True, help="video shards: a folder, a glob or a brace pattern")
    encode.add_argument("--out", required=True, type=Path, help="folder for the encoded shards")
    encode.add_argument("--run", help="take the config from this run (id or folder) instead of the overrides")
    encode.add_argument("--skip-text", action="store_true", help="do not precompute text embeddings")
    encode.add_argument("--dtype", choices=("float16", "float32"), default="float16", help="stored precision (default float16)")
    encode.add_argument("--batch-size", type=_positive_int, default=32, help="clips per encoder batch (default 32)")
    encode.add_argument("--max-frames", type=_positive_int, default=256, help="frames per VAE call (default 256)")
    encode.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    encode.add_argument("--max-decode-pixels", type=_positive_int, default=None,
                        help="skip clips declaring more pixels than this (width x height x frames) before decoding "
                             "(default: the config's data.max_decode_pixels, else 2^28)")
    encode.add_argument("--trust-target", action="append", default=[], metavar="PATH",
                        help="a class of your own that --run's config or a base checkpoint may name as _target_ "
                             "(repeatable); any other target outside effvid's builders is refused")
    encode.add_argument("overrides", nargs="*", help="effvid-train config overrides, e.g. experiment=magicvideo")


def _encode_config(args: argparse.Namespace) -> Any:
    from omegaconf import OmegaConf

    if args.run is not None:
        from experiments.run_dir import find_run_dir, runs_root
        from lit_models.trusted_config import check_trusted

        run_dir = find_run_dir(args.run, runs_root())
        cfg = OmegaConf.merge(OmegaConf.load(run_dir / "config.yaml"), OmegaConf.from_dotlist(args.overrides))
        for key in ("model", "paradigm"):  # what build_model instantiates: a run folder is data
            if cfg.get(key) is not None:
                check_trusted(cfg[key], str(run_dir / "config.yaml"), extra=args.trust_target)
        return cfg
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="experiments.conf", version_base="1.3"):
        return compose("train", overrides=list(args.overrides))


def _run_encode(args: argparse.Namespace) -> None:
    import lightning as L
    import torch
    from hydra.errors import HydraException

    from data_tools.encode import EncodeInputError, encode_shards
    from data_tools.mp4_header import DEFAULT_MAX_DECODE_PIXELS
    from experiments.run_dir import RunError
    from experiments.train import build_model
    from lit_models.trusted_config import UntrustedConfigError, trust_command_line_targets

    trust_command_line_targets(args.trust_target)  # also for a base checkpoint the overrides name
    try:
        cfg = _encode_config(args)
        L.seed_everything(cfg.seed, verbose=False)  # as effvid-train: random-initialised encoders match
        model = build_model(cfg)
    except HydraException as error:
        raise UsageError(f"config: {error}") from None
    except (RunError, UntrustedConfigError) as error:
        raise UsageError(str(error)) from None
    autoencoder = getattr(model, "autoencoder", None)
    text_encoder = None if args.skip_text else getattr(model, "text_encoder", None)
    if text_encoder is not None and getattr(text_encoder, "trainable", False):
        raise UsageError(
            "paradigm.text_encoder is trainable in this config, so its embeddings change as it trains; "
            "pass --skip-text, or freeze it (paradigm.text_encoder.trainable=false)"
        )
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        stats = encode_shards(args.input, args.out, autoencoder, text_encoder, size=cfg.data.get("size"),
                              channels=cfg.data.get("channels", 3), batch_size=args.batch_size,
                              max_frames=args.max_frames, dtype=args.dtype, device=device,
                              num_frames=cfg.data.get("num_frames"), frame_stride=cfg.data.get("frame_stride", 1),
                              max_decode_pixels=args.max_decode_pixels or cfg.data.get("max_decode_pixels",
                                                                                       DEFAULT_MAX_DECODE_PIXELS))
    except EncodeInputError as error:
        raise UsageError(str(error)) from None
    parts = [name for name, module in (("latents", autoencoder), ("text embeddings", text_encoder)) if module is not None]
    print(f"encoded {' and '.join(parts)} of {stats['samples']} samples into {stats['shards']} shards in {args.out} "
          f"({stats['shards_reused']} already done, {stats['skipped']} skipped) in {stats['seconds']:.1f} s")


# --- pairs: preference shards (lit_models/preference.py trains on them) -------------------

_PAIRS_HELP = """\
Write preference-pair shards (KEY.prompt.txt, KEY.win.mp4, KEY.lose.mp4, KEY.json with both
scores) for Diffusion-DPO. Either sample --per-prompt K videos per line of --prompts from an
effvid checkpoint, score them with --reward (digits: digit-classifier agreement with the
prompted digit x motion-direction correctness) and pair the best with the worst (ties are
skipped); or read human judgements from --table, a CSV with columns prompt,win,lose (video
paths relative to the CSV) and optional win_score,lose_score,labeler.

examples:
  effvid-data pairs --ckpt runs/base/checkpoints/last.ckpt --prompts prompts.txt --out data/pairs --per-prompt 4 --reward digits
  effvid-data pairs --table judgements.csv --out data/pairs_human
"""


def _add_pairs_parser(commands: argparse._SubParsersAction) -> None:
    pairs = commands.add_parser("pairs", help="write preference-pair shards (sampled + reward, or a CSV)",
                                description=_PAIRS_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = pairs.add_mutually_exclusive_group(required=True)
    source.add_argument("--ckpt", type=Path, help="effvid checkpoint to sample from (with --prompts)")
    source.add_argument("--table", type=Path, help="CSV of human-labelled pairs: prompt,win,lose")
    pairs.add_argument("--prompts", type=Path, help="text file, one prompt per line (repeats give more pairs)")
    pairs.add_argument("--out", required=True, type=Path, help="folder for shard-NNNNNN.tar and _stats.json")
    pairs.add_argument("--per-prompt", type=_positive_int, default=4, help="samples per prompt (default 4)")
    pairs.add_argument("--reward", default="digits", help="reward ranking the samples (default digits)")
    pairs.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    pairs.add_argument("--batch-size", type=_positive_int, default=64, help="videos per sampling batch (default 64)")
    pairs.add_argument("--steps", type=_positive_int, default=None, help="sampler steps (default: the run's)")
    pairs.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the run's)")
    pairs.add_argument("--shard-size", type=_positive_int, default=256, help="pairs per shard (default 256)")
    pairs.add_argument("--trust-target", action="append", default=[], metavar="PATH",
                       help="a class of your own the checkpoint's config may name as _target_ (repeatable); "
                            "any other target outside effvid's builders is refused (a checkpoint is data)")


def _run_pairs(args: argparse.Namespace) -> None:
    from data_tools.pairs import generate_pairs, pairs_from_table, read_prompts, write_pair_shards
    from lit_models.trusted_config import trust_command_line_targets

    trust_command_line_targets(args.trust_target)
    if args.table is not None:
        pairs = pairs_from_table(args.table)
    else:
        from lit_models.rewards import REWARDS

        if args.prompts is None:
            raise UsageError("--ckpt needs --prompts")
        if args.reward not in REWARDS:
            raise UsageError(f"unknown --reward {args.reward!r}; choose one of {sorted(REWARDS)}")
        pairs = generate_pairs(args.ckpt, read_prompts(args.prompts), args.per_prompt, REWARDS[args.reward],
                               seed=args.seed, batch_size=args.batch_size, steps=args.steps, guidance_scale=args.guidance)
    from lit_models.bundle import BundleError
    from lit_models.trusted_config import UntrustedConfigError

    try:
        stats = write_pair_shards(pairs, args.out, shard_size=args.shard_size)
    except (BundleError, UntrustedConfigError) as error:  # a bad --ckpt surfaces when the first pair is drawn
        raise PairInputError(str(error)) from None
    print(f"wrote {stats['pairs']} pairs to {stats['shards']} shards in {args.out}")


def _run_digits(args: argparse.Namespace) -> None:
    from data_tools.digits import write_digit_images, write_digit_videos

    if args.canvas % 2 and not args.images:
        raise UsageError(f"--canvas must be even for H.264, got {args.canvas}")
    if 8 * args.digit_scale > args.canvas:
        raise UsageError(f"a {8 * args.digit_scale}px digit (--digit-scale {args.digit_scale}) does not fit --canvas {args.canvas}")
    started = time.perf_counter()
    for split, count in (("train", args.num_videos), ("val", args.num_val)):
        out_dir = args.out / split
        if args.images:
            write_digit_images(out_dir, count, args.seed, args.canvas, args.digit_scale, split=split, progress=True, workers=args.workers)
        else:
            write_digit_videos(
                out_dir, count, args.seed, args.canvas, args.num_frames, args.fps, args.digit_scale,
                split=split, progress=True, workers=args.workers,
            )
    kind = "images" if args.images else "clips"
    print(f"wrote {args.num_videos} train and {args.num_val} val {kind} to {args.out} in {time.perf_counter() - started:.1f} s")


def _run_shards(args: argparse.Namespace) -> None:
    from data_tools.shards import shard_images, shard_videos

    if args.command == "images":
        stats = shard_images(args.input, args.out, shard_size=args.shard_size, workers=args.workers, progress=True,
                             image_format=args.image_format)
    else:
        stats = shard_videos(args.input, args.out, shard_size=args.shard_size, workers=args.workers, progress=True,
                             max_decode_pixels=args.max_decode_pixels)
    print(
        f"wrote {stats['written']} of {stats['inputs']} samples to {stats['shards']} shards in {args.out} "
        f"({stats['shards_skipped']} already complete, {stats['failed']} failed) in {stats['seconds']:.1f} s"
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "digits":
            _run_digits(args)
        elif args.command == "curate":
            run_curate(args)
        elif args.command == "inspect":
            run_inspect(args)
        elif args.command == "pairs":
            _run_pairs(args)
        elif args.command == "encode":
            _run_encode(args)
        else:
            _run_shards(args)
    except (UsageError, ShardInputError, PairInputError, ProbeError, CurationConfigError, FileNotFoundError,
            NotADirectoryError, PermissionError) as error:
        print(f"effvid-data {args.command}: error: {error}", file=sys.stderr)
        return 2
    except WriteError as error:  # e.g. a full disk: named once, no temp file left; re-running resumes
        print(f"effvid-data {args.command}: error: {error.strerror}; finished shards are kept, re-run to continue",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
