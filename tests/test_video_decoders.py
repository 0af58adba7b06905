"""The decoder backends (`data.decoder`) return the same frames of the same clips.

Clips are encoded here with PyAV in every container/codec the backends must read: H.264 mp4
(with B-frames), VP8 and VP9 WebM (no frame count in the header; VP8/VP9 with alt-ref
frames), MPEG-4 Part 2 AVI and a variable-frame-rate H.264 mp4 (irregular pts). A bright block
moves `STEP` px per frame, so its position names the frame a backend returned. torchcodec is an
optional extra that needs FFmpeg's libraries: its cases skip, with the reason, where it does not
import.
"""

from __future__ import annotations

import io
import itertools
import json
import types
from fractions import Fraction

import av
import numpy as np
import pytest
import torch
import webdataset as wds

from datamodules import VideoShardDataModule, video_decoders
from datamodules.video_decoders import DECODERS, PIXEL_TOLERANCE, DecoderUnavailableError, get_decoder, import_problem
from datamodules.video_decoding import decode_clip

HEIGHT, WIDTH, NUM_FRAMES, STEP, BLOCK = 64, 128, 24, 4, 16
# Milliseconds between frames of the variable-frame-rate clip: 40 to 300 ms, irregular.
VFR_GAPS_MS = [100, 40, 160, 100, 60, 200, 100, 40, 100, 100, 300, 100] * 2


def moving_block(index: int) -> np.ndarray:
    """Frame `index`: a grey block at x = STEP * index over a horizontal blue gradient (chroma)."""
    frame = np.full((HEIGHT, WIDTH, 3), 40, np.uint8)
    frame[:, :, 2] = np.linspace(0, 255, WIDTH, dtype=np.uint8)[None]
    frame[16:48, STEP * index : STEP * index + BLOCK] = 230
    return frame


def frame_numbers(frames: np.ndarray) -> list[int]:
    """The frame index each of uint8 `(F, H, W, 3)` frames shows (the block's left edge / STEP)."""
    bright = frames[:, HEIGHT // 2].astype(float).mean(-1) > 150  # (F, W)
    return [int(np.flatnonzero(row)[0]) // STEP if row.any() else -1 for row in bright]


def encode(container: str, codec: str, options: dict[str, str], pts_ms: list[int] | None = None) -> bytes:
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format=container) as output:
        stream = output.add_stream(codec, rate=10)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        stream.options = {"g": "8", **options}  # a keyframe every 8 frames: late frames need a seek
        if pts_ms is not None:
            stream.time_base = stream.codec_context.time_base = Fraction(1, 1000)
        for index in range(NUM_FRAMES):
            frame = av.VideoFrame.from_ndarray(moving_block(index), format="rgb24")
            if pts_ms is not None:
                frame.pts, frame.time_base = pts_ms[index], Fraction(1, 1000)
            for packet in stream.encode(frame):
                output.mux(packet)
        for packet in stream.encode():
            output.mux(packet)
    return buffer.getvalue()


CODECS = {
    "h264_mp4": ("mp4", "libx264", {"crf": "18", "bf": "2"}, None),
    "vp8_webm": ("webm", "libvpx", {"crf": "10", "b:v": "1M", "auto-alt-ref": "1", "lag-in-frames": "16"}, None),
    "vp9_webm": ("webm", "libvpx-vp9", {"crf": "20", "b:v": "0", "auto-alt-ref": "1", "lag-in-frames": "16"}, None),
    "mpeg4_avi": ("avi", "mpeg4", {"qscale": "2"}, None),
    "vfr_h264_mp4": ("mp4", "libx264", {"crf": "18", "bf": "2"}, [0, *itertools.accumulate(VFR_GAPS_MS[: NUM_FRAMES - 1])]),
}


@pytest.fixture(scope="module")
def clips() -> dict[str, bytes]:
    return {name: encode(*spec) for name, spec in CODECS.items()}


def usable(backend: str) -> str:
    """`backend`, or skip with the reason it does not import here (torchcodec without FFmpeg)."""
    if (problem := import_problem(backend)) is not None:
        pytest.skip(f"{backend} not usable here: {problem}")
    return backend


def decode(backend: str, data: bytes, indices: list[int]) -> tuple[np.ndarray, list[int]]:
    """The backend's frames at `indices` and the frame counts it passed to the chooser."""
    counts: list[int] = []
    frames = DECODERS[backend](data, lambda num_available: counts.append(num_available) or np.array(indices))
    return frames, counts


@pytest.mark.parametrize("backend", list(DECODERS))
@pytest.mark.parametrize("codec", list(CODECS))
@pytest.mark.parametrize("indices", [[0, 1, 2, 3], [3, 7, 20], [17, 18, 19, 20, 21, 22, 23]], ids=["first", "sparse", "late"])
def test_every_backend_returns_the_chosen_frames_and_counts_all_frames(clips, backend, codec, indices):
    # decord reads all five too (WebM seeks and the irregular pts included): asserted, not skipped.
    frames, counts = decode(usable(backend), clips[codec], indices)
    assert frames.dtype == np.uint8 and frames.shape == (len(indices), HEIGHT, WIDTH, 3)
    assert frame_numbers(frames) == indices
    assert counts == [NUM_FRAMES]  # WebM's header has no count: PyAV counts packets, the others scan


@pytest.mark.parametrize("codec", list(CODECS))
def test_backends_give_the_same_pixels_within_the_stated_tolerance(clips, codec):
    every_frame = list(range(NUM_FRAMES))
    frames = {b: decode(b, clips[codec], every_frame)[0].astype(int) for b in DECODERS if import_problem(b) is None}
    assert {"decord", "pyav"} <= frames.keys()  # both are dependencies; torchcodec is optional
    for first, second in itertools.combinations(frames, 2):
        assert np.abs(frames[first] - frames[second]).max() <= PIXEL_TOLERANCE, (first, second)


def test_pyav_decodes_no_further_than_the_last_chosen_frame(clips, monkeypatch):
    yielded = []
    real_open = av.open

    class CountingContainer:  # av's containers are C types whose methods cannot be patched
        def __init__(self, *args, **kwargs):
            self.container = real_open(*args, **kwargs)
            self.streams = self.container.streams

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.container.close()

        def decode(self, *args, **kwargs):
            for frame in self.container.decode(*args, **kwargs):
                yielded.append(frame)
                yield frame

    monkeypatch.setattr(av, "open", CountingContainer)
    frames, counts = decode("pyav", clips["h264_mp4"], [1, 3, 5])
    assert frame_numbers(frames) == [1, 3, 5] and counts == [NUM_FRAMES]
    assert len(yielded) == 6  # frames 0..5 of 24


def test_an_unknown_decoder_names_the_key_and_the_choices():
    with pytest.raises(DecoderUnavailableError, match=r"data\.decoder='ffmpeg' is not a video decoder; choose one of decord, pyav, torchcodec"):
        get_decoder("ffmpeg")


@pytest.fixture
def torchcodec_import_fails(monkeypatch, request):
    """torchcodec's import raising `request.param`, as it does when FFmpeg's libraries are missing."""
    real = video_decoders.importlib.import_module

    def import_module(name: str):
        if name.startswith("torchcodec"):
            raise request.param
        return real(name)

    monkeypatch.setattr(video_decoders, "importlib", types.SimpleNamespace(import_module=import_module))
    import_problem.cache_clear()
    yield
    import_problem.cache_clear()  # the real answer again for the tests after


@pytest.mark.parametrize("torchcodec_import_fails", [
    RuntimeError("Could not load libtorchcodec. Likely causes:\n  1. FFmpeg is not properly installed"),
    ModuleNotFoundError("No module named 'torchcodec'"),
], indirect=True, ids=["no_ffmpeg", "not_installed"])
def test_a_backend_that_does_not_import_raises_one_error_saying_what_to_install(torchcodec_import_fails, tmp_path):
    expected = (r"data\.decoder='torchcodec' cannot be used here \((RuntimeError: Could not load libtorchcodec"
                r"|ModuleNotFoundError: No module named 'torchcodec')\)\. Install it with: pip install "
                r"'effvid\[torchcodec\]' \(a release built for your torch\) and FFmpeg's shared libraries \(apt-get install ffmpeg, or conda "
                r"install -c conda-forge ffmpeg\); or set data\.decoder to one that works here: decord, pyav$")
    with pytest.raises(DecoderUnavailableError, match=expected):
        VideoShardDataModule(tmp_path, decoder="torchcodec")  # at construction, before any worker starts
    with pytest.raises(DecoderUnavailableError, match=expected):  # not a "bad sample" skipped per clip
        decode_clip(b"", url="u", key="k", num_frames=2, stride=1, random_start=False, rng=None, size=None,
                    channels=3, decoder="torchcodec")


def test_the_datamodule_decodes_with_the_configured_backend(clips, tmp_path, monkeypatch):
    with wds.TarWriter(str(tmp_path / "shard-000000.tar")) as sink:
        sink.write({"__key__": "a", "mp4": clips["h264_mp4"], "txt": b"a block", "json": json.dumps({}).encode()})
    calls = []
    real = DECODERS["pyav"]
    monkeypatch.setitem(DECODERS, "pyav", lambda data, choose: calls.append(len(data)) or real(data, choose))
    batches = [VideoShardDataModule(tmp_path, val_shards=tmp_path, batch_size=1, num_workers=0, num_frames=4,
                                    frame_stride=2, size=None, channels=3, decoder=name).val_dataloader()
               for name in ("pyav", "decord")]
    pyav_frames, decord_frames = (next(iter(loader))["frames"] for loader in batches)  # (1, F, H, W, 3) uint8
    assert calls == [len(clips["h264_mp4"])]
    assert frame_numbers(pyav_frames[0].numpy()) == [0, 2, 4, 6] and torch.equal(pyav_frames, decord_frames)
