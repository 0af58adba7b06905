"""Lightning data modules over WebDataset shards."""

from datamodules.video_shards import VideoShardDataModule

__all__ = ["VideoShardDataModule"]
