"""Image-text then unlabeled video (Make-A-Video's recipe), in three stages.

- `clip` (`ClipPretraining`): open_clip's image and text towers trained contrastively on
  image-caption shards, so that on the offline default the embeddings mean something. With
  real pretrained CLIP weights this stage is skipped and the weights are named instead.
- `t2i` (`ImageTextToVideo(stage="t2i")`): the U-Net's spatial layers learn to generate an
  image from its CLIP image embedding, on image-caption shards. Images are one-frame clips, so
  every temporal op is the identity and receives no gradient. A small prior (text embedding ->
  image embedding) can be trained beside it on the same pairs.
- `video` (`ImageTextToVideo(stage="video")`): loads the t2i checkpoint (temporal ops still at
  their identity init) and trains on uncaptioned clips, conditioned on the CLIP image
  embedding of one frame of the clip; the spatial layers are frozen or get a lower LR.

At inference the condition is the CLIP text embedding of the prompt (the shared space), or
the prior's image embedding predicted from it.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import lightning as L
import torch
import torch.nn.functional as F
from open_clip import ClipLoss
from torch import Tensor, nn

from data_tools.digits import image_caption_for
from lit_models.checkpoint_weights import entries_under, load_into, read_state_dict
from lit_models.conditioning import OpenClipEmbedder
from lit_models.diffusion import DiffusionModule
from lit_models.forward_process import Conditioning
from lit_models.objectives import DenoisingLoss, Losses

STAGES = ("t2i", "video")


class ClipPretraining(L.LightningModule):
    """The `clip` stage: open_clip's contrastive loss over image-caption batches.

    Validation reports `val/zero_shot_accuracy`: how often an image's nearest caption among
    the ten digit captions ("a handwritten 0" ... "a handwritten 9") is its own.

    Args:
        clip: a trainable `OpenClipEmbedder`.
        optimizer: partial taking the parameters.
        net: ignored (effvid-train passes the model config's net, null for this stage).
    """

    def __init__(self, clip: OpenClipEmbedder, optimizer: Callable[..., torch.optim.Optimizer], net: nn.Module | None = None) -> None:
        super().__init__()
        if not clip.trainable:
            raise ValueError("ClipPretraining: the clip stage needs clip.trainable=true")
        self.clip = clip
        self.optimizer_factory = optimizer
        self.loss = ClipLoss()

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        images, texts = self.clip.encode_image(batch["image"]), self.clip.encode_text(batch["caption"])
        loss = self.loss(images, texts, self.clip.model.logit_scale.exp())
        self.log("train/loss", loss, prog_bar=True, batch_size=images.shape[0])
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        captions = [image_caption_for(d) for d in range(10)]
        similarity = self.clip.encode_image(batch["image"]) @ self.clip.encode_text(captions).T  # (B, 10)
        predicted = [captions[i] for i in similarity.argmax(dim=1).tolist()]
        accuracy = sum(p == c for p, c in zip(predicted, batch["caption"])) / len(predicted)
        self.log("val/zero_shot_accuracy", accuracy, batch_size=len(predicted))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.optimizer_factory([p for p in self.parameters() if p.requires_grad])


class EmbeddingPrior(nn.Module):
    """Make-A-Video's prior, reduced to an MLP: CLIP text embedding -> CLIP image embedding
    (L2-normalised). The paper's prior is a diffusion transformer; this keeps the interface."""

    def __init__(self, embed_dim: int, hidden: int = 256) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(embed_dim, hidden), nn.SiLU(), nn.Linear(hidden, embed_dim))

    def forward(self, text_embedding: Tensor) -> Tensor:
        return F.normalize(text_embedding + self.mlp(text_embedding), dim=-1)


def is_temporal_parameter(name: str) -> bool:
    """Parameters of the temporal ops of a `FactorizedUNet` (`...stage.temporal.*`)."""
    return ".temporal." in f".{name}"


class DenoisingAndPriorLoss(DenoisingLoss):
    """The denoising loss plus, in the t2i stage's training, the prior's loss (weighted)."""

    def __init__(self, prior_loss_weight: float = 1.0) -> None:
        super().__init__()
        self.prior_loss_weight = prior_loss_weight

    def forward(self, module: Any, batch: dict[str, Any], stage: str, generator: torch.Generator | None) -> Losses:
        losses, batch_size = super().forward(module, batch, stage, generator)
        if stage != "train" or module.stage != "t2i" or module.prior is None:
            return losses, batch_size
        prior_loss = module.prior_loss(batch)
        loss = losses["loss"] + self.prior_loss_weight * prior_loss
        return {"loss": loss, "diffusion_loss": losses["loss"], "prior_loss": prior_loss}, batch_size


class ImageTextToVideo(DiffusionModule):
    """The `t2i` and `video` stages of Make-A-Video on the shared diffusion core.

    Args:
        net: the factorized U-Net (context_dim = pooled_dim = the CLIP embedding width).
        clip: frozen `OpenClipEmbedder` (the clip stage's weights, or pretrained ones).
        stage: "t2i" (image batches, `batch["image"]`) or "video" (clip batches, captions unused).
        init_from: checkpoint to start from; for the video stage, the t2i run's checkpoint.
        freeze_spatial: video stage, train only the temporal ops.
        spatial_lr_scale: video stage without freezing, the spatial layers' LR factor.
        prior: optional `EmbeddingPrior`, trained in the t2i stage, used at inference.
        prior_loss_weight: weight of the prior's MSE in the t2i loss.
        cfg_dropout: probability of a zero (unconditional) embedding in training.
        **text_to_video: `DiffusionModule` arguments besides `text_encoder` (validation sampling,
            video_shape, ...); prompts are embedded with CLIP's text tower.
    """

    def __init__(
        self,
        net: nn.Module,
        clip: OpenClipEmbedder,
        stage: str = "t2i",
        init_from: str | None = None,
        freeze_spatial: bool = True,
        spatial_lr_scale: float = 0.1,
        prior: EmbeddingPrior | None = None,
        prior_loss_weight: float = 1.0,
        **text_to_video: Any,
    ) -> None:
        if stage not in STAGES:
            raise ValueError(f"ImageTextToVideo: stage must be one of {STAGES}, got {stage!r}")
        super().__init__(net=net, text_encoder=None, objective=DenoisingAndPriorLoss(prior_loss_weight), **text_to_video)
        if clip.trainable:
            raise ValueError("ImageTextToVideo: clip must be frozen (clip.trainable=false); train it in the clip stage")
        self.clip = clip
        self.prior = prior
        self.stage = stage
        self.freeze_spatial = freeze_spatial
        self.spatial_lr_scale = spatial_lr_scale
        if init_from is not None:
            self.load_stage_checkpoint(init_from)
        if stage == "video":
            if prior is not None:
                prior.requires_grad_(False)
            if freeze_spatial:
                for name, parameter in self.net.named_parameters():
                    parameter.requires_grad_(is_temporal_parameter(name))

    def load_stage_checkpoint(self, path: str) -> None:
        """The net (and prior) of an earlier stage's checkpoint; the CLIP stays as configured."""
        state = read_state_dict(path, "ImageTextToVideo", "init_from takes an earlier stage's checkpoint")
        net_state, prior_state = entries_under(state, "net."), entries_under(state, "prior.")
        if not net_state:
            raise ValueError(f"ImageTextToVideo: {path} holds no net.* weights")
        load_into(self.net, net_state, path, "ImageTextToVideo")
        if self.prior is not None and prior_state:
            load_into(self.prior, prior_state, path, "ImageTextToVideo")

    # --- conditioning -------------------------------------------------------------------
    @staticmethod
    def as_conditioning(embedding: Tensor) -> Conditioning:
        # One context token plus the pooled vector: the same embedding drives cross-attention
        # and the ResBlocks' scale/shift.
        return {"context": embedding[:, None], "pooled": embedding}

    def encode_captions(self, captions: Sequence[str]) -> Conditioning:
        """Inference conditioning from text (through the prior when there is one); the empty
        caption is the zero embedding the net saw under CFG dropout."""
        embedding = self.clip.encode_text(list(captions))
        if self.prior is not None:
            embedding = self.prior(embedding)
        empty = torch.tensor([c == "" for c in captions], device=embedding.device)
        return self.as_conditioning(embedding.masked_fill(empty[:, None], 0.0))

    def clean_data(self, batch: dict[str, Any], key: str = "video") -> Tensor:
        """x0 `(B, C, F, H, W)` in diffusion space: images as one-frame clips in the t2i stage."""
        return self.encode_data(batch["image"][:, :, None] if self.stage == "t2i" else batch["video"])

    def image_embedding(self, batch: dict[str, Any], train: bool) -> Tensor:
        if self.stage == "t2i":
            return self.clip.encode_image(batch["image"])
        videos = batch["video"]  # (B, C, F, H, W)
        # A random frame in training (any frame's embedding must lead to the clip), the middle
        # one at validation.
        frames = (
            torch.randint(0, videos.shape[2], (videos.shape[0],), device=videos.device)
            if train
            else torch.full((videos.shape[0],), videos.shape[2] // 2, device=videos.device)
        )
        return self.clip.encode_image(videos[torch.arange(videos.shape[0]), :, frames])

    def condition(self, batch: dict[str, Any], drop: bool) -> Conditioning:
        embedding = self.image_embedding(batch, train=drop)
        if drop and self.cfg_dropout > 0:
            keep = (torch.rand(embedding.shape[0], device=embedding.device) >= self.cfg_dropout).to(embedding.dtype)
            embedding = embedding * keep[:, None]
        return self.as_conditioning(embedding)

    # --- training -----------------------------------------------------------------------
    def prior_loss(self, batch: dict[str, Any]) -> Tensor:
        """The prior's MSE from the caption's text embedding to the image's embedding."""
        target = self.clip.encode_image(batch["image"])
        return F.mse_loss(self.prior(self.clip.encode_text(list(batch["caption"]))), target)

    def parameter_groups(self) -> list[Tensor] | list[dict[str, Any]]:
        """Video stage without freezing: the spatial layers at `spatial_lr_scale` x the LR."""
        if self.stage == "t2i" or self.freeze_spatial:
            return super().parameter_groups()
        base_lr = self.optimizer_factory.keywords["lr"]
        named = [(n, p) for n, p in self.net.named_parameters() if p.requires_grad]
        return [
            {"params": [p for n, p in named if is_temporal_parameter(n)]},
            {"params": [p for n, p in named if not is_temporal_parameter(n)], "lr": base_lr * self.spatial_lr_scale},
        ]
