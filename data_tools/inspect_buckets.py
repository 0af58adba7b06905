"""`effvid-data inspect DIR --buckets CONFIG`: how a shard folder falls into a bucket table,
before a run: clips and batches per bucket, and the clips that fit none, by name."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from datamodules.bucket_batches import clips_per_bucket, scan_shard
from datamodules.buckets import BucketTable


def load_bucket_table(config: str | Path) -> BucketTable:
    """The table of a YAML file with a `buckets:` list (a data config, e.g. experiments/conf/data/
    X.yaml, with `max_upscale` and `frame_stride` read from it too)."""
    path = Path(config)
    if not path.is_file():
        raise FileNotFoundError(f"--buckets {path}: no such file")
    loaded = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    if not isinstance(loaded, dict) or "buckets" not in loaded:
        raise ValueError(f"--buckets {path}: no `buckets:` list in it")
    return BucketTable(loaded["buckets"] or [], float(loaded.get("max_upscale", 1.0)),
                       stride=int(loaded.get("frame_stride", 1)))


def bucket_report(shard_dir: str | Path, table: BucketTable, show_unfit: int = 10) -> str:
    """A text table: per bucket, its clips, their share, its share of the batches and the
    batches an epoch gives (`clips / batch_size` for the bucket the weights limit); then the
    clips that fit no bucket."""
    tars = sorted(Path(shard_dir).glob("*.tar"))
    if not tars:
        raise FileNotFoundError(f"no *.tar shards in {shard_dir}")
    scans = [scan_shard(str(tar), table) for tar in tars]
    clips = clips_per_bucket(scans, len(table))
    unfit = [clip for scan in scans for clip in scan.unfit]
    weights = table.batch_weights(clips)
    total = sum(clips) + len(unfit)
    # the epoch ends when the bucket that runs out first (for its batch share) runs out
    mean_batch = table.mean_batch_size(weights)
    epoch_batches = min((n / (w * b.batch_size) for n, w, b in zip(clips, weights, table) if w > 0), default=0)
    lines = [f"buckets of {shard_dir} ({total} clips, frame stride {table.stride}, max upscale {table.max_upscale:g}):",
             f"{'bucket (FxHxW)':<16} {'batch':>5} {'clips':>7} {'of clips':>8} {'of batches':>10}"]
    for bucket, n, weight in zip(table, clips, weights):
        lines.append(f"{bucket.name:<16} {bucket.batch_size:>5} {n:>7} {n / max(total, 1):>8.1%} {weight:>10.1%}")
    lines.append(f"{'fit none':<16} {'':>5} {len(unfit):>7} {len(unfit) / max(total, 1):>8.1%}")
    lines.append(f"mean batch {mean_batch:.2f} clips; one pass over the scarcest bucket's clips is "
                 f"{int(epoch_batches)} batches")
    for clip in unfit[:show_unfit]:
        lines.append(f"  fits no bucket: {clip}")
    if len(unfit) > show_unfit:
        lines.append(f"  ... and {len(unfit) - show_unfit} more")
    return "\n".join(lines)
