"""The curation config: one dataclass per stage, loaded from YAML with unknown keys rejected.

`effvid-data curate --config curation.yaml` merges the file over these defaults (OmegaConf
structured config), so a typo such as `clips.max_second` fails naming the key and the file.
Every threshold that is `null` only records its score in the sample json; a set bound drops
clips outside it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException


@dataclass
class CutsConfig:
    detector: str = "content"  # content | adaptive | none (one clip per input)
    threshold: float = 27.0  # ContentDetector threshold (video2dataset 27, Panda-70M 25)
    adaptive_threshold: float = 3.0  # AdaptiveDetector ratio to the rolling average
    min_scene_frames: int = 15  # no two cuts closer than this (source frames)
    width: int = 128  # cut detection runs on frames downscaled to this width


@dataclass
class ClipsConfig:
    min_seconds: float = 2.0  # shorter scenes are dropped
    max_seconds: float = 10.0  # longer scenes are split into consecutive clips of this length
    strategy: str = "all"  # all | first | longest: which clips of an input to keep
    fps: float | None = 24.0  # output frame rate (null: keep the source's)
    short_side: int | None = 256  # output short side in pixels, never upscaled (null: keep)
    crf: int = 23  # H.264 quality of the re-encoded clips
    preset: str = "medium"  # libx264 speed preset: ultrafast .. veryslow (faster = larger files)
    max_decode_pixels: int | None = 2**28  # a source frame, and a clip at output size, over this many
    # pixels (width x height [x frames]) is refused before decoding (null: no limit)


@dataclass
class BoundsConfig:
    min: float | None = None
    max: float | None = None


@dataclass
class FiltersConfig:
    # Mean Farneback flow magnitude, in % of the frame width per output frame; `min` drops
    # static clips, `max` drops jittery ones (camera shake, flashes).
    motion: BoundsConfig = field(default_factory=lambda: BoundsConfig(min=0.1, max=20.0))
    # Variance of the Laplacian of the grayscale keyframes at output size (higher is sharper).
    sharpness: BoundsConfig = field(default_factory=lambda: BoundsConfig(min=50.0))
    # Mean luma of the keyframes, 0..255.
    brightness: BoundsConfig = field(default_factory=lambda: BoundsConfig(min=10.0, max=245.0))
    motion_width: int = 128  # optical flow runs on frames downscaled to this width
    motion_pairs: int = 8  # frame pairs (evenly spaced) that the motion score averages
    # Fraction of the frame covered by text, via an OCR package when one is installed
    # (easyocr); without one the score is skipped with a note in the summary.
    text_area: BoundsConfig = field(default_factory=BoundsConfig)
    ocr: bool = False


@dataclass
class ClipScoreConfig:
    # open_clip architecture and weights (a tag or a local file). Unset: CLIP scores are
    # skipped with a note in the run summary (weights are never downloaded implicitly).
    model: str | None = None
    pretrained: str | None = None  # null with a model: random weights (for tests only)
    model_config: str | None = None  # JSON file of an open_clip model config, for custom architectures
    # A linear aesthetic head over the image embedding (.pt/.pth/.safetensors holding
    # `weight` (1, D) and `bias` (1,)), e.g. the LAION aesthetic predictor's last layer.
    aesthetic_head: str | None = None
    similarity: BoundsConfig = field(default_factory=BoundsConfig)  # cosine, caption vs frames
    aesthetic: BoundsConfig = field(default_factory=BoundsConfig)


@dataclass
class DedupConfig:
    enabled: bool = True
    # Two clips are duplicates when every keyframe pHash (64 bit) differs in at most this
    # many bits; the first clip in input order is kept.
    max_distance: int = 6


@dataclass
class CaptionsConfig:
    source: str = "sidecar"  # sidecar (NAME.txt / NAME.json "caption") | table | none
    table: str | None = None  # CSV (or parquet with pyarrow) with path + caption columns
    path_column: str = "path"
    caption_column: str = "caption"


@dataclass
class CurationConfig:
    cuts: CutsConfig = field(default_factory=CutsConfig)
    clips: ClipsConfig = field(default_factory=ClipsConfig)
    filters: FiltersConfig = field(default_factory=FiltersConfig)
    clip_score: ClipScoreConfig = field(default_factory=ClipScoreConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    captions: CaptionsConfig = field(default_factory=CaptionsConfig)
    inputs_per_shard: int = 16  # shard i holds the clips of inputs i*N .. (i+1)*N-1
    # A shard's tar rolls over to shard-NNNNNN_01.tar, ... past this many clips or bytes.
    shard_max_samples: int | None = None
    shard_max_bytes: int | None = None


class CurationConfigError(ValueError):
    """A curation config file or value that cannot be used, naming the key."""


_CHOICES = {
    "cuts.detector": ("content", "adaptive", "none"),
    "clips.strategy": ("all", "first", "longest"),
    "captions.source": ("sidecar", "table", "none"),
}


def _check(config: CurationConfig, origin: str) -> None:
    for dotted, choices in _CHOICES.items():
        section, name = dotted.split(".")
        value = getattr(getattr(config, section), name)
        if value not in choices:
            raise CurationConfigError(f"{origin}: {dotted} must be one of {'/'.join(choices)}, got {value!r}")
    clips = config.clips
    if not 0 < clips.min_seconds <= clips.max_seconds:
        raise CurationConfigError(
            f"{origin}: need 0 < clips.min_seconds <= clips.max_seconds, got {clips.min_seconds} and {clips.max_seconds}"
        )
    if clips.fps is not None and clips.fps <= 0:
        raise CurationConfigError(f"{origin}: clips.fps must be positive or null, got {clips.fps}")
    if clips.short_side is not None and clips.short_side < 2:
        raise CurationConfigError(f"{origin}: clips.short_side must be at least 2 or null, got {clips.short_side}")
    if config.inputs_per_shard < 1:
        raise CurationConfigError(f"{origin}: inputs_per_shard must be at least 1, got {config.inputs_per_shard}")
    if config.captions.source == "table" and not config.captions.table:
        raise CurationConfigError(f"{origin}: captions.source is 'table' but captions.table names no file")


def load_curation_config(path: str | Path | None = None, overrides: list[str] | None = None) -> CurationConfig:
    """Defaults, then the YAML file at `path`, then dotted `overrides` ("clips.fps=8")."""
    origin = str(path) if path is not None else "curation defaults"
    schema = OmegaConf.structured(CurationConfig)
    try:
        merged = schema
        if path is not None:
            if not Path(path).is_file():
                raise CurationConfigError(f"curation config {path} does not exist")
            merged = OmegaConf.merge(merged, OmegaConf.load(path))
        if overrides:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
            origin += f" + {' '.join(overrides)}"
        config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as error:
        # OmegaConf names the offending key ("Key 'max_second' not in 'ClipsConfig'").
        first_line = str(error).strip().splitlines()[0]
        raise CurationConfigError(f"{origin}: {first_line}") from error
    assert isinstance(config, CurationConfig)
    _check(config, origin)
    return config


def config_to_dict(config: CurationConfig) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(config))  # type: ignore[return-value]
