"""Turn a shard spec (directory, brace pattern, glob, or a list of them) into tar paths."""

from __future__ import annotations

import glob
from collections.abc import Sequence
from pathlib import Path

import braceexpand

ShardSpec = str | Path | Sequence[str | Path]


def _resolve_one(spec: str) -> list[str]:
    path = Path(spec)
    if path.is_dir():
        # Only tars are shards; manifests and _stats.json sit beside them.
        tars = sorted(str(p) for p in path.glob("*.tar"))
        if not tars:
            raise ValueError(f"no *.tar shards in directory {path}")
        return tars
    if any(ch in spec for ch in "*?["):
        matches = sorted(glob.glob(spec))
        tars = [m for m in matches if Path(m).is_file()]
        if not tars:
            raise FileNotFoundError(f"shard glob {spec} matches no files")
        return tars
    expanded = list(braceexpand.braceexpand(spec))
    missing = [p for p in expanded if not Path(p).is_file()]
    if missing:
        # A spec without a file suffix was meant as a directory; otherwise name the folder
        # when it is the folder that is missing.
        if len(expanded) == 1 and not path.suffix:
            raise FileNotFoundError(f"shard directory {path} does not exist")
        parent = Path(missing[0]).parent
        if not parent.is_dir():
            raise FileNotFoundError(f"shard directory {parent} does not exist (from spec {spec})")
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise FileNotFoundError(f"shard file {missing[0]} does not exist{more} (from spec {spec})")
    return expanded


def resolve_shards(spec: ShardSpec) -> list[str]:
    """Expand `spec` into a list of existing shard paths, in a stable order.

    A directory gives all its `*.tar` sorted; a brace pattern (`dir/shard-{000000..000009}.tar`)
    and a glob are expanded; a list concatenates its entries in order. Every path must exist,
    so a typo fails here rather than as a silently shorter epoch.
    """
    specs = [spec] if isinstance(spec, (str, Path)) else list(spec)
    if not specs:
        raise ValueError("empty shard list")
    urls: list[str] = []
    for one in specs:
        urls.extend(_resolve_one(str(one)))
    duplicates = sorted({u for u in urls if urls.count(u) > 1})
    if duplicates:
        raise ValueError(f"shard {duplicates[0]} is listed more than once; samples would repeat")
    return urls


def check_enough_shards(num_shards: int, num_workers: int, world_size: int, where: str) -> None:
    """Fail when some data-loader worker would get no shard.

    Shards are split first by rank, then by worker, so each of `max(num_workers, 1) x world_size`
    readers needs at least one shard; otherwise webdataset starves the extra readers.
    """
    readers = max(num_workers, 1) * world_size
    if num_shards < readers:
        raise ValueError(
            f"{num_shards} shards in {where} but num_workers x world_size = "
            f"{max(num_workers, 1)} x {world_size} = {readers}; lower data.num_workers or write "
            "more, smaller shards (effvid-data shard --shard-size)"
        )
