"""Preference pairs as WebDataset shards: `KEY.prompt.txt`, `KEY.win.mp4`, `KEY.lose.mp4`,
`KEY.json` (both scores and where the pair came from).

Two sources: samples of a trained model ranked by a reward (`generate_pairs`: K samples per
prompt, the best against the worst, ties skipped), or a table of human judgements
(`pairs_from_table`: a CSV with `prompt,win,lose` columns naming video files).
"""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_tools.atomic_files import STORAGE_ERRNOS, write_atomic, write_error
from data_tools.shards import STATS_NAME, TAR_MTIME, shard_name


class PairInputError(ValueError):
    """A prompt file, pair table or its videos are missing or malformed."""


@dataclass
class PreferencePair:
    prompt: str
    win: bytes  # mp4
    lose: bytes  # mp4
    meta: dict[str, Any] = field(default_factory=dict)


def read_prompts(path: str | Path) -> list[str]:
    """Non-empty lines of a text file; repeated lines give more pairs for that prompt."""
    path = Path(path)
    if not path.is_file():
        raise PairInputError(f"prompt file {path} does not exist")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise PairInputError(f"prompt file {path} is not UTF-8 text (byte {error.start}); save it as UTF-8") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise PairInputError(f"prompt file {path} has no prompts")
    return prompts


def write_pair_shards(pairs: Iterable[PreferencePair], out_dir: str | Path, shard_size: int = 256) -> dict[str, Any]:
    """Write pairs to `out_dir/shard-NNNNNN.tar` (each via a temp name and a rename) plus
    `_stats.json`. Returns the stats."""
    import webdataset as wds

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob("shard-*.tar*"):
        stale.unlink()
    started, count, shards = time.perf_counter(), 0, 0
    writer = stream = tmp = None

    def close() -> None:
        nonlocal writer, shards
        if writer is not None:
            writer.close()
            stream.close()
            tmp.replace(tmp.with_suffix(""))  # .tar.tmp -> .tar
            shards += 1
            writer = None

    try:
        for pair in pairs:
            if count % shard_size == 0:
                close()
                tmp = out_dir / f"{shard_name(count // shard_size)}.tar.tmp"
                stream = open(tmp, "wb")
                writer = wds.TarWriter(stream, encoder=False, mtime=TAR_MTIME)
            writer.write({
                "__key__": f"{count:08d}",
                "prompt.txt": pair.prompt.encode("utf-8"),
                "win.mp4": pair.win,
                "lose.mp4": pair.lose,
                "json": json.dumps(pair.meta, sort_keys=True).encode("utf-8"),
            })  # fmt: skip
            count += 1
        close()
    except BaseException as error:
        if writer is not None:
            try:
                writer.close()
                stream.close()
            except OSError:
                pass
            tmp.unlink(missing_ok=True)
        if isinstance(error, OSError) and error.errno in STORAGE_ERRNOS and tmp is not None:
            raise write_error(error, tmp.with_suffix("")) from error
        raise
    stats = {"pairs": count, "shards": shards, "shard_size": shard_size, "seconds": round(time.perf_counter() - started, 3)}
    write_atomic(out_dir / STATS_NAME, json.dumps(stats, indent=1) + "\n")
    return stats


def best_and_worst(scores: Sequence[float], min_margin: float = 0.0) -> tuple[int, int] | None:
    """Indices of the highest and lowest score, or None when they differ by <= `min_margin`."""
    best = max(range(len(scores)), key=lambda i: scores[i])
    worst = min(range(len(scores)), key=lambda i: scores[i])
    return None if scores[best] - scores[worst] <= min_margin else (best, worst)


def generate_pairs(
    ckpt: str | Path,
    prompts: Sequence[str],
    per_prompt: int,
    reward: Callable[..., Any],
    seed: int = 0,
    batch_size: int = 64,
    steps: int | None = None,
    guidance_scale: float | None = None,
    fps: float = 4.0,
    progress: bool = True,
) -> Iterable[PreferencePair]:
    """Sample `per_prompt` videos per prompt from an effvid checkpoint, score them with
    `reward(videos, prompts) -> (N,)`, and yield best-vs-worst pairs (ties skipped)."""
    import torch

    from data_tools.video_io import encode_mp4
    from lit_models.bundle import load_run_module
    from lit_models.video_logging import to_uint8_frames

    if per_prompt < 2:
        raise PairInputError(f"--per-prompt must be at least 2 to make a pair, got {per_prompt}")
    module = load_run_module(ckpt)
    expanded = [p for p in prompts for _ in range(per_prompt)]  # prompt-major: K in a row
    videos, scores = [], []
    with torch.inference_mode():
        for index, start in enumerate(range(0, len(expanded), batch_size)):
            chunk = expanded[start : start + batch_size]
            batch = module.generate(chunk, steps=steps, guidance_scale=guidance_scale, seed=seed + index)
            videos.append(batch)
            scores.append(reward(batch, chunk))
            if progress:
                print(f"effvid-data pairs: sampled {start + len(chunk)}/{len(expanded)}", flush=True)
    videos_all, scores_all = torch.cat(videos), torch.cat(scores).tolist()
    frames = to_uint8_frames(videos_all)  # (N, F, H, W, 3)
    for p_index, prompt in enumerate(prompts):
        group = range(p_index * per_prompt, (p_index + 1) * per_prompt)
        chosen = best_and_worst([scores_all[i] for i in group])
        if chosen is None:
            continue
        win, lose = group[chosen[0]], group[chosen[1]]
        yield PreferencePair(
            prompt=prompt,
            win=encode_mp4(frames[win], fps=fps),
            lose=encode_mp4(frames[lose], fps=fps),
            meta={
                "win_score": scores_all[win], "lose_score": scores_all[lose],
                "scores": [scores_all[i] for i in group], "source": str(ckpt), "label": "reward", "seed": seed,
            },
        )  # fmt: skip


def pairs_from_table(table: str | Path) -> Iterable[PreferencePair]:
    """Human-labelled pairs from a CSV with columns `prompt,win,lose` (video paths, relative
    to the table's folder) and optionally `win_score,lose_score,labeler`."""
    table = Path(table)
    if not table.is_file():
        raise PairInputError(f"pair table {table} does not exist")
    try:
        with open(table, newline="", encoding="utf-8") as stream:
            reader = csv.DictReader(stream)
            missing = {"prompt", "win", "lose"} - set(reader.fieldnames or [])
            if missing:
                raise PairInputError(f"pair table {table} lacks columns {sorted(missing)} (has {reader.fieldnames})")
            rows = list(reader)
    except UnicodeDecodeError as error:
        raise PairInputError(f"pair table {table} is not UTF-8 text (byte {error.start}); save it as UTF-8") from None
    for line, row in enumerate(rows, start=2):
        videos = {}
        for side in ("win", "lose"):
            path = table.parent / row[side]
            if not path.is_file():
                raise PairInputError(f"{table}:{line}: {side} video {path} does not exist")
            videos[side] = path.read_bytes()
        meta = {"label": "human", "table": str(table), "row": line, "win_path": row["win"], "lose_path": row["lose"]}
        for key in ("win_score", "lose_score"):
            if row.get(key):
                meta[key] = float(row[key])
        if row.get("labeler"):
            meta["labeler"] = row["labeler"]
        yield PreferencePair(prompt=row["prompt"].strip(), win=videos["win"], lose=videos["lose"], meta=meta)
