"""`JointImageVideoDataModule`: one stream of mixed batches from a video and an image datamodule.

Every training batch holds `batch_size` samples; each is an image with probability
`image_ratio`, else a video clip, drawn from a generator seeded by `seed`, so the mix is
reproducible and its ratio holds over many samples (not exactly per batch). The two sources
are any datamodules whose train loaders yield batches (`VideoShardDataModule`,
`ImageShardDataModule`); their batches are split into samples and re-batched here, so no
decoded sample is wasted. Validation is the video datamodule's.

The two sources' loaders run inside this one, so Lightning never sees them: `teardown` shuts
their workers down at the end of a fit (a forgotten worker that ignores SIGTERM would keep
the process from exiting; `ShardLoader` also shuts every loader down at exit).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import lightning
import torch
from torch.utils.data import DataLoader, IterableDataset

Batch = dict[str, Any]


class _SampleQueue:
    """Samples of one source's batches, one at a time; restarts the loader when it ends."""

    def __init__(self, loader: Any, tensor_key: str, prepare: Callable[[Batch, int], Batch] | None = None) -> None:
        self.loader, self.tensor_key, self.prepare = loader, tensor_key, prepare
        self.iterator: Iterator[Batch] | None = None
        self.queue: deque[dict[str, Any]] = deque()

    def _refill(self) -> None:
        for _ in range(2):  # a fresh pass after an exhausted one
            if self.iterator is None:
                self.iterator = iter(self.loader)
            try:
                batch = next(self.iterator)
            except StopIteration:
                self.iterator = None
                continue
            if self.prepare is not None:
                batch = self.prepare(batch, 0)
            keys = [k for k in ("caption", "key", "meta") if k in batch]
            for i in range(len(batch[self.tensor_key])):
                self.queue.append({self.tensor_key: batch[self.tensor_key][i], **{k: batch[k][i] for k in keys}})
            return
        raise RuntimeError(f"the {self.tensor_key} loader yields no batches")

    def take(self, count: int) -> list[dict[str, Any]]:
        while len(self.queue) < count:
            self._refill()
        return [self.queue.popleft() for _ in range(count)]


class MixedBatches(IterableDataset):
    """Endless mixed batches `{"video": (Bv, C, F, H, W), "caption", "key", "meta",
    "image": (Bi, C, H, W), "image_caption", "image_key"}` with Bv + Bi = batch_size."""

    def __init__(self, video_loader: Any, image_loader: Any, image_ratio: float, batch_size: int, seed: int,
                 prepare_video: Callable[[Batch, int], Batch] | None = None) -> None:
        self.video_loader, self.image_loader, self.prepare_video = video_loader, image_loader, prepare_video
        self.image_ratio, self.batch_size, self.seed = image_ratio, batch_size, seed

    def __iter__(self) -> Iterator[Batch]:
        generator = torch.Generator().manual_seed(self.seed)
        videos, images = _SampleQueue(self.video_loader, "video", self.prepare_video), _SampleQueue(self.image_loader, "image")
        template: torch.Tensor | None = None
        while True:
            num_images = int((torch.rand(self.batch_size, generator=generator) < self.image_ratio).sum())
            clip_samples = videos.take(self.batch_size - num_images)
            image_samples = images.take(num_images)
            if clip_samples:
                template = clip_samples[0]["video"]
            elif template is None:  # need a clip's shape for an empty video tensor
                template = videos.take(1)[0]["video"]
            yield {
                "video": torch.stack([s["video"] for s in clip_samples]) if clip_samples
                else template.new_empty((0, *template.shape)),
                "caption": [s.get("caption", "") for s in clip_samples],
                "key": [s.get("key") for s in clip_samples],
                "meta": [s.get("meta") for s in clip_samples],
                "image": torch.stack([s["image"] for s in image_samples]) if image_samples
                else template.new_empty((0, template.shape[0], *template.shape[2:])),
                "image_caption": [s.get("caption", "") for s in image_samples],
                "image_key": [s.get("key") for s in image_samples],
            }


class JointImageVideoDataModule(lightning.LightningDataModule):
    """Mix a video and an image datamodule's training data at `image_ratio` (of samples).

    Args:
        video: datamodule of clips (`batch["video"]`); also provides validation.
        images: datamodule of images (`batch["image"]`).
        image_ratio: probability that a sample of a batch is an image, in [0, 1].
        batch_size: samples per mixed batch (images + clips).
        seed: seed of the mixing draws.
    """

    def __init__(
        self,
        video: lightning.LightningDataModule,
        images: lightning.LightningDataModule,
        image_ratio: float = 0.25,
        batch_size: int = 16,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not 0.0 <= image_ratio <= 1.0:
            raise ValueError(f"JointImageVideoDataModule: image_ratio must be in [0, 1], got {image_ratio}")
        self.video, self.images = video, images
        self.image_ratio, self.batch_size, self.seed = image_ratio, batch_size, seed
        self._source_loaders: list[Any] = []

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        # The video datamodule's move (a shard datamodule's keeps a CPU batch as it is).
        return self.video.transfer_batch_to_device(batch, device, dataloader_idx)

    def setup(self, stage: str | None = None) -> None:
        for datamodule in (self.video, self.images):
            datamodule.trainer = getattr(self, "trainer", None)
            datamodule.setup(stage)

    def train_dataloader(self) -> DataLoader:
        self._shut_down_sources()
        self._source_loaders = [self.video.train_dataloader(), self.images.train_dataloader()]
        # The video loader yields uint8 frames; they become float clips here, before the mix.
        mixed = MixedBatches(*self._source_loaders, self.image_ratio, self.batch_size, self.seed,
                             prepare_video=self.video.on_after_batch_transfer)
        return DataLoader(mixed, batch_size=None, num_workers=0)

    def teardown(self, stage: str) -> None:
        self._shut_down_sources()

    def _shut_down_sources(self) -> None:
        for loader in self._source_loaders:
            if hasattr(loader, "shutdown"):
                loader.shutdown()
        self._source_loaders = []

    def val_dataloader(self) -> Any:
        return self.video.val_dataloader()

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Validation batches are the video datamodule's: its conversion (uint8 frames -> float clip)."""
        return self.video.on_after_batch_transfer(batch, dataloader_idx)
