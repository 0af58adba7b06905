"""The fault matrix of issue 14: each fault as a careless user or an attacker would cause it,
with the message and the outcome asserted (the README's "Reliability" section lists it).
Signals to a process group and exact resume after them are in test_resume_exact.py; the
laptop DDP command through effvid-train is in test_readme_commands.py."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from data_tools import cli as data_cli
from data_tools.video_io import encode_mp4
from datamodules import VideoShardDataModule
from experiments import train as train_cli
from experiments.checkpoints import check_checkpoint_fits, save_atomic
from experiments.run_dir import RunError, find_run_dir, latest_run_id, resolve_checkpoint
from experiments.train import prepare_argv, run_training
from lit_models.trusted_config import UntrustedConfigError, check_trusted, trusted_targets
from tests.conftest import compose_config, tiny_overrides
from tests.test_faults import good, write_tar

REPO = Path(__file__).resolve().parents[1]
ENV = os.environ | {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "PYTHONPATH": str(REPO)}


def marker_payloads(marker: Path) -> dict[str, tuple[str, object, str]]:
    """name -> (key path in a run's config, node, target named in the refusal). Each node writes
    `marker` when Hydra instantiates it (the partial when the partial is called)."""
    touch = f"touch {marker}"
    return {
        "numpy.save": ("paradigm.optimizer", {"_target_": "numpy.save", "file": str(marker), "arr": [1, 2]}, "numpy.save"),
        "builtins.open via a partial": (
            "paradigm.lr_scheduler", {"_target_": "builtins.open", "_partial_": True, "file": str(marker), "mode": "w"},
            "builtins.open"),
        "a project helper that writes files": (
            "model.temporal", {"_target_": "data_tools.atomic_files.write_atomic", "path": str(marker), "data": "x"},
            "data_tools.atomic_files.write_atomic"),
        "os.system": ("paradigm.on_load", {"_target_": "os.system", "_args_": [touch]}, "os.system"),
        "pathlib.Path.write_text": (
            "paradigm.noise_scheduler",
            {"_target_": "pathlib.Path.write_text", "_args_": [{"_target_": "pathlib.Path", "_args_": [str(marker)]}, "x"]},
            "pathlib.Path.write_text"),
        "an escaped interpolation Hydra resolves twice": (
            "paradigm.noise_scheduler.prediction_type",
            "\\${oc.create:{_target_: numpy.save, file: '" + str(marker) + "', arr: [1]}}", "interpolation"),
    }


def set_path(config: dict, path: str, value: object) -> None:
    *parents, last = path.split(".")
    for key in parents:
        config = config[key]
    config[last] = value


def proves_a_write(node: object, marker: Path) -> bool:
    """The payload really writes `marker` when Hydra instantiates it (so the refusal matters),
    or Hydra's own blocklist refuses it (os.system)."""
    try:
        built = instantiate(OmegaConf.create({"x": node if isinstance(node, dict) else {"_target_": "builtins.dict", "v": node}}).x)
    except InstantiationException as error:
        return "blocklisted" in str(error)
    if callable(built):
        built().close()  # the partial of open()
    return marker.exists()


@pytest.fixture(scope="module")
def run_config(digits_data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    runs = tmp_path_factory.mktemp("cfgruns")
    return OmegaConf.to_container(compose_config([*tiny_overrides(digits_data_root, runs), "run_id=x"]))


@pytest.mark.parametrize("payload", list(marker_payloads(Path("m"))))
def test_a_checkpoint_naming_a_callable_is_refused_by_every_loader_and_nothing_runs(run_config, tmp_path, payload):
    from experiments.sample import load_model
    from lit_models.bundle import load_bundle, load_run_module

    marker = tmp_path / "pwned.npy"  # numpy.save appends .npy to other names
    path, node, target = marker_payloads(marker)[payload]
    assert proves_a_write(marker_payloads(tmp_path / "proof.npy")[payload][1], tmp_path / "proof.npy")
    config = json.loads(json.dumps(run_config))
    set_path(config, path, node)
    ckpt = tmp_path / "runs" / "evil" / "checkpoints" / "last.ckpt"
    save_atomic({"state_dict": {}, "global_step": 1, "effvid": {"run_id": "evil", "config": config}}, ckpt)

    # effvid-sample, the bundle loader behind pretrained=RUN (train, encode, export) and its module loader (pairs)
    loaders = [lambda: load_model(ckpt, ckpt.parent.parent), lambda: load_bundle(str(ckpt)), lambda: load_run_module(ckpt)]
    expected = f"{ckpt}: {path}" + (f"._target_ = {target}" if target != "interpolation" else " still holds an interpolation")
    for load in loaders:
        with pytest.raises(UntrustedConfigError) as refused:
            load()
        assert str(refused.value).startswith(expected), str(refused.value)
        assert not marker.exists()
    assert data_cli.main(["pairs", "--ckpt", str(ckpt), "--prompts", str(write_prompts(tmp_path)), "--out",
                          str(tmp_path / "pairs")]) == 2
    assert not marker.exists() and not list((tmp_path / "pairs").glob("*.tar"))


def write_prompts(folder: Path) -> Path:
    (folder / "prompts.txt").write_text("a handwritten 3 moving up\n")
    return folder / "prompts.txt"


def evil_run_folder(runs: Path, run_config: dict, path: str, node: object) -> Path:
    """A run folder whose config.yaml carries `node` at `path`, with a checkpoint."""
    run = runs / "evil"
    config = json.loads(json.dumps(run_config))
    set_path(config, path, node)
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(config)))
    (run / "run.json").write_text(json.dumps({"run_id": "evil", "status": "interrupted", "created": "2026"}))
    save_atomic({"state_dict": {}, "global_step": 2}, run / "checkpoints" / "last.ckpt")
    return run


def test_a_run_folder_naming_a_callable_is_refused_by_resume_and_encode(run_config, tmp_path, monkeypatch, capsys):
    marker = tmp_path / "pwned.npy"
    path, node, target = marker_payloads(marker)["numpy.save"]
    run = evil_run_folder(tmp_path / "runs", run_config, "callbacks.evil", node)
    config_yaml = run / "config.yaml"
    before = {p.name: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    monkeypatch.setattr(sys, "argv", ["effvid-train", f"runs_dir={tmp_path / 'runs'}", "resume=evil"])
    with pytest.raises(SystemExit, match=f"{config_yaml}: callbacks.evil._target_ = numpy.save"):
        train_cli.main()
    # Trusted by name on this command line, the target passes this check (and fails later, in
    # Hydra, for want of numpy.save's arguments: not our concern here).
    assert "--config-dir" in prepare_argv([f"runs_dir={tmp_path / 'runs'}", "resume=evil", "trust_targets=[numpy.save]"])

    set_path(run_config_copy := json.loads(json.dumps(run_config)), "paradigm.optimizer", node)
    config_yaml.write_text(OmegaConf.to_yaml(OmegaConf.create(run_config_copy)))
    monkeypatch.setenv("EFFVID_RUNS", str(tmp_path / "runs"))
    assert data_cli.main(["encode", "--run", "evil", "--input", str(tmp_path), "--out", str(tmp_path / "enc")]) == 2
    assert f"{config_yaml}: paradigm.optimizer._target_ = numpy.save" in capsys.readouterr().err

    config_yaml.write_text(OmegaConf.to_yaml(OmegaConf.create(run_config | {"hydra": {"job_logging": {}}})))
    with pytest.raises(UntrustedConfigError, match="holds a 'hydra' section"):
        prepare_argv([f"runs_dir={tmp_path / 'runs'}", "resume=evil"])
    assert not marker.exists()
    after = {p.name: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name not in (".lock", "config.yaml")}
    assert after == {k: v for k, v in before.items() if k != "config.yaml"}


def test_trusted_targets_are_the_shipped_configs_and_the_user_opts_in_by_name(monkeypatch):
    targets = trusted_targets()
    assert {"lit_models.nets.FactorizedUNet", "experiments.run_callbacks.DivergenceGuard", "torch.optim.AdamW"} <= targets
    assert "data_tools.atomic_files.write_atomic" not in targets  # a project helper is not a builder
    mine = {"paradigm": {"net": {"_target_": "my_pkg.MyNet", "width": 8}}}
    with pytest.raises(UntrustedConfigError, match=r"where: paradigm.net._target_ = my_pkg.MyNet .*trust_targets='\[my_pkg.MyNet\]'"):
        check_trusted(mine, "where")
    check_trusted(mine, "where", extra=["my_pkg.MyNet"])
    monkeypatch.setenv("EFFVID_TRUSTED_TARGETS", "other.Thing, my_pkg.MyNet")
    check_trusted(mine, "where")


def test_resume_and_sample_take_the_newest_step_and_name_unreadable_files(tmp_path):
    run = tmp_path / "r"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("trainer: {max_steps: 10}\n")
    with pytest.raises(RunError, match="has no readable checkpoint yet"):
        resolve_checkpoint("r", tmp_path)
    for name, step in (("last.ckpt", 6), ("last-v1.ckpt", 7), ("step=000008.ckpt", 8)):
        torch.save({"global_step": step}, run / "checkpoints" / name)
    (run / "checkpoints" / "step=000004.ckpt").write_bytes(b"x")  # damaged, but its name says step 4
    (run / "checkpoints" / "zz.ckpt").write_bytes(b"not a checkpoint")
    with pytest.warns(UserWarning, match="zz.ckpt: cannot be read"):
        assert resolve_checkpoint("r", tmp_path)[1].name == "step=000008.ckpt"


def test_a_plain_pickle_checkpoint_is_refused_for_what_it_is(tmp_path):
    legacy = tmp_path / "legacy.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(RunError) as refused:
        check_checkpoint_fits(legacy, torch.nn.Linear(1, 1))
    assert "legacy.ckpt" in str(refused.value) and "mmap" not in str(refused.value)


@pytest.mark.slow
def test_oversized_clips_are_refused_before_decoding_and_decode_as_uint8_within_a_memory_cap(tmp_path):
    """A clip declaring 1024x1024 x 16 frames, read whole under a 150 MB address-space cap above
    what the process already maps: with a budget it is skipped unread; without one its uint8
    frames (50 MB; the float copy the loader made before did not fit) are decoded and resized
    within the cap. (A frame allocation that does fail: tests/test_faults.py.)"""
    big = encode_mp4(np.zeros((16, 1024, 1024, 3), np.uint8), preset="ultrafast")
    write_tar(tmp_path / "shards" / "shard-000000.tar", good("a") | {"big.mp4": big, "big.txt": b"a big clip"} | good("z"))
    result = subprocess.run([sys.executable, "-c", MEMORY_CAPPED_READ, str(tmp_path / "shards")], cwd=REPO, env=ENV,
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    budget, no_budget = (json.loads(line) for line in result.stdout.splitlines()[-2:])
    assert budget["keys"] == ["a", "z"] and budget["skipped"] == 1
    assert no_budget["keys"] == ["a", "big", "z"] and no_budget["skipped"] == 0
    shard = tmp_path / "shards" / "shard-000000.tar"
    assert budget["message"] == (f"skipping mp4 of sample big in shard {shard} declares 1024x1024 x 16 frames = "
                                 "16,777,216 pixels to decode, over the decode budget of 4,194,304 (max_decode_pixels)")

    (tmp_path / "videos").mkdir()
    (tmp_path / "videos" / "big.mp4").write_bytes(big)
    data_cli.main(["shard", "--input", str(tmp_path / "videos"), "--out", str(tmp_path / "out"),
                   "--max-decode-pixels", "1000000", "--workers", "1"])
    manifest = json.loads((tmp_path / "out" / "shard-000000.manifest.json").read_text())
    assert manifest["keys"] == [] and "declares 1024x1024 x 16 frames" in manifest["failed"][0]["reason"]


MEMORY_CAPPED_READ = """
import json, resource, sys, warnings
from datamodules import VideoShardDataModule
from datamodules.video_shards import SkippedSampleWarning

def read(**options):
    dm = VideoShardDataModule(sys.argv[1], val_shards=sys.argv[1], batch_size=1, num_workers=0, num_frames=None,
                              frame_stride=1, size=16, **options)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        keys = [k for batch in dm.val_dataloader() for k in batch["key"]]
    messages = [str(w.message) for w in caught if issubclass(w.category, SkippedSampleWarning)]
    return {"keys": keys, "skipped": dm.num_skipped_samples, "message": messages[0] if messages else ""}

read(max_decode_pixels=2**22)  # warm up: every library loaded, decoders created
mapped = int(next(l for l in open("/proc/self/status") if l.startswith("VmSize")).split()[1]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (mapped + 150 * 2**20, resource.RLIM_INFINITY))
print(json.dumps(read(max_decode_pixels=2**22)))
print(json.dumps(read(max_decode_pixels=None)))
"""


def test_empty_shards_stop_the_run_at_once_naming_them(tmp_path, digits_data_root):
    write_tar(tmp_path / "empty" / "shard-000000.tar", {})
    write_tar(tmp_path / "empty2" / "shard-000000.tar", {})
    write_tar(tmp_path / "empty2" / "shard-000001.tar", {})
    write_tar(tmp_path / "bad" / "shard-000000.tar", {"x.mp4": b"not an mp4", "x.txt": b"a clip"})
    base = [*tiny_overrides(digits_data_root, tmp_path / "runs", max_steps=3), "~logger", "trainer.limit_val_batches=0"]
    for folder, workers, message in (("empty", 0, "yielded no batch"), ("bad", 0, "yielded no batch"),
                                     ("empty2", 2, "hold no samples")):
        cfg = compose_config([*base, f"run_id={folder}-{workers}", f"data.train_shards={tmp_path / folder}",
                              f"data.num_workers={workers}"])
        started = time.monotonic()
        with pytest.raises(SystemExit, match=f"{message}.*{tmp_path / folder / 'shard-000000.tar'}"), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore")
            run_training(cfg)
        assert time.monotonic() - started < 120


def test_a_second_start_of_a_running_id_fails_at_once_and_changes_nothing(tmp_path, digits_data_root, monkeypatch):
    run = tmp_path / "busy"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("trainer: {max_steps: 10}\n")
    (run / "run.json").write_text('{"status": "running"}')
    torch.save({"global_step": 3}, run / "checkpoints" / "last.ckpt")
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    handle = os.open(run / ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a running effvid-train holds it
    os.write(handle, b"4242\n")
    try:
        for argv in ([f"runs_dir={tmp_path}", "run_id=busy", "experiment=digits_quickstart"],
                     [f"runs_dir={tmp_path}", "resume=busy"]):
            monkeypatch.setattr(sys, "argv", ["effvid-train", *argv])
            with pytest.raises(SystemExit, match=r"run 'busy' is in use by another process \(pid 4242\)"):
                train_cli.main()
    finally:
        os.close(handle)
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"} == before


@pytest.mark.slow
def test_two_concurrent_starts_of_one_id_give_one_run(tmp_path, digits_data_root):
    args = [sys.executable, "-m", "experiments.train", *tiny_overrides(digits_data_root, tmp_path, max_steps=1),
            "~logger", "trainer.limit_val_batches=0", "run_id=same"]
    first, second = (subprocess.Popen(args, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                     for _ in range(2))
    outputs = [p.communicate(timeout=300)[0] for p in (first, second)]
    codes = sorted((first.returncode, second.returncode))
    assert codes[0] == 0 and codes[1] == 1, outputs
    loser = outputs[[first.returncode, second.returncode].index(1)]
    assert "run 'same' is in use by another process" in loser or "run 'same' already exists" in loser, loser[-2000:]
    status = json.loads((tmp_path / "same" / "run.json").read_text())
    assert status["status"] == "completed" and status["global_step"] == 1 and "error" not in status
    assert OmegaConf.load(tmp_path / "same" / "config.yaml").run_id == "same"


@pytest.mark.parametrize("run_id", ["../escape", "a/b", ".hidden", "x" * 200, "a b"])
def test_unsafe_run_ids_are_refused_before_anything_is_written(tmp_path, run_id):
    runs = tmp_path / "runs"
    with pytest.raises(RunError, match="is not allowed"):
        prepare_argv([f"runs_dir={runs}", f"run_id={run_id}", "experiment=digits_quickstart"])
    with pytest.raises(RunError, match="is not allowed"):
        find_run_dir(run_id, runs)
    assert list(tmp_path.iterdir()) == []


def test_a_numeric_run_id_is_a_string(tmp_path, digits_data_root):
    argv = prepare_argv([f"runs_dir={tmp_path}", "run_id=123", "experiment=digits_quickstart"])
    assert "run_id='123'" in argv
    overrides = [a for a in argv if a.startswith(("run_id=", "runs_dir="))]
    assert compose_config([*tiny_overrides(digits_data_root, tmp_path), *overrides]).run_id == "123"


def test_a_corrupt_run_json_is_named_and_latest_skips_it(tmp_path):
    for run_id, created in (("good", "2026-01-01"), ("broken", "2026-02-01")):
        (tmp_path / run_id).mkdir()
        (tmp_path / run_id / "config.yaml").write_text("trainer: {max_steps: 4}\n")
        (tmp_path / run_id / "run.json").write_text(json.dumps({"created": created, "status": "completed"}))
    (tmp_path / "broken" / "run.json").write_text('{"created": "2026-02-01", "sta')
    with pytest.warns(UserWarning, match=f"skipping run 'broken': {tmp_path / 'broken' / 'run.json'} is corrupt"):
        assert latest_run_id(tmp_path) == "good"
    with pytest.raises(RunError, match=f"{tmp_path / 'broken' / 'run.json'} is corrupt"):
        train_cli.check_resumable(tmp_path / "broken", {})


def test_a_diverging_run_stops_with_status_diverged_keeping_the_last_finite_checkpoint(tmp_path, digits_data_root, capsys):
    cfg = compose_config([
        *tiny_overrides(digits_data_root, tmp_path, max_steps=8), "run_id=nan", "~logger", "trainer.limit_val_batches=0",
        "callbacks.divergence.patience=2", "+callbacks.poison={_target_: tests.fault_helpers.PoisonWeights, at_step: 3}",
    ])
    with pytest.raises(SystemExit) as stopped, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_training(cfg)
    assert stopped.value.code == train_cli.DIVERGED_EXIT
    err = capsys.readouterr().err
    assert "run nan diverged: the training loss was not finite for 2 steps in a row (steps 4..5" in err
    assert f"checkpoint kept: {tmp_path / 'nan' / 'checkpoints' / 'last.ckpt'} (the last finite checkpoint)" in err
    status = json.loads((tmp_path / "nan" / "run.json").read_text())
    assert status["status"] == "diverged" and status["global_step"] == 5
    assert sorted(p.name for p in (tmp_path / "nan" / "checkpoints").iterdir()) == ["last.ckpt", "step=000002.ckpt"]
    last = torch.load(tmp_path / "nan" / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 2 and all(torch.isfinite(v).all() for v in last["state_dict"].values())


def disk_full(*args: object, **kwargs: object) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_names_the_file_once_and_leaves_no_temp_file(tmp_path, digits_data_root, monkeypatch, capsys):
    import webdataset as wds

    videos = tmp_path / "videos"
    videos.mkdir()
    for i in range(3):
        (videos / f"{i}.mp4").write_bytes(encode_mp4(np.zeros((4, 16, 16, 3), np.uint8)))
    with monkeypatch.context() as patch:
        patch.setattr(wds.TarWriter, "write", disk_full)
        assert data_cli.main(["shard", "--input", str(videos), "--out", str(tmp_path / "shards"), "--workers", "1"]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if "No space left" in line]
    assert err == [f"effvid-data shard: error: cannot write {tmp_path / 'shards' / 'shard-000000.tar'}: "
                   "No space left on device; finished shards are kept, re-run to continue"]
    assert not list((tmp_path / "shards").glob("*.tmp"))

    cfg = compose_config([*tiny_overrides(digits_data_root, tmp_path / "runs", max_steps=3), "run_id=full", "~logger",
                          "trainer.limit_val_batches=0"])
    with monkeypatch.context() as patch, pytest.raises(SystemExit) as stopped, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        patch.setattr(torch, "save", disk_full)
        run_training(cfg)
    checkpoint = tmp_path / "runs" / "full" / "checkpoints" / "step=000002.ckpt"
    assert str(stopped.value.code).startswith(
        f"effvid-train: error: cannot write {checkpoint}: No space left on device (run full, step 2)")
    assert not [p for p in (tmp_path / "runs").rglob("*") if ".tmp" in p.name]
    assert json.loads((tmp_path / "runs" / "full" / "run.json").read_text())["status"] == "failed"


def test_list_files_that_are_not_utf8_are_named(tmp_path, capsys):
    listing = tmp_path / "videos.txt"
    listing.write_bytes(b"clip1.mp4\n\xff\xfeclip2.mp4\n")
    assert data_cli.main(["curate", "--input", str(listing), "--out", str(tmp_path / "out")]) == 2
    assert f"input list {listing} is not UTF-8 text (byte 10" in capsys.readouterr().err
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"a handwritten \xe9 moving up\n")
    assert data_cli.main(["pairs", "--ckpt", str(tmp_path / "x.ckpt"), "--prompts", str(prompts), "--out",
                          str(tmp_path / "pairs")]) == 2
    assert f"prompt file {prompts} is not UTF-8 text" in capsys.readouterr().err


def test_a_datamodule_skips_an_oversized_declared_clip_without_decoding(tmp_path, monkeypatch):
    import datamodules.video_decoding as video_decoding

    write_tar(tmp_path / "s" / "shard-000000.tar", good("a") | {
        "wide.mp4": encode_mp4(np.zeros((4, 64, 96, 3), np.uint8)), "wide.txt": b"a clip"} | good("z"))
    decoded = []
    real = video_decoding._decode_frames
    monkeypatch.setattr(video_decoding, "_decode_frames", lambda data, *a: decoded.append(len(data)) or real(data, *a))
    dm = VideoShardDataModule(tmp_path / "s", val_shards=tmp_path / "s", batch_size=4, num_workers=0, num_frames=4,
                              frame_stride=1, size=16, max_decode_pixels=64 * 96 * 4 - 1)
    with pytest.warns(UserWarning, match=r"sample wide in shard .* declares 96x64 x 4 frames = 24,576 pixels"):
        keys = [k for batch in dm.val_dataloader() for k in batch["key"]]
    assert keys == ["a", "z"] and dm.num_skipped_samples == 1 and len(decoded) == 2
