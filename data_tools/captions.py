"""Where a video's caption comes from: a sidecar file, a column of a table, or nowhere.

Unlabeled video is a first-class case: with `source: none` (or a missing sidecar / empty
table cell) the caption is "" and the sample json says `caption_missing: true`. A caption
that is not UTF-8 fails its input with the file named, rather than writing mojibake.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from data_tools.curation_config import CaptionsConfig


class CaptionError(ValueError):
    """A caption source that cannot be read (not UTF-8, bad JSON, missing column)."""


def read_sidecar_caption(video: str | Path) -> str | None:
    """`NAME.txt`, else the "caption" (or "text") field of `NAME.json`, else None."""
    video = Path(video)
    text_path, json_path = video.with_suffix(".txt"), video.with_suffix(".json")
    if text_path.is_file():
        try:
            return text_path.read_bytes().decode("utf-8").strip()
        except UnicodeDecodeError as error:
            raise CaptionError(f"caption {text_path.name} is not UTF-8 (byte {error.start})") from error
    if json_path.is_file():
        try:
            meta = json.loads(json_path.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise CaptionError(f"sidecar {json_path.name} is not UTF-8 JSON: {error}") from error
        if isinstance(meta, dict):
            for field in ("caption", "text"):
                if isinstance(meta.get(field), str):
                    return meta[field].strip()
    return None


def read_table(path: str | Path, columns: list[str]) -> list[dict[str, str | None]]:
    """Rows of a CSV (or, with pyarrow installed, parquet) table, only `columns`; a missing
    column raises naming the table and the columns it has."""
    path = Path(path)
    if not path.is_file():
        raise CaptionError(f"table {path} does not exist")
    if path.suffix.lower() == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as error:
            raise CaptionError(f"table {path} is parquet; install pyarrow to read it, or use CSV") from error
        table = pq.read_table(path)
        have = table.column_names
        rows = table.to_pylist()
    else:
        try:
            with open(path, newline="", encoding="utf-8") as stream:
                reader = csv.DictReader(stream)
                have = list(reader.fieldnames or [])
                rows = list(reader)
        except UnicodeDecodeError as error:
            raise CaptionError(f"table {path} is not UTF-8 (byte {error.start})") from error
    missing = [c for c in columns if c not in have]
    if missing:
        raise CaptionError(f"table {path} has no column {missing[0]!r} (columns: {', '.join(have)})")
    return [{c: (None if row.get(c) in (None, "") else str(row[c])) for c in columns} for row in rows]


def table_captions(config: CaptionsConfig, relative_to: Path | None = None) -> dict[str, str | None]:
    """{resolved video path: caption or None} from `config.table`."""
    table = Path(config.table or "")
    base = relative_to or table.parent
    rows = read_table(table, [config.path_column, config.caption_column])
    captions = {}
    for row in rows:
        if row[config.path_column] is None:
            continue
        video = Path(row[config.path_column])
        captions[str((base / video).resolve() if not video.is_absolute() else video)] = row[config.caption_column]
    return captions
