"""Run by tests/test_ddp_data.py: Lightning DDP on CPU (2 processes, gloo) over the shards in
argv[1] (bucketed by the JSON table argv[4], if given); every rank writes the keys of each
training batch it got to argv[2]/rank-R.json, their shapes to argv[2]/shapes-R.json, and
the `data/skipped_samples` it last logged (summed across ranks) to argv[2]/skipped-R.json."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning as L
import torch

from datamodules import VideoShardDataModule
from experiments.run_callbacks import DataHealthLogger


class KeyRecorder(L.LightningModule):
    def __init__(self, out: Path) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)
        self.out = out
        self.keys: dict[int, list[list[str]]] = {}
        self.shapes: dict[int, list[list[int]]] = {}

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.keys.setdefault(self.current_epoch, []).append(list(batch["key"]))
        self.shapes.setdefault(self.current_epoch, []).append(list(batch["video"].shape[2:]))
        return self.layer(batch["video"].mean(dim=(1, 2, 3, 4)).unsqueeze(1)).pow(2).mean()

    def on_train_end(self) -> None:
        (self.out / f"rank-{self.global_rank}.json").write_text(json.dumps(self.keys))
        (self.out / f"shapes-{self.global_rank}.json").write_text(json.dumps(self.shapes))
        logged = self.trainer.callback_metrics.get("data/skipped_samples")
        local = self.trainer.datamodule.num_skipped_samples
        (self.out / f"skipped-{self.global_rank}.json").write_text(
            json.dumps({"logged": None if logged is None else float(logged), "local": local}))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


if __name__ == "__main__":
    shards, out, num_workers = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    buckets = json.loads(sys.argv[4]) if len(sys.argv) > 4 else None  # a bucket table, as JSON
    datamodule = VideoShardDataModule(shards, batch_size=2, num_workers=num_workers, num_frames=2,
                                      frame_stride=1, size=8, shuffle_buffer=4, buckets=buckets)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[DataHealthLogger()], log_every_n_steps=1)
    trainer.fit(KeyRecorder(out), datamodule=datamodule)
