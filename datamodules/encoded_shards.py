"""`EncodedShardDataModule`: batches of precomputed VAE latents and text embeddings from
shards written by `effvid-data encode`, read with the same exact-resume, equal-batch readers
as `VideoShardDataModule`.

Frames are drawn from the latents exactly as from the video (the same per-sample start, the
same stride): a per-frame VAE encodes frame by frame, so a slice of a clip's latents is the
latent of the slice. A video VAE's latents encode one training clip (`clip` in `_encoder.json`)
and are taken whole. Arrays are read with `allow_pickle=False`; nothing is unpickled.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from datamodules.shard_lists import ShardSpec, resolve_shards
from datamodules.video_decoding import VideoDecodeError
from datamodules.video_shards import DecodeSamples, Sample, VideoShardDataModule
from lit_models.encoded_inputs import ENCODER_INFO_NAME, EncoderMismatchError, check_encoders, read_encoder_info


class DecodeEncodedSamples(DecodeSamples):
    """Pipeline stage: encoded shard samples -> `{"latent": (c, F, h, w)}` and, when the
    shards hold them, `{"context": (L, D), "context_mask": (L,), "pooled": (P,)}`."""

    media_member = "latent.npy"

    def decode_media(self, sample: Sample, url: str, key: str, rng: np.random.Generator | None,
                     options: dict[str, Any]) -> dict[str, torch.Tensor]:
        try:
            latent = np.load(io.BytesIO(sample["latent.npy"]), allow_pickle=False)  # (c, F, h, w)
            if latent.ndim != 4:
                raise ValueError(f"latent has shape {latent.shape}, not (c, F, h, w)")
        except (ValueError, OSError, EOFError) as exc:
            raise VideoDecodeError(f"cannot read latent.npy of sample {key} in shard {url}: {exc}") from None
        indices = self.frame_indices(latent.shape[1], url, key, rng, options)
        out = {"latent": torch.from_numpy(latent[:, indices].astype(np.float32))}
        if "text.npz" in sample:
            try:
                with np.load(io.BytesIO(sample["text.npz"]), allow_pickle=False) as text:
                    out["context"] = torch.from_numpy(text["tokens"].astype(np.float32))  # (L, D)
                    if "pooled" in text.files:  # a pretrained family's encoder may give none
                        out["pooled"] = torch.from_numpy(text["pooled"].astype(np.float32))  # (P,)
                    if "mask" in text.files:
                        out["context_mask"] = torch.from_numpy(text["mask"].astype(bool))  # (L,)
            except (ValueError, OSError, KeyError, zipfile.BadZipFile) as exc:
                raise VideoDecodeError(f"cannot read text.npz of sample {key} in shard {url}: {exc}") from None
        return out


class EncodedShardDataModule(VideoShardDataModule):
    """Batches `{"latent": (B, c, F, h, w) float32, "caption", "key", "meta"}` plus
    `context` `(B, L, D)`, `context_mask` `(B, L)` and `pooled` `(B, P)` when the text was
    encoded, from `effvid-data encode` shards. Arguments as `VideoShardDataModule`; `size` and
    `channels` must match the encoding (checked against `_encoder.json`), frames are sampled
    from the latents with `num_frames`, `frame_stride` and `random_start`.
    """

    media = ("latent.npy",)

    def members(self) -> set[str]:
        return {*self.media, "text.npz", "json", self.caption_key}

    def setup(self, stage: str | None = None) -> None:
        if self.bucket_table is not None:
            raise ValueError("data.buckets: encoded shards hold latents of one size; bucket the video shards "
                             "(data=digits-like VideoShardDataModule) or encode each bucket to its own folder")
        super().setup(stage)
        self.encoder_info = self._check_folder(self.train_shards)
        if self.val_shards is not None:
            val_info = self._check_folder(self.val_shards)
            if {k: v for k, v in val_info.items() if k != "input"} != {
                k: v for k, v in self.encoder_info.items() if k != "input"
            }:
                raise EncoderMismatchError(
                    f"train and val shards were encoded with different encoders or settings: "
                    f"{self._info_dir(self.train_shards)} vs {self._info_dir(self.val_shards)}"
                )

    @staticmethod
    def _info_dir(spec: ShardSpec) -> Path:
        return Path(resolve_shards(spec)[0]).parent

    def _check_folder(self, spec: ShardSpec) -> dict[str, Any]:
        folder = self._info_dir(spec)
        info = read_encoder_info(folder)
        if info is None:
            raise EncoderMismatchError(
                f"{folder} has no {ENCODER_INFO_NAME}: not written by effvid-data encode "
                "(raw video shards go to VideoShardDataModule, data=digits)"
            )
        expected = [("size", self.size), ("channels", self.channels)]
        if info.get("clip") is not None:  # a video VAE's latents encode one whole training clip
            expected += [("num_frames", self.num_frames), ("frame_stride", self.frame_stride)]
        for key, value in expected:
            stored = info["clip"][key] if key in ("num_frames", "frame_stride") else info.get(key)
            if stored != value:
                raise EncoderMismatchError(
                    f"{folder}/{ENCODER_INFO_NAME}: encoded at {key}={stored} but data.{key}={value}"
                )
        return info

    def check_model(self, model: Any) -> None:
        """Raise `EncoderMismatchError` naming the folder unless `model`'s autoencoder and
        text encoder are the ones the train shards were encoded with."""
        if self.train_urls is None:
            self.setup("fit")
        check_encoders(self.encoder_info, str(self._info_dir(self.train_shards)),
                       getattr(model, "autoencoder", None), getattr(model, "text_encoder", None))

    def _decode_stage(self, train: bool) -> DecodeEncodedSamples:
        whole = getattr(self, "encoder_info", {}).get("clip") is not None  # video-VAE latents: the clip itself
        return DecodeEncodedSamples(
            self._skipped, caption_key=self.caption_key, seed=self.seed,
            num_frames=None if whole else self.num_frames, stride=1 if whole else self.frame_stride,
            random_start=self.random_start and train and not whole, size=self.size,
            timeout=None, require_caption=self.require_caption,
        )
