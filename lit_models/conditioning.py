"""Conditioning: open_clip text and image embeddings, and known frames (masked-frame
conditioning).

Text conditioning goes through open_clip's text tower (`OpenClipTextEncoder`), or through a
whole CLIP whose image and text embeddings share one space (`OpenClipEmbedder`).

Three ways to get a text tower, one interface:

- `pretrained="laion2b_s34b_b79k"` (with a `model_name`): open_clip's real loading path,
  for users who have the weights;
- `model_name` alone: that architecture, randomly initialised (no download);
- `text_cfg` + `embed_dim`: a tiny randomly initialised tower trained with the video model,
  what the tests and the CPU quickstart use.

The tokenizer is open_clip's BPE tokenizer, whose vocabulary ships inside the package.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from open_clip.model import _build_text_tower
from open_clip.tokenizer import SimpleTokenizer
from open_clip.transformer import TextTransformer
from torch import Tensor, nn

from lit_models.checkpoint_weights import load_into, load_prefixed_weights

# Parts of a `CLIP` model that make up its text tower; their state-dict keys are the same as
# a standalone `TextTransformer`'s.
_CLIP_TEXT_PARTS = ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection")

# Captions whose token ids a CaptionTokenCache keeps (~1 KB each at a 77-token context); a
# stream of ever-new captions empties the cache when it fills instead of growing it.
TOKEN_CACHE_SIZE = 65536


class CaptionTokenCache:
    """A tokenizer's ids `(B, L)` for captions, each distinct caption tokenized once.

    A caption's ids depend on it alone, and training repeats captions (the moving digits have
    80): BPE over them again every step is 2-4 % of the text stage's step.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._ids: dict[str, Tensor] = {}  # caption -> (L,) ids

    def __len__(self) -> int:
        return len(self._ids)

    def __call__(self, captions: list[str]) -> Tensor:
        captions = list(captions)
        if not captions:
            return self.tokenizer(captions)
        unique = list(dict.fromkeys(captions))
        new = [caption for caption in unique if caption not in self._ids]
        if new:
            if len(self._ids) + len(new) > TOKEN_CACHE_SIZE:
                self._ids.clear()
                new = unique
            self._ids.update(zip(new, self.tokenizer(new)))
        return torch.stack([self._ids[caption] for caption in captions])  # (B, L)


@dataclass
class TextEmbedding:
    tokens: Tensor  # (B, L, token_dim) per-token features after the final LayerNorm
    pooled: Tensor | None  # (B, pooled_dim) open_clip's pooled, projected text feature; None: the family has none
    mask: Tensor | None  # (B, L) bool, True = real token (start, words, end); None: the denoiser takes no mask


def _named_text_tower(model_name: str, pretrained: str | None) -> TextTransformer:
    config = open_clip.get_model_config(model_name)
    if config is None:
        raise ValueError(f"OpenClipTextEncoder: unknown open_clip model_name {model_name!r}")
    tower = _build_text_tower(
        config["embed_dim"], dict(config["text_cfg"], output_tokens=True), quick_gelu=config.get("quick_gelu", False)
    )
    if not isinstance(tower, TextTransformer):
        raise ValueError(f"OpenClipTextEncoder: {model_name!r} has a Hugging Face text tower; only open_clip's own is supported")
    if pretrained is None:
        return tower
    model = open_clip.create_model(model_name, pretrained=pretrained)
    if isinstance(getattr(model, "text", None), TextTransformer):  # CustomTextCLIP keeps its tower whole
        tower.load_state_dict(model.text.state_dict())
    else:  # CLIP spreads the tower's parts over the model
        state = {k: v for k, v in model.state_dict().items() if k.split(".")[0] in _CLIP_TEXT_PARTS}
        tower.load_state_dict(state)
    return tower


class OpenClipTextEncoder(nn.Module):
    """Captions -> per-token features, pooled feature and padding mask, via open_clip.

    Args:
        model_name: open_clip architecture, e.g. "ViT-B-32" (also picks the tokenizer).
        pretrained: open_clip pretrained tag; loads the weights (a download unless cached).
        text_cfg: open_clip `CLIPTextCfg` fields for a random-initialised tower, e.g.
            `dict(width=64, layers=2, heads=4, context_length=16, vocab_size=49408)`;
            takes precedence over `model_name`.
        embed_dim: width of the pooled feature for `text_cfg` towers.
        trainable: train the tower with the model; otherwise it is frozen, kept in eval mode
            and run without gradients.
        freeze_token_embedding: when trainable, keep the 49408-row token table fixed. On a
            CPU, AdamW's dense update of that table costs more than the rest of a tiny tower;
            random fixed token vectors stay distinguishable and the layers above learn.
        weights: a checkpoint whose `text_encoder.*` entries are this tower (the caption-clip
            pretraining stage, `lit_models/text_pretraining.py`), loaded after building it.
        caption_projection: a trainable residual MLP on the tower's token and pooled features,
            trained with the video model even when the tower is frozen (PixArt-alpha's caption
            projection over frozen T5). Zero-initialised output: at step 0 the features are the
            tower's own.
    """

    def __init__(
        self,
        model_name: str | None = "ViT-B-32",
        pretrained: str | None = None,
        text_cfg: dict[str, Any] | None = None,
        embed_dim: int | None = None,
        trainable: bool = False,
        freeze_token_embedding: bool = False,
        weights: str | None = None,
        caption_projection: bool = False,
    ) -> None:
        super().__init__()
        if text_cfg is not None:
            if embed_dim is None:
                raise ValueError("OpenClipTextEncoder: text_cfg needs embed_dim (the pooled feature width)")
            if pretrained is not None:
                raise ValueError("OpenClipTextEncoder: give either text_cfg (random tower) or pretrained, not both")
            self.text = _build_text_tower(embed_dim, dict(text_cfg, output_tokens=True))
            self.tokenizer = SimpleTokenizer(context_length=self.text.context_length)
        elif model_name is not None:
            self.text = _named_text_tower(model_name, pretrained)
            self.tokenizer = open_clip.get_tokenizer(model_name, context_length=self.text.context_length)
        else:
            raise ValueError("OpenClipTextEncoder: needs model_name or text_cfg")
        self._token_ids = CaptionTokenCache(self.tokenizer)
        vocab_size = getattr(self.tokenizer, "vocab_size", None) or len(self.tokenizer.encoder)
        if self.text.vocab_size < vocab_size:
            raise ValueError(
                f"OpenClipTextEncoder: text tower vocab_size={self.text.vocab_size} is smaller than the "
                f"tokenizer's vocabulary ({vocab_size})"
            )
        if weights is not None:
            self.load_pretrained(weights)
        self.trainable = trainable
        if not trainable:
            self.requires_grad_(False)
            self.eval()
        elif freeze_token_embedding:
            self.text.token_embedding.requires_grad_(False)
        # Built after the freeze above: the projection always trains.
        self.token_projection = _ResidualProjection(self.token_dim) if caption_projection else None
        self.pooled_projection = _ResidualProjection(self.pooled_dim) if caption_projection else None

    def load_pretrained(self, path: str) -> None:
        """Load the tower from a checkpoint's `text_encoder.text.*` entries."""
        hint = "a digits_text_pretraining run writes it: effvid-train experiment=digits_text_pretraining run_id=NAME"
        state = load_prefixed_weights(path, "text_encoder.text.", "OpenClipTextEncoder", hint)
        load_into(self.text, state, path, "OpenClipTextEncoder")

    @property
    def token_dim(self) -> int:
        return self.text.width

    @property
    def pooled_dim(self) -> int:
        return self.text.output_dim if self.text.text_projection is not None else self.text.width

    @property
    def context_length(self) -> int:
        return self.text.context_length

    def train(self, mode: bool = True) -> OpenClipTextEncoder:
        # A frozen tower stays in eval mode whatever the LightningModule around it does.
        super().train(mode and self.trainable)
        for projection in (getattr(self, "token_projection", None), getattr(self, "pooled_projection", None)):
            if projection is not None:  # None also while __init__ runs, before they exist
                projection.train(mode)
        return self

    def tokenize(self, captions: list[str]) -> Tensor:
        """Token ids `(B, L)`, padded with the tower's pad id, truncated to its context length."""
        return self._token_ids(captions)

    def forward(self, tokens: Tensor) -> TextEmbedding:
        # tokens: (B, L) int64
        with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
            pooled, features = self.text(tokens)  # (B, P), (B, L, D)
        if self.token_projection is not None:
            features, pooled = self.token_projection(features), self.pooled_projection(pooled)
        return TextEmbedding(tokens=features, pooled=pooled, mask=tokens != self.text.pad_id)

    def encode(self, captions: list[str]) -> TextEmbedding:
        """Tokenize on the CPU and embed on the module's device."""
        device = next(self.parameters()).device
        return self(self.tokenize(captions).to(device))


class _ResidualProjection(nn.Module):
    """x + MLP(x), the MLP's output layer zero-initialised."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, width))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.mlp(x)


class OpenClipEmbedder(nn.Module):
    """A whole open_clip CLIP (image and text towers) giving embeddings in one shared space:
    Make-A-Video's decoder is trained on image embeddings and driven by text embeddings.

    Three ways to get a model, one interface:

    - `model_name` + `pretrained`: open_clip's real loading path, for users with the weights;
    - `embed_dim` + `vision_cfg` + `text_cfg`: a tiny random-initialised CLIP, what the
      embedded default trains contrastively first (`ClipPretraining`, the `clip` stage);
    - either, plus `weights`: a checkpoint of that stage (`runs/RUN_ID/checkpoints/last.ckpt`).

    Images come in the data range [-1, 1], 1 or 3 channels; they are resized to the tower's
    input size and normalised with CLIP's mean and std. Embeddings are L2-normalised.

    Args:
        trainable: train the towers (the clip stage); otherwise frozen and in eval mode.
        freeze_token_embedding: when trainable, keep the 49408-row token table fixed (its
            dense AdamW update dominates a tiny tower's step on a CPU).
    """

    def __init__(
        self,
        model_name: str | None = None,
        pretrained: str | None = None,
        embed_dim: int | None = None,
        vision_cfg: dict[str, Any] | None = None,
        text_cfg: dict[str, Any] | None = None,
        weights: str | None = None,
        trainable: bool = False,
        freeze_token_embedding: bool = True,
    ) -> None:
        super().__init__()
        if vision_cfg is not None or text_cfg is not None:
            if embed_dim is None or vision_cfg is None or text_cfg is None:
                raise ValueError("OpenClipEmbedder: a random CLIP needs embed_dim, vision_cfg and text_cfg")
            self.model = open_clip.CLIP(embed_dim, dict(vision_cfg), dict(text_cfg))
            self.tokenizer = SimpleTokenizer(context_length=self.model.context_length)
        elif model_name is not None:
            self.model = open_clip.create_model(model_name, pretrained=pretrained)
            self.tokenizer = open_clip.get_tokenizer(model_name)
        else:
            raise ValueError("OpenClipEmbedder: needs model_name or embed_dim + vision_cfg + text_cfg")
        self._token_ids = CaptionTokenCache(self.tokenizer)
        if weights is not None:
            self.load_stage_weights(weights)
        size = self.model.visual.image_size
        self.image_size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        self.register_buffer("mean", torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1), persistent=False)
        self.trainable = trainable
        if not trainable:
            self.requires_grad_(False)
            self.eval()
        elif freeze_token_embedding:
            self.model.token_embedding.requires_grad_(False)

    def load_stage_weights(self, path: str) -> None:
        """Load the CLIP of a clip-stage checkpoint (its `clip.model.*` entries)."""
        state = load_prefixed_weights(path, "clip.model.", "OpenClipEmbedder", "weights= takes a clip-stage checkpoint")
        load_into(self.model, state, path, "OpenClipEmbedder")

    @property
    def embed_dim(self) -> int:
        return int(self.model.text_projection.shape[1])

    def train(self, mode: bool = True) -> OpenClipEmbedder:
        return super().train(mode and self.trainable)

    def encode_image(self, images: Tensor) -> Tensor:
        """L2-normalised image embeddings `(B, D)` of images `(B, C, H, W)` in [-1, 1]."""
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        if tuple(images.shape[-2:]) != self.image_size:
            images = F.interpolate(images, size=self.image_size, mode="bilinear", antialias=True, align_corners=False)
        pixels = ((images + 1) / 2 - self.mean) / self.std
        with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
            return F.normalize(self.model.encode_image(pixels), dim=-1)

    def encode_text(self, captions: list[str]) -> Tensor:
        """L2-normalised text embeddings `(B, D)`."""
        tokens = self._token_ids(captions).to(self.model.logit_scale.device)
        with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
            return F.normalize(self.model.encode_text(tokens), dim=-1)


# --- masked-frame conditioning ---------------------------------------------------------

FRAME_MASK_MODES = ("none", "image_to_video", "prediction", "interpolation")


def random_frame_masks(
    batch_size: int,
    num_frames: int,
    modes: tuple[str, ...] = FRAME_MASK_MODES,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Known-frame masks `(B, F)` bool for training, one mode drawn uniformly per clip:
    `none` (unconditional generation), `image_to_video` (first frame known), `prediction`
    (a random prefix of 1..F-1 frames known: video prediction and autoregressive extension)
    and `interpolation` (every other frame known, random phase: temporal upsampling)."""
    unknown = set(modes) - set(FRAME_MASK_MODES)
    if unknown or not modes:
        raise ValueError(f"random_frame_masks: unknown modes {sorted(unknown)}; choose from {FRAME_MASK_MODES}")
    masks = torch.zeros(batch_size, num_frames, dtype=torch.bool)
    frames = torch.arange(num_frames)
    for row, choice in enumerate(torch.randint(0, len(modes), (batch_size,), generator=generator).tolist()):
        mode = modes[choice]
        if mode == "image_to_video":
            masks[row, 0] = True
        elif mode == "prediction" and num_frames > 1:
            masks[row, : int(torch.randint(1, num_frames, (1,), generator=generator))] = True
        elif mode == "interpolation" and num_frames > 1:
            masks[row] = frames % 2 == int(torch.randint(0, 2, (1,), generator=generator))
    return masks


class MaskedFrameConditioning(nn.Module):
    """Wrap a denoiser so that known frames and their mask are concatenated to its noisy
    input along channels: `net(cat[x_t, known * mask, mask])` (Make-A-Video's and Video LDM's
    interpolation, LVDM's prediction and long-video extension, image-to-video).

    The wrapped net takes `2 C + 1` input channels and predicts `C`. Without `known` (plain
    generation) the mask is all zeros, the case training teaches with the `none` mode.

    Args:
        net: the denoiser, built with `in_channels = 2 * channels + 1`, `out_channels = channels`.
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(
        self, x: Tensor, timesteps: Tensor, known: Tensor | None = None, known_mask: Tensor | None = None, **conditioning: Any
    ) -> Tensor:
        # x, known: (B, C, F, H, W); known_mask: (B, F) bool, True = frame given
        batch_size, _, num_frames, height, width = x.shape
        if known is None or known_mask is None:
            known = torch.zeros_like(x)
            known_mask = torch.zeros(batch_size, num_frames, dtype=torch.bool, device=x.device)
        mask = known_mask.to(x.dtype)[:, None, :, None, None].expand(batch_size, 1, num_frames, height, width)
        return self.net(torch.cat([x, known * mask, mask], dim=1), timesteps, **conditioning)
