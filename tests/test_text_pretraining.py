"""The quickstart's text stage: CLIP's loss pulls captions and their clips together, and the
stage's checkpoint is the tower a text-to-video run loads frozen."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from lit_models.conditioning import OpenClipTextEncoder
from lit_models.metrics import DIRECTIONS
from lit_models.text_pretraining import CaptionClipPretraining
from lit_models.video_classifier import DigitClipEncoder, real_digit_clips

TINY_TEXT = dict(width=16, layers=1, heads=2, context_length=12, vocab_size=49408)


@pytest.mark.slow
def test_stage_learns_caption_clip_pairs_and_hands_its_tower_to_a_frozen_encoder(tmp_path):
    torch.manual_seed(0)
    stage = CaptionClipPretraining(
        text_encoder=OpenClipTextEncoder(text_cfg=TINY_TEXT, embed_dim=16, trainable=True),
        video_encoder=DigitClipEncoder(out_features=16, width=8),
        optimizer=partial(torch.optim.AdamW, lr=3e-3),
    )
    stage.log = lambda *args, **kwargs: None
    digits, directions = [d % 10 for d in range(16)], [list(DIRECTIONS)[(3 * d) % 8] for d in range(16)]
    batch = {"video": real_digit_clips(digits, list(directions), seed=0),
             "caption": [f"a handwritten {d} moving {m}" for d, m in zip(digits, directions)]}  # fmt: skip
    optimizer = stage.configure_optimizers()
    losses = []
    for _ in range(15):
        optimizer.zero_grad()
        loss = stage.training_step(batch, 0)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    assert stage.text_encoder.text.token_embedding.weight.grad is not None  # word vectors train in the stage

    torch.save({"state_dict": stage.state_dict()}, tmp_path / "stage.ckpt")
    frozen = OpenClipTextEncoder(text_cfg=TINY_TEXT, embed_dim=16, weights=str(tmp_path / "stage.ckpt"))
    with torch.no_grad():
        expected = stage.text_encoder.encode(batch["caption"]).pooled
        torch.testing.assert_close(frozen.encode(batch["caption"]).pooled, expected, rtol=0, atol=0)
