"""`effvid-data inspect`: what is in a shard folder, as numbers and pictures.

Reads the tars with the standard library (media bytes, txt and json members only), so it
also works on shards written by video2dataset or img2dataset (json-only entries of failed
downloads are counted, not shown).
"""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

MEDIA_EXTENSIONS = ("mp4", "jpg", "jpeg", "png", "webp")
# The sample-json fields summarised, besides every entry of "scores".
NUMERIC_FIELDS = ("duration", "num_frames", "fps", "width", "height")
HISTOGRAM_FIELDS = ("duration", "scores.motion", "scores.sharpness", "scores.brightness",
                    "scores.clip_similarity", "scores.aesthetic")


@dataclass
class InspectReport:
    shards: int = 0
    samples: int = 0
    captioned: int = 0
    json_only: int = 0  # failed-sample entries (video2dataset / img2dataset)
    per_shard: list[int] = field(default_factory=list)
    values: dict[str, list[float]] = field(default_factory=dict)
    sheet_samples: list[tuple[str, str, bytes, dict[str, Any]]] = field(default_factory=list)
    text: str = ""


def _members(tar_path: Path):  # -> Iterator[(key, {ext: bytes})]
    """Samples of one tar in order, grouped by key (the name up to the first dot)."""
    current, parts = None, {}
    with tarfile.open(tar_path) as tar:
        for member in tar:
            if not member.isfile():
                continue
            name = member.name.rsplit("/", 1)[-1]
            key, _, ext = name.partition(".")
            if key != current and current is not None:
                yield current, parts
                parts = {}
            current = key
            parts[ext.lower()] = tar.extractfile(member).read()
    if current is not None:
        yield current, parts


def _numbers(meta: dict[str, Any]) -> dict[str, float]:
    out = {name: float(meta[name]) for name in NUMERIC_FIELDS if isinstance(meta.get(name), (int, float))}
    for name, value in (meta.get("scores") or {}).items():
        if isinstance(value, (int, float)):
            out[f"scores.{name}"] = float(value)
    return out


def _middle_frame(ext: str, data: bytes) -> np.ndarray:
    if ext == "mp4":
        from data_tools.video_io import decode_mp4

        frames = decode_mp4(data)  # (F, H, W, 3)
        return frames[len(frames) // 2]
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def _contact_sheet(report: InspectReport, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    count = len(report.sheet_samples)
    cols = min(4, max(count, 1))
    rows = max(1, -(-count // cols))
    figure, axes = plt.subplots(rows, cols, figsize=(3 * cols, 2.6 * rows), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for axis, (key, ext, data, meta) in zip(axes.flat, report.sheet_samples):
        try:
            axis.imshow(_middle_frame(ext, data))
        except Exception as error:  # noqa: BLE001 - an undecodable sample is shown as such
            axis.text(0.5, 0.5, f"cannot decode:\n{type(error).__name__}", ha="center", va="center")
        scores = " ".join(f"{k[:4]} {v:.3g}" for k, v in (meta.get("scores") or {}).items() if isinstance(v, (int, float)))
        axis.set_title(f"{key}\n{scores}", fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)


def _histograms(report: InspectReport, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in HISTOGRAM_FIELDS if report.values.get(n)] or sorted(report.values)[:4]
    figure, axes = plt.subplots(1, max(len(names), 1), figsize=(3.2 * max(len(names), 1), 2.6), squeeze=False)
    for axis, name in zip(axes[0], names):
        axis.hist(report.values[name], bins=20, color="tab:blue")
        axis.set_title(name, fontsize=9)
    if not names:
        axes[0, 0].text(0.5, 0.5, "no numeric fields", ha="center")
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)


def _format(report: InspectReport, shard_dir: Path, out_dir: Path) -> str:
    lines = [
        f"{shard_dir}: {report.shards} shards, {report.samples} samples "
        f"({report.captioned} with a caption), {report.json_only} failed-sample entries without media",
    ]
    if report.per_shard:
        lines.append(f"samples per shard: min {min(report.per_shard)}, median {int(np.median(report.per_shard))}, max {max(report.per_shard)}")
    if report.values:
        lines.append(f"{'field':<24} {'count':>6} {'min':>9} {'median':>9} {'mean':>9} {'max':>9}")
        for name in sorted(report.values):
            v = np.asarray(report.values[name])
            lines.append(f"{name:<24} {len(v):>6} {v.min():>9.4g} {np.median(v):>9.4g} {v.mean():>9.4g} {v.max():>9.4g}")
    stats_path = shard_dir / "_stats.json"
    if stats_path.is_file():
        stats = json.loads(stats_path.read_text(encoding="utf-8"))
        if "dropped_by" in stats:
            dropped = ", ".join(f"{k} {v}" for k, v in stats["dropped_by"].items()) or "none"
            lines.append(f"curation: {stats.get('inputs')} inputs, {stats.get('inputs_failed', 0)} failed, dropped clips: {dropped}")
        lines += [f"note: {note}" for note in stats.get("notes", [])]
    lines.append(f"wrote {out_dir / 'contact_sheet.png'} and {out_dir / 'histograms.png'}")
    return "\n".join(lines)


def inspect_shards(shard_dir: str | Path, out_dir: str | Path | None = None, num_samples: int = 16) -> InspectReport:
    """Count and summarise every sample of the `*.tar` shards in `shard_dir`, and draw the
    contact sheet and histograms into `out_dir` (default `shard_dir/_inspect`)."""
    shard_dir = Path(shard_dir)
    tars = sorted(shard_dir.glob("*.tar"))
    if not tars:
        raise FileNotFoundError(f"no *.tar shards in {shard_dir}")
    out_dir = Path(out_dir) if out_dir is not None else shard_dir / "_inspect"
    out_dir.mkdir(parents=True, exist_ok=True)
    report = InspectReport(shards=len(tars))
    candidates = []
    for tar_path in tars:
        in_shard = 0
        for key, parts in _members(tar_path):
            ext = next((e for e in MEDIA_EXTENSIONS if e in parts), None)
            if ext is None:
                report.json_only += 1
                continue
            in_shard += 1
            try:
                meta = json.loads(parts.get("json", b"{}"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                meta = {}
            if parts.get("txt", b"").strip():
                report.captioned += 1
            for name, value in _numbers(meta).items():
                report.values.setdefault(name, []).append(value)
            candidates.append((tar_path, key))
        report.samples += in_shard
        report.per_shard.append(in_shard)

    # Evenly spaced samples for the sheet; read again so only those bytes stay in memory.
    picks = np.linspace(0, len(candidates) - 1, num=min(num_samples, len(candidates))).round().astype(int)
    chosen = {candidates[i] for i in picks} if candidates else set()
    for tar_path in tars:
        if not any(t == tar_path for t, _ in chosen):
            continue
        for key, parts in _members(tar_path):
            if (tar_path, key) in chosen:
                ext = next(e for e in MEDIA_EXTENSIONS if e in parts)
                try:
                    meta = json.loads(parts.get("json", b"{}"))
                except (UnicodeDecodeError, json.JSONDecodeError):
                    meta = {}
                report.sheet_samples.append((key, ext, parts[ext], meta))
    _contact_sheet(report, out_dir / "contact_sheet.png")
    _histograms(report, out_dir / "histograms.png")
    report.text = _format(report, shard_dir, out_dir)
    return report
