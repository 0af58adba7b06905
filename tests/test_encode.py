"""`effvid-data encode`: precomputed latents and text embeddings give the training step the
same inputs as the encoders would, resume by shard, and are refused by a run whose encoders
differ from the recorded ones."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch

from data_tools.cli import main as data_main
from datamodules import EncodedShardDataModule, VideoShardDataModule
from experiments.train import build_model, run_training
from lit_models.latent import FrameAutoencoder
from tests.conftest import compose_config, tiny_overrides
from tests.test_faults import BAD_SAMPLES, good, write_tar

pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")


def vae_weights(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    vae = FrameAutoencoder(in_channels=1, block_out_channels=(8, 16), norm_num_groups=4, trainable=True)
    torch.save({"state_dict": {f"autoencoder.vae.{k}": v for k, v in vae.vae.state_dict().items()}}, path)
    return path


def latent_overrides(data_root: Path, runs_dir: Path, vae: Path, max_steps: int = 4) -> list[str]:
    """Tiny latent text-to-video with a frozen (seeded random) text encoder."""
    return [*tiny_overrides(data_root, runs_dir, max_steps, debug="tiny_latent"), f"paradigm.autoencoder.weights={vae}",
            "paradigm.text_encoder.trainable=false"]


@pytest.fixture(scope="module")
def encoded(tmp_path_factory, digits_data_root) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("encoded")
    vae = vae_weights(root / "vae.ckpt", seed=0)
    overrides = latent_overrides(digits_data_root, root / "runs", vae)
    for split in ("train", "val"):
        assert data_main(["encode", "--input", str(digits_data_root / "digits" / "shards" / split),
                          "--out", str(root / split), "--dtype", "float32", *overrides]) == 0
    return {"root": root, "vae": vae, "train": root / "train", "val": root / "val"}


def first_batch(dm, **kwargs):
    dm.setup("fit")
    return dm.on_after_batch_transfer(next(iter(dm.train_dataloader())), 0)  # as the trainer hands it over


def test_encoded_batches_give_the_training_step_the_encoders_inputs(encoded, digits_data_root):
    cfg = compose_config(latent_overrides(digits_data_root, encoded["root"] / "runs", encoded["vae"]))
    L.seed_everything(cfg.seed)
    model = build_model(cfg)
    options = dict(batch_size=4, num_workers=0, num_frames=cfg.data.num_frames, frame_stride=2, size=16,
                   channels=1, shuffle_buffer=8, seed=3)
    raw = first_batch(VideoShardDataModule(digits_data_root / "digits" / "shards" / "train", **options))
    dm = EncodedShardDataModule(encoded["train"], **options)
    pre = first_batch(dm)
    dm.check_model(model)  # the same encoders: no error

    assert pre["key"] == raw["key"] and "video" not in pre
    # The same random start frames were drawn from the latents as from the video.
    torch.testing.assert_close(model.clean_data(pre), model.clean_data(raw), atol=1e-5, rtol=1e-4)
    for drop in (False, True):  # CFG dropout takes the empty caption's embedding in both paths
        torch.manual_seed(1)
        from_raw = model.condition(raw, drop=drop)
        torch.manual_seed(1)
        from_pre = model.condition(pre, drop=drop)
        for name in from_raw:
            torch.testing.assert_close(from_pre[name], from_raw[name], atol=1e-5, rtol=1e-4)
    torch.manual_seed(2)
    loss_raw = model.training_step(raw, 0)
    torch.manual_seed(2)
    assert model.training_step(pre, 0).item() == pytest.approx(loss_raw.item(), rel=1e-4)


def test_float16_latents_stay_within_half_precision(encoded, digits_data_root, tmp_path):
    overrides = latent_overrides(digits_data_root, tmp_path / "runs", encoded["vae"])
    assert data_main(["encode", "--input", str(digits_data_root / "digits" / "shards" / "val"), "--out",
                      str(tmp_path / "half"), *overrides]) == 0
    options = dict(batch_size=8, num_workers=0, num_frames=4, size=16, channels=1)
    full = next(iter(EncodedShardDataModule(encoded["val"], val_shards=encoded["val"], **options).val_dataloader()))
    half = next(iter(EncodedShardDataModule(tmp_path / "half", val_shards=tmp_path / "half", **options).val_dataloader()))
    assert half["latent"].shape == full["latent"].shape == (8, 4, 4, 8, 8)  # (B, c, F, h, w)
    torch.testing.assert_close(half["latent"], full["latent"], atol=2e-3, rtol=1e-3)
    assert not torch.equal(half["latent"], full["latent"])  # really stored in float16


@pytest.mark.slow
def test_run_trains_on_encoded_shards_and_refuses_other_encoders(encoded, digits_data_root, tmp_path):
    base = [*latent_overrides(digits_data_root, tmp_path / "runs", encoded["vae"], max_steps=3), "~logger",
            "data=digits_encoded", f"data.train_shards={encoded['train']}", f"data.val_shards={encoded['val']}"]
    metrics = run_training(compose_config([*base, "run_id=enc"]))
    assert json.loads((tmp_path / "runs" / "enc" / "run.json").read_text())["global_step"] == 3
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))

    other_vae = vae_weights(tmp_path / "other.ckpt", seed=1)
    with pytest.raises(SystemExit, match=r"train/_encoder\.json: autoencoder\.fingerprint"):
        run_training(compose_config([*base, "run_id=other-vae", f"paradigm.autoencoder.weights={other_vae}"]))
    with pytest.raises(SystemExit, match="text_encoder.trainable=true"):
        run_training(compose_config([*base, "run_id=trained-text", "paradigm.text_encoder.trainable=true"]))
    with pytest.raises(SystemExit, match="encoded at size=16 but data.size=32"):
        run_training(compose_config([*base, "run_id=size", "data.size=32"]))
    assert not (tmp_path / "runs" / "other-vae").exists()


def test_encode_names_bad_samples_and_resumes_by_shard(encoded, digits_data_root, tmp_path, capsys):
    shards = tmp_path / "in"
    write_tar(shards / "shard-000000.tar", {k: v for i in range(3) for k, v in good(f"g{i}").items()}
              | BAD_SAMPLES["garbage mp4"][0])
    write_tar(shards / "shard-000001.tar", {k: v for i in range(3, 6) for k, v in good(f"g{i}").items()})
    args = ["encode", "--input", str(shards), "--out", str(tmp_path / "out"), "--dtype", "float32",
            *latent_overrides(digits_data_root, tmp_path / "runs", encoded["vae"])]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert data_main(args) == 0
    stats = json.loads((tmp_path / "out" / "_stats.json").read_text())
    assert (stats["samples"], stats["skipped"]) == (6, 1)
    assert "sample bad in shard" in stats["skipped_samples"][0] and "shard-000000.tar" in stats["skipped_samples"][0]
    assert "sample bad in shard" in capsys.readouterr().err

    first = (tmp_path / "out" / "shard-000001.tar").read_bytes()
    (tmp_path / "out" / "shard-000001.tar").unlink()  # as if killed while writing the second shard
    assert data_main(args) == 0
    stats = json.loads((tmp_path / "out" / "_stats.json").read_text())
    assert (stats["shards_reused"], stats["samples"]) == (1, 3)
    assert (tmp_path / "out" / "shard-000001.tar").read_bytes() == first

    other = vae_weights(tmp_path / "other.ckpt", seed=1)
    assert data_main([*args, f"paradigm.autoencoder.weights={other}"]) == 2
    assert "records other encoders" in capsys.readouterr().err
    shutil.rmtree(tmp_path / "out")
