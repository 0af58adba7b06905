"""Tiny random-initialised diffusers pipeline folders, one per supported family, written with
the families' own `save_pretrained` so they have the layout of the published releases
(`model_index.json`, one subfolder per component) at a few kilobytes per component.

Tokenizers are real ones built offline: a CLIP BPE tokenizer from open_clip's bundled vocabulary
(its first merges, so the text encoder's embedding table stays small), and a T5 Unigram
tokenizer over a small vocabulary that covers the digit captions.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

T5_WORDS = (
    "a handwritten moving up down left right up-left up-right down-left down-right digit the of "
    "0 1 2 3 4 5 6 7 8 9 video clip cat dog"
).split()


CLIP_MERGES = 2000  # of open_clip's 48,894 BPE merges: a real CLIP tokenizer with a 2,514-token vocabulary


def clip_tokenizer(max_length: int = 77):
    """`CLIPTokenizer` over the first `CLIP_MERGES` merges of open_clip's BPE vocabulary (the
    one SD 1.x ships), offline; words past those merges split into more, shorter tokens."""
    import gzip
    import tempfile

    import open_clip.tokenizer as oct
    from transformers import CLIPTokenizer

    simple = oct.SimpleTokenizer()
    kept = sorted(simple.encoder.items(), key=lambda item: item[1])[: 512 + CLIP_MERGES]  # bytes, byte</w>, merges
    vocab = dict(kept)
    # transformers' CLIP vocabulary (the file SD folders ship) names the special tokens like this.
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    with tempfile.TemporaryDirectory() as tmp:
        vocab_file, merges_file = Path(tmp) / "vocab.json", Path(tmp) / "merges.txt"
        vocab_file.write_text(json.dumps(vocab), encoding="utf-8")
        with gzip.open(oct.default_bpe(), "rt", encoding="utf-8") as handle:
            merges = handle.read().split("\n")[1 : 1 + CLIP_MERGES]
        merges_file.write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
        return CLIPTokenizer(str(vocab_file), str(merges_file), pad_token="<|endoftext|>", model_max_length=max_length)


def t5_tokenizer(max_length: int = 32):
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [(f"▁{word}", -3.0 - i * 0.01) for i, word in enumerate(T5_WORDS)]
    vocab += [(ch, -8.0) for ch in "abcdefghijklmnopqrstuvwxyz0123456789-"]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=max_length)


def clip_text_encoder(hidden: int = 32):
    from transformers import CLIPTextConfig, CLIPTextModel

    vocab = 512 + CLIP_MERGES + 2
    config = CLIPTextConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=hidden,
        bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1,
    )  # fmt: skip
    return CLIPTextModel(config).eval()


def t5_encoder(hidden: int = 32, umt5: bool = False):
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    kwargs = dict(vocab_size=96, d_model=hidden, d_kv=8, d_ff=2 * hidden, num_layers=2, num_heads=4,
                  relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1)
    if umt5:
        return UMT5EncoderModel(UMT5Config(**kwargs)).eval()
    return T5EncoderModel(T5Config(**kwargs)).eval()


def frame_vae(in_channels: int = 3, latent_channels: int = 4):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=in_channels, out_channels=in_channels, latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"), up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, sample_size=32,
    )  # fmt: skip


def unet_kwargs(kind: str = "2D", in_channels: int = 4, cross_attention_dim: int = 32,
                channels: tuple[int, int] = (16, 32)) -> dict:
    """A two-level SD-style U-Net (`kind` 2D or 3D): cross-attention at the full latent size."""
    return dict(
        sample_size=8, in_channels=in_channels, out_channels=in_channels, block_out_channels=channels,
        layers_per_block=1, down_block_types=(f"CrossAttnDownBlock{kind}", f"DownBlock{kind}"),
        up_block_types=(f"UpBlock{kind}", f"CrossAttnUpBlock{kind}"), cross_attention_dim=cross_attention_dim,
        attention_head_dim=4 if channels[0] >= 16 else 2, norm_num_groups=8 if channels[0] >= 16 else 4,
    )  # fmt: skip


def sd_unet(**kwargs: object):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**unet_kwargs("2D", **kwargs))


def sd_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
    )  # fmt: skip


def write_sd_folder(path: Path) -> Path:
    """A Stable Diffusion 1.x-layout folder (the base AnimateDiff runs on)."""
    from diffusers import StableDiffusionPipeline

    torch.manual_seed(0)
    pipe = StableDiffusionPipeline(
        vae=frame_vae(), text_encoder=clip_text_encoder(), tokenizer=clip_tokenizer(), unet=sd_unet(),
        scheduler=sd_scheduler(), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.save_pretrained(path)
    return Path(path)


def write_motion_adapter(path: Path) -> Path:
    """An AnimateDiff `MotionAdapter` matching `sd_unet`."""
    from diffusers import MotionAdapter

    torch.manual_seed(1)
    adapter = MotionAdapter(
        block_out_channels=(16, 32), motion_layers_per_block=1, motion_num_attention_heads=2,
        motion_norm_num_groups=8, motion_max_seq_length=32, use_motion_mid_block=False,
    )  # fmt: skip
    adapter.save_pretrained(path)
    return Path(path)


def write_modelscope_folder(path: Path) -> Path:
    """A ModelScope text-to-video (TextToVideoSDPipeline) folder: UNet3D + per-frame VAE + CLIP."""
    from diffusers import TextToVideoSDPipeline, UNet3DConditionModel

    torch.manual_seed(0)
    unet = UNet3DConditionModel(**unet_kwargs("3D"))
    pipe = TextToVideoSDPipeline(
        vae=frame_vae(), text_encoder=clip_text_encoder(), tokenizer=clip_tokenizer(), unet=unet, scheduler=sd_scheduler()
    )
    pipe.save_pretrained(path)
    return Path(path)


def write_cogvideox_folder(path: Path, rotary: bool = False) -> Path:
    """A CogVideoX folder: transformer + its 3D VAE (4x temporal compression) + T5."""
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline, CogVideoXTransformer3DModel

    torch.manual_seed(0)
    vae = AutoencoderKLCogVideoX(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        norm_num_groups=2, temporal_compression_ratio=4, sample_height=32, sample_width=32,
        down_block_types=("CogVideoXDownBlock3D",) * 4, up_block_types=("CogVideoXUpBlock3D",) * 4,
    )  # fmt: skip
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=8,
        text_embed_dim=32, num_layers=2, sample_width=4, sample_height=4, sample_frames=9, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=16, use_rotary_positional_embeddings=rotary,
    )  # fmt: skip
    scheduler = CogVideoXDDIMScheduler(
        beta_schedule="scaled_linear", prediction_type="v_prediction", rescale_betas_zero_snr=True,
        set_alpha_to_one=True, clip_sample=False, timestep_spacing="trailing", snr_shift_scale=1.0,
    )  # fmt: skip
    pipe = CogVideoXPipeline(tokenizer=t5_tokenizer(16), text_encoder=t5_encoder(), vae=vae, transformer=transformer,
                             scheduler=scheduler)
    pipe.save_pretrained(path)
    return Path(path)


def write_ltx_folder(path: Path) -> Path:
    """An LTX-Video folder: transformer + its causal video VAE (8x temporal, 32x spatial) + T5, flow matching."""
    from diffusers import AutoencoderKLLTXVideo, FlowMatchEulerDiscreteScheduler, LTXPipeline, LTXVideoTransformer3DModel

    torch.manual_seed(0)
    vae = AutoencoderKLLTXVideo(
        in_channels=3, out_channels=3, latent_channels=8, block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8), layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1, 1), spatio_temporal_scaling=(True, True, False, False),
        decoder_spatio_temporal_scaling=(True, True, False, False), decoder_inject_noise=(False,) * 5,
        upsample_residual=(False,) * 4, upsample_factor=(1,) * 4, timestep_conditioning=False,
        patch_size=1, patch_size_t=1, encoder_causal=True, decoder_causal=False,
    )  # fmt: skip
    transformer = LTXVideoTransformer3DModel(
        in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=8,
        cross_attention_dim=16, num_layers=2, caption_channels=32,
    )  # fmt: skip
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.95, max_shift=2.05,
                                                base_image_seq_len=1024, max_image_seq_len=4096, shift_terminal=0.1)
    pipe = LTXPipeline(scheduler=scheduler, vae=vae, text_encoder=t5_encoder(), tokenizer=t5_tokenizer(16),
                       transformer=transformer)
    pipe.save_pretrained(path)
    return Path(path)


def write_wan_folder(path: Path) -> Path:
    """A Wan 2.1 text-to-video folder: transformer + its video VAE (4x temporal) + UMT5, flow matching."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=4, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True], latents_mean=[0.1, -0.2, 0.3, 0.0],
                           latents_std=[1.5, 0.8, 1.2, 1.0])
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
        text_dim=32, freq_dim=16, ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )  # fmt: skip
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0,
                                        num_train_timesteps=1000)
    pipe = WanPipeline(tokenizer=t5_tokenizer(16), text_encoder=t5_encoder(umt5=True), vae=vae, scheduler=scheduler,
                       transformer=transformer)
    pipe.save_pretrained(path)
    return Path(path)


def write_latte_folder(path: Path) -> Path:
    """A Latte folder: space-time DiT over a per-frame VAE's latents + T5 (learned variance)."""
    from diffusers import DDIMScheduler, LattePipeline, LatteTransformer3DModel

    torch.manual_seed(0)
    transformer = LatteTransformer3DModel(
        sample_size=8, num_layers=1, patch_size=2, attention_head_dim=8, num_attention_heads=2, caption_channels=32,
        in_channels=4, cross_attention_dim=16, out_channels=8, attention_bias=True, activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
        video_length=8,
    )  # fmt: skip
    scheduler = DDIMScheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02, clip_sample=False)
    pipe = LattePipeline(tokenizer=t5_tokenizer(16), text_encoder=t5_encoder(), vae=frame_vae(), transformer=transformer,
                         scheduler=scheduler)
    pipe.save_pretrained(path)
    return Path(path)


def llama_tokenizer(max_length: int = 256):
    """A byte-level BPE `LlamaTokenizerFast` trained here on HunyuanVideo's prompt template and the
    digit captions (offline; the real one is Llama 3's)."""
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizerFast

    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    corpus = [DEFAULT_PROMPT_TEMPLATE["template"], " ".join(T5_WORDS)] * 4
    tokenizer.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return LlamaTokenizerFast(tokenizer_object=tokenizer, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>",
                              pad_token="<|end_of_text|>", model_max_length=max_length)


def write_hunyuan_folder(path: Path) -> Path:
    """A HunyuanVideo folder: dual-stream transformer + its video VAE (4x temporal) + Llama prompts
    (a chat template, features from the third-last layer) + CLIP pooled text, flow matching."""
    from diffusers import (
        AutoencoderKLHunyuanVideo,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideoPipeline,
        HunyuanVideoTransformer3DModel,
    )
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(0)
    vae = AutoencoderKLHunyuanVideo(
        latent_channels=4, block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4,
        spatial_compression_ratio=8, temporal_compression_ratio=4, mid_block_add_attention=False,
    )  # fmt: skip
    transformer = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1, num_single_layers=1,
        num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=32, pooled_projection_dim=32,
        rope_axes_dim=(2, 2, 4), guidance_embeds=True,
    )  # fmt: skip
    llama = LlamaModel(LlamaConfig(vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)).eval()
    pipe = HunyuanVideoPipeline(
        text_encoder=llama, tokenizer=llama_tokenizer(), transformer=transformer, vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), text_encoder_2=clip_text_encoder(), tokenizer_2=clip_tokenizer(),
    )  # fmt: skip
    pipe.save_pretrained(path)
    return Path(path)


FOLDER_WRITERS = {
    "sd": write_sd_folder,
    "modelscope": write_modelscope_folder,
    "cogvideox": write_cogvideox_folder,
    "ltx": write_ltx_folder,
    "wan": write_wan_folder,
    "latte": write_latte_folder,
    "hunyuan": write_hunyuan_folder,
}
