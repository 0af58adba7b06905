"""CLIP text-video similarity and aesthetic score with open_clip, for the curation filters.

Only built when the config names a model (`clip_score.model`); weights come from
`clip_score.pretrained` (an open_clip tag already in the local cache, or a file), never from
an implicit download. One model per worker process, built on first use.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from data_tools.curation_config import ClipScoreConfig
from data_tools.filters import keyframe_indices


def _load_head(path: str) -> tuple[torch.Tensor, torch.Tensor]:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    try:
        return state["weight"].float(), state["bias"].float()  # (1, D), (1,)
    except KeyError as error:
        raise ValueError(f"aesthetic head {path} needs 'weight' (1, D) and 'bias' (1,) tensors") from error


class ClipScorer:
    """Scores a clip `(F, H, W, 3)` uint8 against its caption with an open_clip model."""

    def __init__(self, config: ClipScoreConfig) -> None:
        import open_clip

        if config.model_config:
            open_clip.add_model_config(Path(config.model_config))
        self.model, _, self.preprocess = open_clip.create_model_and_transforms(config.model, pretrained=config.pretrained)
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(config.model)
        self.head = _load_head(config.aesthetic_head) if config.aesthetic_head else None

    @torch.no_grad()
    def score(self, frames: np.ndarray, caption: str) -> dict[str, float]:
        from PIL import Image

        images = torch.stack([self.preprocess(Image.fromarray(frames[i])) for i in keyframe_indices(len(frames))])
        image = self.model.encode_image(images)  # (K, D)
        image = torch.nn.functional.normalize(image, dim=-1).mean(dim=0)
        image = torch.nn.functional.normalize(image, dim=-1)  # (D,)
        scores: dict[str, float] = {}
        if caption:
            text = torch.nn.functional.normalize(self.model.encode_text(self.tokenizer([caption])), dim=-1)[0]  # (D,)
            scores["clip_similarity"] = round(float(image @ text), 4)
        if self.head is not None:
            weight, bias = self.head
            scores["aesthetic"] = round(float(image @ weight[0] + bias[0]), 4)
        return scores


@lru_cache(maxsize=2)
def _cached(model: str, pretrained: str | None, model_config: str | None, aesthetic_head: str | None) -> ClipScorer:
    return ClipScorer(ClipScoreConfig(model=model, pretrained=pretrained, model_config=model_config, aesthetic_head=aesthetic_head))


def clip_scorer(config: ClipScoreConfig) -> ClipScorer:
    """The process's scorer for `config` (built once per worker)."""
    assert config.model is not None
    torch.set_num_threads(1)  # one worker per core already
    return _cached(config.model, config.pretrained, config.model_config, config.aesthetic_head)
