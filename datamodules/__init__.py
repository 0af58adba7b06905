"""Lightning data modules over WebDataset shards."""

from datamodules.encoded_shards import EncodedShardDataModule
from datamodules.video_shards import VideoShardDataModule

__all__ = ["EncodedShardDataModule", "VideoShardDataModule"]
