"""Text conditioning of a pretrained diffusers pipeline, computed by the pipeline's own code.

A LoRA trained on other text features than the pipeline gives it at inference is trained on
the wrong input: CLIP pads with `<|endoftext|>` (49407) where open_clip pads with 0, T5
families cut at 120 / 128 / 226 / 512 tokens, Wan zeroes the features past each caption's
end, LTX-Video passes a token mask. Rather than re-implementing each rule,
`PipelinePromptEncoder` builds the family's pipeline around the transformers text encoder and
tokenizer alone (every other component None) and calls its `encode_prompt`, so the features
are exactly the pipeline's, and stay so when diffusers changes a rule.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

from lit_models.conditioning import TextEmbedding


Features = tuple[Tensor, Tensor | None, Tensor | None]  # tokens (B, L, D), pooled (B, P), mask (B, L)


def _sd_prompt(pipe: Any, prompts: list[str], device: torch.device, max_length: int) -> Features:
    # StableDiffusion / AnimateDiff / TextToVideoSD: (prompt, device, num_images_per_prompt, do_cfg)
    return pipe.encode_prompt(prompts, device, 1, False)[0], None, None


def _t5_prompt(pipe: Any, prompts: list[str], device: torch.device, max_length: int) -> Features:
    # CogVideoX / Wan: (embeds, negative); the transformer gets no mask
    embeds = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, max_sequence_length=max_length, device=device)[0]
    return embeds, None, None


def _t5_masked_prompt(pipe: Any, prompts: list[str], device: torch.device, max_length: int) -> Features:
    # LTX-Video: (embeds, mask, negative, negative mask); the mask goes to the transformer
    embeds, mask, _, _ = pipe.encode_prompt(
        prompts, do_classifier_free_guidance=False, max_sequence_length=max_length, device=device
    )
    return embeds, None, mask.bool()


def _latte_prompt(pipe: Any, prompts: list[str], device: torch.device, max_length: int) -> Features:
    # Latte: mask_feature=True would cut every batch to its longest caption; effvid trains on the
    # fixed-length features, which LattePipeline(..., mask_feature=False) gives at inference.
    embeds, _ = pipe.encode_prompt(
        prompts, do_classifier_free_guidance=False, device=device, clean_caption=False, mask_feature=False
    )
    return embeds, None, None


def _hunyuan_prompt(pipe: Any, prompts: list[str], device: torch.device, max_length: int) -> Features:
    # HunyuanVideo: Llama features of a chat template (mask) and CLIP's pooled feature
    embeds, pooled, mask = pipe.encode_prompt(prompts, device=device, max_sequence_length=max_length)
    return embeds, pooled, mask.bool()


# pipeline class name -> how its encode_prompt is called
PROMPT_CALLS: dict[str, Callable[..., Features]] = {
    "StableDiffusionPipeline": _sd_prompt,
    "AnimateDiffPipeline": _sd_prompt,
    "TextToVideoSDPipeline": _sd_prompt,
    "CogVideoXPipeline": _t5_prompt,
    "WanPipeline": _t5_prompt,
    "LTXPipeline": _t5_masked_prompt,
    "LattePipeline": _latte_prompt,
    "HunyuanVideoPipeline": _hunyuan_prompt,
}


class PipelinePromptEncoder(nn.Module):
    """Captions -> the pipeline's prompt features `(B, L, D)` (and token mask where the family
    passes one), from the folder's transformers text encoder and tokenizer. Always frozen.

    Args:
        pipeline_class: the diffusers pipeline class whose `encode_prompt` defines the features.
        text_encoder, tokenizer: the folder's components.
        max_length: tokens per caption (the family's default at inference, e.g. 226 for
            CogVideoX, 128 for LTX-Video, 512 for Wan; the tokenizer's for CLIP families).
        text_encoder_2, tokenizer_2: a second encoder where the family has one (HunyuanVideo's CLIP).
    """

    trainable = False

    def __init__(self, pipeline_class: type, text_encoder: nn.Module, tokenizer: Any, max_length: int,
                 text_encoder_2: nn.Module | None = None, tokenizer_2: Any = None) -> None:
        super().__init__()
        name = pipeline_class.__name__
        if name not in PROMPT_CALLS:
            raise ValueError(f"PipelinePromptEncoder: no prompt encoding known for {name}; supported: {sorted(PROMPT_CALLS)}")
        self.text_encoder = text_encoder.requires_grad_(False).eval()
        self.tokenizer = tokenizer
        self.text_encoder_2 = None if text_encoder_2 is None else text_encoder_2.requires_grad_(False).eval()
        self.tokenizer_2 = tokenizer_2
        self.max_length = int(max_length)
        self.pipeline_class = pipeline_class
        self._call = PROMPT_CALLS[name]
        self._pipeline: Any = None

    def _text_pipeline(self) -> Any:
        """The family's pipeline holding only the text components (built on first use)."""
        if self._pipeline is None:
            import inspect

            names = [p for p in inspect.signature(self.pipeline_class.__init__).parameters if p != "self"]
            text = self.pipeline_components()
            components: dict[str, Any] = {n: None for n in names if n not in text}
            if "requires_safety_checker" in components:
                components["requires_safety_checker"] = False
            for optional in ("boundary_ratio", "expand_timesteps"):
                components.pop(optional, None)
            self._pipeline = self.pipeline_class(**text, **components)
            self._pipeline.set_progress_bar_config(disable=True)
        return self._pipeline

    def pipeline_components(self) -> dict[str, Any]:
        """The text components under the pipeline's names (to build the pipeline)."""
        parts = {"text_encoder": self.text_encoder, "tokenizer": self.tokenizer}
        if self.text_encoder_2 is not None:
            parts.update(text_encoder_2=self.text_encoder_2, tokenizer_2=self.tokenizer_2)
        return parts

    def __getstate__(self) -> dict[str, Any]:  # the cached pipeline is rebuilt, never copied
        return {**self.__dict__, "_pipeline": None}

    @property
    def token_dim(self) -> int:
        config = self.text_encoder.config
        return int(getattr(config, "d_model", None) or config.hidden_size)

    @property
    def pooled_dim(self) -> int:
        return 0 if self.text_encoder_2 is None else int(self.text_encoder_2.config.hidden_size)

    @property
    def context_length(self) -> int:
        return self.max_length

    def train(self, mode: bool = True) -> PipelinePromptEncoder:
        return super().train(False)

    @torch.no_grad()
    def encode(self, captions: list[str]) -> TextEmbedding:
        device = next(self.text_encoder.parameters()).device
        tokens, pooled, mask = self._call(self._text_pipeline(), list(captions), device, self.max_length)
        return TextEmbedding(tokens=tokens, pooled=pooled, mask=mask)
