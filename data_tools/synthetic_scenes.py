"""Synthetic multi-scene videos for tests and benchmarks: random blocks sliding across the
frame, one colour and block size per scene, so PySceneDetect sees hard cuts between scenes
and optical flow sees steady motion inside them."""

from __future__ import annotations

import cv2
import numpy as np


def scene(num_frames: int, seed: int, speed: float = 1.0, blur: float = 0.0, gain: float = 1.0,
          height: int = 48, width: int = 64) -> np.ndarray:
    """Random blocks (colour and block size from `seed`, never repeating) sliding `speed`
    px/frame right and half that down: `(F, H, W, 3)` uint8. `blur` is a Gaussian sigma in
    pixels, `gain` scales the brightness."""
    rng = np.random.default_rng(seed)
    color, cell = rng.integers(60, 200, 3), int(rng.integers(5, 10)) * max(1, width // 64)
    margin = int(abs(speed) * num_frames) + 2
    grid = rng.random(((height + margin) // cell + 2, (width + 2 * margin) // cell + 2))
    texture = cv2.resize(grid, (grid.shape[1] * cell, grid.shape[0] * cell), interpolation=cv2.INTER_NEAREST)
    frames = []
    for i in range(num_frames):
        x, y = margin - round(speed * i), round(abs(speed) * i / 2)
        frame = (gain * color * (0.4 + 0.6 * texture[y : y + height, x : x + width, None])).astype(np.uint8)
        frames.append(cv2.GaussianBlur(frame, (0, 0), blur) if blur else frame)
    return np.stack(frames)


def multi_scene_video(scene_frames: list[int], seed: int, height: int = 48, width: int = 64) -> np.ndarray:
    """Scenes of the given lengths back to back: `(sum(scene_frames), H, W, 3)`."""
    return np.concatenate([
        scene(n, seed * 1000 + i, speed=1.0 if i % 2 == 0 else -1.0, height=height, width=width)
        for i, n in enumerate(scene_frames)
    ])
