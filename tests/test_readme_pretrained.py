"""Every pretrained-model command the README documents runs as written, in order, on tiny local
folders of each family: the test reads the commands from the README's `pretrained-commands`
block, points its placeholder paths at tiny folders and the digits shards, adds tiny sizes
(frames, resolution, two steps), and runs each through its CLI's entry point."""

from __future__ import annotations

import csv
import re
import shlex
import shutil
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"<!-- pretrained-commands -->\s*```bash\n(.*?)```\s*<!-- /pretrained-commands -->", re.S)
FOLDERS = {  # README placeholder -> tiny folder name
    "/models/stable-diffusion-v1-5": "sd",
    "/models/text-to-video-ms-1.7b": "modelscope",
    "/models/CogVideoX-2b": "cogvideox",
    "/models/LTX-Video": "ltx",
    "/models/Wan2.1-T2V-1.3B-Diffusers": "wan",
    "/models/HunyuanVideo": "hunyuan",
}
TINY_KEYS = ("data.size", "data.num_frames")  # replaced, not duplicated


def readme_commands() -> list[str]:
    match = BLOCK.search(README.read_text(encoding="utf-8"))
    assert match, "README.md has no <!-- pretrained-commands --> block"
    return [line.strip() for line in match.group(1).splitlines() if line.strip().startswith("effvid-")]


def tiny(argv: list[str]) -> list[str]:
    """The command's own arguments with test sizes: 8 frames for the U-Net families (any count),
    9 for the video VAEs (4k+1 and 8k+1), 32 px, two steps, no logger."""
    program, args = argv[0], [a for a in argv[1:] if not a.startswith(tuple(k + "=" for k in TINY_KEYS))]
    text = " ".join(args)
    frames = 8 if any(f"experiment={e}" in text for e in ("animatediff", "modelscope")) else 9
    if program == "effvid-data" and args[0] == "encode":
        return [program, *args, "data.size=32", f"data.num_frames={frames}"]
    if program != "effvid-train":
        return [program, *args, *(["steps=2"] if program == "effvid-sample" else [])]
    return [program, *args, "debug=few_steps", "data.size=32", f"data.num_frames={frames}", "data.batch_size=1",
            "data.val_batch_size=1", "data.shuffle_buffer=4", "trainer.max_steps=2", "~logger"]  # fmt: skip


def run(argv: list[str]) -> None:
    from data_tools import cli as data_cli
    from experiments import export, sample, train

    if argv[0] == "effvid-data":
        assert data_cli.main(argv[1:]) == 0, argv
        return
    entry = {"effvid-train": train.main, "effvid-export": export.main, "effvid-sample": sample.main}[argv[0]]
    sys.argv = argv
    try:
        entry()
    except SystemExit as exit:
        assert exit.code in (0, None), f"{' '.join(argv)} exited with {exit.code}"


@pytest.mark.slow
def test_every_readme_pretrained_command_runs_as_written(
    tiny_pipeline_folders: dict[str, Path], digits_data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("EFFVID_RUNS", raising=False)  # the commands' runs/ is the working folder's
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    shards = digits_data_root / "digits" / "shards"
    videos = sorted((digits_data_root / "digits" / "videos" / "train").glob("*.mp4"))
    with open(tmp_path / "judgements.csv", "w", newline="") as stream:
        csv.writer(stream).writerows([["prompt", "win", "lose"], *[["a handwritten 3 moving up", str(w), str(l)]
                                                                   for w, l in zip(videos[:4], videos[4:8])]])
    paths = {placeholder: str(tiny_pipeline_folders[name]) for placeholder, name in FOLDERS.items()}
    paths.update({"/models/animatediff-motion-adapter": str(tiny_pipeline_folders["motion_adapter"]),
                  "/data/clips_encoded": str(tmp_path / "clips_encoded"), "/data/clips": str(shards),
                  "/data/judgements.csv": str(tmp_path / "judgements.csv"), "/data/pairs": str(tmp_path / "pairs")})  # fmt: skip
    commands = readme_commands()
    assert len(commands) >= 20 and all(any(p in c for p in paths) or "run=" in c for c in commands)
    for command in commands:
        for placeholder in sorted(paths, key=len, reverse=True):  # /data/clips_encoded before /data/clips
            command = command.replace(placeholder, paths[placeholder])
        run(tiny(shlex.split(command)))

    # What the commands promise to leave behind.
    assert (tmp_path / "exports/motion-adapter/config.json").is_file()
    for lora in ("motionlora", "cogvideox-lora", "ltx-lora", "wan-lora", "hunyuan-lora"):
        assert (tmp_path / "exports" / lora / "pytorch_lora_weights.safetensors").is_file(), lora
    for folder in ("modelscope-merged", "cogvideox-merged", "wan-full", "cogvideox-more"):
        assert (tmp_path / "exports" / folder / "model_index.json").is_file(), folder
    assert len(list((tmp_path / "runs/cogvideox/samples").glob("sample-*/*.mp4"))) == 2  # both backends
    assert sorted(p.name for p in (tmp_path / "clips_encoded/train").glob("*.tar")) == ["shard-000000.tar", "shard-000001.tar"]
    for run_id in ("cogvideox-encoded", "cogvideox-dpo", "cogvideox-pd", "cogvideox-simda"):
        assert (tmp_path / "runs" / run_id / "checkpoints/last.ckpt").is_file(), run_id
    shutil.rmtree(tmp_path / "runs")
