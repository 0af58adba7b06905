"""Loader workers ignore SIGTERM (so a signal to the process group cannot kill them before a
checkpoint), so a worker nobody shut down would keep the process from exiting: the joint
image/video loader, whose source loaders run inside it, must shut them down at teardown, and
any loader left running must not stop the interpreter from exiting."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

JOINT_RUN = """
import io, multiprocessing, sys
from pathlib import Path
import numpy as np, webdataset as wds
from PIL import Image
from tests.test_video_datamodule import write_shards
from datamodules import VideoShardDataModule
from datamodules.image_shards import ImageShardDataModule
from datamodules.joint_image_video import JointImageVideoDataModule

root = Path(sys.argv[1])
write_shards(root / "videos", num_shards=1, per_shard=6)
(root / "images").mkdir()
with wds.TarWriter(str(root / "images" / "shard-000000.tar")) as sink:
    for k in range(6):
        png = io.BytesIO()
        Image.fromarray(np.full((8, 8, 3), 30 * k, np.uint8)).save(png, format="PNG")
        sink.write({"__key__": f"{k:06d}", "png": png.getvalue(), "txt": b"a square", "json": b"{}"})

def joint():
    video = VideoShardDataModule(root / "videos", batch_size=2, num_workers=1, num_frames=2, frame_stride=1, size=8)
    images = ImageShardDataModule(root / "images", batch_size=2, num_workers=1, size=8)
    datamodule = JointImageVideoDataModule(video, images, image_ratio=0.5, batch_size=4)
    datamodule.setup("fit")
    return datamodule

first = joint()
batches = iter(first.train_dataloader())
for _ in range(4):  # passes over both sources (6 samples each): the source loaders restart
    next(batches)
assert multiprocessing.active_children(), "the source loaders should run in workers"
first.teardown("fit")  # what Lightning calls at the end of trainer.fit
assert not multiprocessing.active_children(), multiprocessing.active_children()
left_running = iter(joint().train_dataloader())
next(left_running)  # its workers are still running when the interpreter exits
print("exiting")
"""


@pytest.mark.slow
def test_joint_loader_shuts_its_source_workers_down_and_the_process_exits(tmp_path: Path) -> None:
    env = os.environ | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", JOINT_RUN, str(tmp_path)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("exiting")
