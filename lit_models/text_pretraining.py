"""Contrastive caption-clip pretraining of a text tower: the embedded default's stand-in for a
pretrained CLIP text encoder.

A text-to-video model conditioned on a tiny random text tower trained with it learns the
digits several times more slowly than one given the (digit, direction) labels directly, and
training the tower with the denoising loss erodes what it says about direction (measured in
`benchmarks/motion_diagnosis.py probe`). Real systems condition on a text encoder pretrained
contrastively and keep it frozen (Stable Diffusion, ModelScope, AnimateDiff); here the tower
is trained with CLIP's objective (open_clip's `ClipLoss`) against a small clip encoder trained
beside it, on the same caption-clip shards, in about a minute on a CPU. Its checkpoint is
then named as `paradigm.text_encoder.weights` of the video model.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import lightning as L
import torch
import torch.nn.functional as F
from open_clip import ClipLoss
from torch import Tensor, nn

from lit_models.conditioning import OpenClipTextEncoder
from lit_models.metrics import DIRECTIONS, parse_digit_caption


class CaptionClipPretraining(L.LightningModule):
    """CLIP's contrastive loss between the pooled text feature of each caption and the
    embedding of its clip.

    Validation reports how often a held-out clip's nearest caption among all 80 digit captions
    names its digit (`val/digit_accuracy`), its direction (`val/direction_accuracy`) and both
    (`val/caption_accuracy`).

    Args:
        text_encoder: a trainable `OpenClipTextEncoder` (the tower to pretrain).
        video_encoder: clips `(B, C, F, H, W)` -> `(B, D)` with D the tower's pooled width.
        optimizer: partial taking the parameters.
        net: ignored (effvid-train passes the model config's net, null for this stage).
    """

    def __init__(
        self,
        text_encoder: OpenClipTextEncoder,
        video_encoder: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        net: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if not text_encoder.trainable:
            raise ValueError("CaptionClipPretraining: the text tower must be trainable (text_encoder.trainable=true)")
        self.text_encoder = text_encoder
        self.video_encoder = video_encoder
        self.optimizer_factory = optimizer
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's initial temperature
        self.loss = ClipLoss()
        self.captions = [f"a handwritten {digit} moving {direction}" for digit in range(10) for direction in DIRECTIONS]

    def embed(self, videos: Tensor, captions: list[str]) -> tuple[Tensor, Tensor]:
        """L2-normalised clip and caption embeddings, `(B, D)` each."""
        return F.normalize(self.video_encoder(videos), dim=-1), F.normalize(self.text_encoder.encode(captions).pooled, dim=-1)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        videos, texts = self.embed(batch["video"], list(batch["caption"]))
        loss = self.loss(videos, texts, self.logit_scale.exp().clamp(max=100))
        self.log("train/loss", loss, prog_bar=True, batch_size=len(videos))
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        videos, texts = self.embed(batch["video"], self.captions)
        nearest = [parse_digit_caption(self.captions[i]) for i in (videos @ texts.T).argmax(dim=1).tolist()]
        truth = [parse_digit_caption(c) for c in batch["caption"]]
        size = len(truth)
        self.log("val/caption_accuracy", sum(n == t for n, t in zip(nearest, truth)) / size, batch_size=size)
        self.log("val/digit_accuracy", sum(n[0] == t[0] for n, t in zip(nearest, truth)) / size, batch_size=size)
        self.log("val/direction_accuracy", sum(n[1] == t[1] for n, t in zip(nearest, truth)) / size, batch_size=size)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.optimizer_factory([p for p in self.parameters() if p.requires_grad])
