"""Video decoding, frame sampling, per-frame features into a FeatureStore, VALUE feature import, the 64-frame
resize (data/video.py) and the generated VALUE-format demo (data/video_demo.py). Towers are random (tiny ViT)."""
from __future__ import annotations

import json
import math
import os
import signal
import sys
import textwrap
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data.features import FeatureStore
from data.video import (TINY_VIT_CONFIG, VALUE_SAMPLE_FPS, DecodedVideo, ValueFeatureError, VideoDecodeError,
                        VideoFrames, VideoLoader, extract_video_features, find_videos, import_value_features,
                        load_clip_tower, main, preprocess_frames, read_frames, read_value_npz, resize_frames,
                        resized_size, sample_frame_indices)
from data.video_demo import (COLOURS, DIRECTION_ANSWERS, VISIBILITY_ANSWERS, VideoScene, load_scenes, write_video,
                             write_video_demo)
from eval.cli import main as eval_main
from eval.readers import read_value_captions, read_value_qa
import subprocesses

REPO = Path(__file__).resolve().parents[1]
TINY = "tiny_vit_video_test"
TINY_KW = dict(model_name=TINY, pretrained=None, model_config=TINY_VIT_CONFIG, progress=False)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # a tiny tower gains nothing from a second thread; on a busy 2-core machine spinning OpenMP threads cost more
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("video_demo")
    return write_video_demo(root, n_train_videos=4, n_test_videos=2, seed=3)


def moving_scene(name="probe", *, direction="right", visibility="appears", size=96, fps=8, duration=2.0):
    """A fast-moving shape (2.7 px a frame), so a decoded frame one off from the asked one is caught."""
    visible = {"appears": [[0.5, duration]], "always": [[0.0, duration]]}[visibility]
    return VideoScene(name, "square", "red", "blue", direction, visibility, change_s=1.25, visible=visible,
                      start_xy=[26.0, 40.0], travel=43.0, radius=11.0, background=[120, 120, 130],
                      duration=duration, fps=fps, size=size)


def shape_centroid(frame: np.ndarray, colour) -> tuple[float, float, int]:
    """Centre (x, y) and pixel count of the pixels near `colour` (RGB)."""
    close = np.abs(frame.astype(np.int32) - np.array(colour)).max(-1) < 40
    ys, xs = np.nonzero(close)
    if len(xs) == 0:
        return math.nan, math.nan, 0
    return float(xs.mean()), float(ys.mean()), len(xs)


# ------------------------------------------------------------------------------------------------ sampling

def segment_middles(first: int, count: int, n: int) -> list[int]:
    """Direct: the middle frame of each of n equal segments of `count` frames, in exact rationals."""
    return [first + math.floor(Fraction(2 * k + 1, 2 * n) * count) for k in range(n)]


def test_uniform_sampling_takes_segment_middles():
    assert sample_frame_indices(32, 8.0, n=8) == [2, 6, 10, 14, 18, 22, 26, 30]
    assert sample_frame_indices(100, 25.0, n=3) == [16, 50, 83]
    rng = np.random.default_rng(0)
    for _ in range(300):
        total, n = int(rng.integers(1, 500)), int(rng.integers(1, 80))
        got = sample_frame_indices(total, 30.0, n=n)
        assert got == (segment_middles(0, total, n) if total > n else list(range(total)))


def test_window_sampling_stays_inside_the_window():
    # frames 10..19 are the ones shown during [1 s, 2 s) at 10 fps
    assert sample_frame_indices(100, 10.0, n=5, start=1.0, end=2.0) == [11, 13, 15, 17, 19]
    assert sample_frame_indices(100, 10.0, n=20, start=1.0, end=2.0) == list(range(10, 20))  # fewer than n
    assert sample_frame_indices(100, 10.0, n=3, start=9.5, end=50.0) == [95, 97, 99]  # clipped at the end
    assert sample_frame_indices(100, 10.0, n=4, start=3.0, end=3.0) == [30]  # an instant: its frame
    rng = np.random.default_rng(1)
    for _ in range(300):
        total, fps = int(rng.integers(5, 400)), float(rng.uniform(5, 60))
        duration = total / fps
        s = float(rng.uniform(0, duration * 0.9))
        e = float(rng.uniform(s, duration * 1.2))
        n = int(rng.integers(1, 40))
        got = sample_frame_indices(total, fps, n=n, start=s, end=e)
        # frames whose time falls inside the window (as ffmpeg's trim); none: the frame on screen at its start
        inside = [i for i in range(total) if s <= i / fps < min(e, duration)] or [min(int(s * fps), total - 1)]
        assert got == sorted(set(got)) and set(got) <= set(inside)
        assert len(got) == min(n, len(inside))


def test_fixed_rate_sampling_as_value_one_frame_every_1_5_s():
    got = sample_frame_indices(1800, 30.0, sample_fps=VALUE_SAMPLE_FPS)  # 60 s
    assert len(got) == 40
    assert got[0] == 22 and got[1] == 67 and got[-1] == 1777  # 0.75 s, 2.25 s, ..., 59.25 s
    assert set(np.diff(got)) == {45}
    # a last partial segment counts when its middle is inside: 61 s -> 41 frames, 60.7 s -> 40
    assert len(sample_frame_indices(1830, 30.0, sample_fps=2 / 3)) == 41
    assert len(sample_frame_indices(1821, 30.0, sample_fps=2 / 3)) == 40
    # a frame starting exactly on a tick's half (0.75 s at 24 fps) belongs to the next tick: ffmpeg rounds halves up
    assert sample_frame_indices(240, 24.0, sample_fps=2 / 3)[:3] == [17, 53, 89]
    # inside a window, times count from its start
    assert sample_frame_indices(1800, 30.0, sample_fps=2 / 3, start=10.0, end=13.0) == [322, 367]


def test_short_clips_and_bad_arguments():
    assert sample_frame_indices(30, 30.0, sample_fps=2 / 3) == [22]  # 1 s: the middle of the first 1.5 s
    assert sample_frame_indices(15, 30.0, sample_fps=2 / 3) == [7]  # 0.5 s: too short for one segment
    assert sample_frame_indices(30, 30.0, sample_fps=2 / 3, min_frames=2) == [7, 22]
    assert sample_frame_indices(3, 30.0, n=8) == [0, 1, 2]  # fewer frames than asked: each once
    # faster than the video: ffmpeg's fps filter repeats each frame for every tick it is shown (4 here)
    assert sample_frame_indices(10, 5.0, sample_fps=20.0) == [i for i in range(10) for _ in range(4)]
    with pytest.raises(ValueError, match="exactly one"):
        sample_frame_indices(10, 5.0, n=2, sample_fps=1.0)
    with pytest.raises(ValueError, match="exactly one"):
        sample_frame_indices(10, 5.0)
    with pytest.raises(ValueError, match="after the end|at or after"):
        sample_frame_indices(10, 5.0, n=2, start=2.0, end=3.0)
    with pytest.raises(ValueError, match="before its start"):
        sample_frame_indices(10, 5.0, n=2, start=1.0, end=0.5)
    with pytest.raises(ValueError, match="frame rate"):
        sample_frame_indices(10, 0.0, n=2)


# ------------------------------------------------------------------------------------------------ decoding

def test_decoded_frames_show_what_was_drawn(tmp_path):
    scene = moving_scene()
    path = write_video(tmp_path / "probe.mp4", scene)
    frames, indices, fps, total = read_frames(path)
    assert total == scene.n_frames == 16 and fps == 8.0 and indices == list(range(16))
    assert frames.shape == (16, 96, 96, 3) and frames.dtype == torch.uint8
    order = [13, 2, 9, 9, 0, 15, 6]  # any order, repeats, seeks back and across keyframes (one a second)
    picked, _, _, _ = read_frames(path, indices=order)
    for got, i in zip(picked.numpy(), order):
        drawn = scene.render(i)
        assert np.abs(got.astype(int) - drawn.astype(int)).mean() < 3, f"frame {i}"
        visible, colour, (cx, cy) = scene.state(i / fps)
        x, y, count = shape_centroid(got, COLOURS[colour])
        if visible:
            assert abs(x - cx) < 1.0 and abs(y - cy) < 1.0 and count > 300, f"frame {i}: ({x}, {y}) vs ({cx}, {cy})"
            other = "blue" if colour == "red" else "red"
            assert shape_centroid(got, COLOURS[other])[2] == 0
        else:
            assert count == 0 and np.abs(got.astype(int) - scene.background).max() < 12


def test_dataset_windows_and_resize(demo):
    videos = dict(sorted(find_videos(demo["videos_tv"]).items())[:2])
    first, second = videos
    dataset = VideoFrames(videos, n_frames=4, windows={first: (1.0, 2.0)}, resize="crop")
    a, b = dataset[0], dataset[1]
    assert a.id == first and a.indices == [9, 11, 13, 15] and a.times == [1.125, 1.375, 1.625, 1.875]
    assert b.id == second and b.indices == [4, 12, 20, 28]  # no window: the whole 4 s
    assert a.frames.shape == (4, 3, 224, 224) and a.frames.dtype == torch.uint8
    raw, _, _, _ = read_frames(videos[first], indices=a.indices)
    assert torch.equal(a.frames, preprocess_frames(raw, 224, "crop"))
    assert len(VideoFrames(videos).__getitem__(0).indices) == 3  # VALUE's default: 4 s at one frame a 1.5 s


def test_preprocess_crop_keeps_aspect_and_takes_the_centre():
    assert resized_size(360, 640, 224, "crop") == (224, 398)
    assert resized_size(640, 360, 224, "crop") == (398, 224)
    assert resized_size(360, 640, 224, "squash") == (224, 224)
    frame = np.zeros((1, 96, 160, 3), np.uint8)  # thirds: red | green | blue
    frame[:, :, :53] = (255, 0, 0)
    frame[:, :, 53:107] = (0, 255, 0)
    frame[:, :, 107:] = (0, 0, 255)
    out = preprocess_frames(torch.from_numpy(frame), 224, "crop")
    assert out.shape == (1, 3, 224, 224) and out.dtype == torch.uint8
    # 160x96 -> 373x224; the crop keeps columns 74..297 of 373, i.e. 31.7..127.9 of the original 160
    assert out[0, :, 112, 0].tolist() == [255, 0, 0] and out[0, :, 112, 223].tolist() == [0, 0, 255]
    assert out[0, :, 112, 112].tolist() == [0, 255, 0]
    green = (out[0, 1, 112] > 128).nonzero().flatten()
    assert abs((green.min() + green.max()).item() / 2 - 111.5) < 3  # the green third sits in the middle
    squashed = preprocess_frames(torch.from_numpy(frame), 224, "squash")
    red = (squashed[0, 0, 112] > 128).sum().item()
    assert abs(red - 224 * 53 / 160) < 3  # the whole width is kept


def write_bad_videos(folder: Path, good: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    data = bytearray(good.read_bytes())
    at = data.find(b"mdat")
    size = int.from_bytes(data[at - 4:at], "big")
    garbage = bytes(np.random.default_rng(0).integers(0, 256, size - 8, dtype=np.uint8))
    data[at + 4:at - 4 + size] = garbage  # the container is intact, the frame data is not
    (folder / "corrupt.mp4").write_bytes(bytes(data))
    (folder / "truncated.mp4").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (folder / "empty.mp4").write_bytes(b"")
    (folder / "notes.mp4").write_text("this is not a video\n" * 40)
    return {"corrupt": folder / "corrupt.mp4", "truncated": folder / "truncated.mp4", "empty": folder / "empty.mp4",
            "notes": folder / "notes.mp4", "missing": folder / "missing.mp4"}


BAD_REASONS = {"corrupt": "corrupt or truncated video data", "truncated": "cannot open as a video",
               "empty": "empty file (0 bytes)", "notes": "cannot open as a video", "missing": "file not found"}


@pytest.mark.parametrize("num_workers", [0, 2])
def test_bad_videos_are_reported_by_id_and_skipped(tmp_path, demo, num_workers):
    good = dict(sorted(find_videos(demo["videos_tv"]).items())[:3])
    bad = write_bad_videos(tmp_path / "bad", next(iter(good.values())))
    items = sorted({**good, **bad}.items())  # bad ones between good ones
    seen = []
    loader = VideoLoader(VideoFrames(items, n_frames=4), num_workers=num_workers,
                         on_failure=lambda key, reason: seen.append(key))
    decoded = list(loader)
    assert [v.id for v in decoded] == sorted(good)
    assert all(isinstance(v, DecodedVideo) and v.frames.shape == (4, 96, 96, 3) for v in decoded)
    assert set(loader.failures) == set(bad) and sorted(seen) == sorted(bad)
    for key, reason in loader.failures.items():
        assert BAD_REASONS[key] in reason, (key, reason)
    assert loader.decoded == len(good)

    with pytest.raises(VideoDecodeError) as raised:
        list(VideoLoader(VideoFrames(items, n_frames=4, on_error="raise"), num_workers=num_workers))
    first_bad = next(k for k, _ in items if k in bad)
    assert raised.value.video_id == first_bad and first_bad in str(raised.value)
    assert BAD_REASONS[first_bad] in str(raised.value)


class CrashingFrames(VideoFrames):
    """Stands in for a decoder that segfaults on one file and hangs on another."""

    def decode(self, key, path):
        if key == self.crash:
            os.kill(os.getpid(), signal.SIGSEGV)
        if key == self.hang:
            time.sleep(30)  # then it would decode: only a loader that stops it after 1.5 s fails this video
        return super().decode(key, path)


def test_a_crashing_or_hanging_decoder_costs_only_its_video(demo):
    items = sorted(find_videos(demo["videos_tv"]).items())[:6]
    dataset = CrashingFrames(items, n_frames=2)
    dataset.crash, dataset.hang = items[1][0], items[3][0]
    loader = VideoLoader(dataset, num_workers=2, decode_timeout=1.5)
    t0 = time.perf_counter()
    got = [v.id for v in loader]
    assert got == [k for k, _ in items if k not in (dataset.crash, dataset.hang)]
    assert "decoder crashed" in loader.failures[dataset.crash] and "SIGSEGV" in loader.failures[dataset.crash]
    assert "did not finish within 1.5 s" in loader.failures[dataset.hang]
    assert loader.restarts == 2 and time.perf_counter() - t0 < 25

    dataset.on_error = "raise"
    with pytest.raises(VideoDecodeError, match="decoder crashed") as raised:
        list(VideoLoader(dataset, num_workers=2, decode_timeout=1.5))
    assert raised.value.video_id == dataset.crash


# ------------------------------------------------------------------------------------------------ users' own videos

AV1_ENCODERS = {"libsvtav1": {"preset": "12"}, "libaom-av1": {"cpu-used": "8"}, "librav1e": {"speed": "10"}}
# 30 fps for 1 s, 5 fps for 1 s, 30 fps for 1 s: a variable frame rate (average 21.7 fps)
VFR_TIMES = [i / 30 for i in range(30)] + [1 + i / 5 for i in range(5)] + [2 + i / 30 for i in range(30)]


def av1_encoder() -> str:
    import av
    found = [c for c in AV1_ENCODERS if c in av.codecs_available]
    assert found, f"PyAV has no AV1 encoder (tried {list(AV1_ENCODERS)})"
    return found[0]


def write_timed_video(path: Path, times, *, codec: str = "libx264", options=None, size=(64, 48)) -> Path:
    """Frame i shown from times[i] seconds (any spacing: a variable rate), in a 1/90000 s time base so that times
    such as 0.75 s are exact. H.264 default: a keyframe every 10 frames, no B-frames."""
    import av
    time_base = Fraction(1, 90000)
    width, height = size
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=30)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.time_base = stream.codec_context.time_base = time_base
        stream.options = options or AV1_ENCODERS.get(codec) or {"preset": "ultrafast", "g": "10", "bf": "0"}
        for i, t in enumerate(times):
            image = np.zeros((height, width, 3), np.uint8)
            image[:] = (40 + (i * 37) % 180, 60 + (i * 11) % 160, 90)
            x = (3 * i) % (width - 8)
            image[8:24, x:x + 8] = 255  # a bar that moves 3 px a frame: neighbouring frames differ
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts, frame.time_base = round(Fraction(t) / time_base), time_base
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def pyav_frames(path) -> tuple[list[int], list[np.ndarray]]:
    """(pts, RGB) of every frame PyAV decodes, in order, skipping packets that do not decode."""
    import av
    pts, images = [], []
    with av.open(str(path)) as container:
        for packet in container.demux(video=0):
            try:
                decoded = packet.decode()
            except av.error.FFmpegError:
                continue
            for frame in decoded:
                pts.append(frame.pts)
                images.append(frame.to_ndarray(format="rgb24"))
    return pts, images


def ffmpeg_fps_filter(path, rate: str, shift: bool = True) -> tuple[list[int], np.ndarray]:
    """What ffmpeg's own `fps` filter (libavfilter through PyAV's filter graph, `fps=<rate>`, default round=near)
    emits for the file's frames: (the presentation index of each output frame's source frame, the output
    frames as RGB). shift: times from the first frame, as ffmpeg's command line shifts a file's start to 0."""
    import av
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = list(container.decode(stream))  # presentation order; kept alive: their opaque tags live on
        time_base = stream.time_base
    graph = av.filter.Graph()
    first = frames[0]
    buffer = graph.add_buffer(width=first.width, height=first.height, format=first.format.name,
                              time_base=time_base)
    graph.link_nodes(buffer, graph.add("fps", f"fps={rate}"), graph.add("buffersink")).configure()
    origin = first.pts if shift else 0
    out = []

    def drain():
        while True:
            try:
                out.append(graph.pull())
            except (av.BlockingIOError, av.EOFError):
                return

    for i, frame in enumerate(frames):
        frame.opaque = i
        frame.pts -= origin
        graph.push(frame)
        drain()
    graph.push(None)  # end of stream at the last frame's pts + duration, as the command line's decoder sends
    drain()
    return [o.opaque for o in out], np.stack([o.to_ndarray(format="rgb24") for o in out])


@pytest.fixture(scope="module")
def timed_clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("timed_clips")
    late = [0.5 + t for t in VFR_TIMES]  # the stream's first pts is 0.5 s
    return {
        "vfr": write_timed_video(root / "vfr.mp4", VFR_TIMES),
        # 24 fps: 0.75 s, 2.25 s, ... are frame starts, exact ties for 2/3 fps; B-frames (x264 veryfast)
        "cfr24": write_timed_video(root / "cfr24.mp4", [i / 24 for i in range(72)], options={"preset": "veryfast"}),
        "cfr30": write_timed_video(root / "cfr30.mp4", [i / 30 for i in range(45)]),  # ends at 1.5 s: a tie at 1 fps
        "late": write_timed_video(root / "late.mp4", late),
        "av1_late": write_timed_video(root / "av1_late.mp4", late, codec=av1_encoder()),
    }


@pytest.mark.parametrize("clip, rate", [("vfr", "2/3"), ("vfr", "1"), ("vfr", "3"), ("vfr", "8"), ("cfr24", "2/3"),
                                        ("cfr24", "1/2"), ("cfr30", "1"), ("cfr30", "2/3"), ("late", "2/3"),
                                        ("av1_late", "2/3"), ("av1_late", "3")])
def test_sample_fps_takes_the_frames_ffmpegs_fps_filter_emits(timed_clips, clip, rate):
    """VALUE's features came from `ffmpeg -vf fps=2/3`: same frames (pixels too) on variable- and constant-rate
    clips, ties (24 fps), the end-of-stream tick (cfr30 at 1 fps: 1.5 s gives 2), rates above the clip's own
    (repeats), a stream starting at 0.5 s, and AV1 (read with PyAV)."""
    path = timed_clips[clip]
    want, want_frames = ffmpeg_fps_filter(path, rate)
    frames, indices, _, _ = read_frames(path, sample_fps=float(Fraction(rate)))
    assert indices == want
    assert np.array_equal(frames.numpy(), want_frames)
    if clip in ("late", "av1_late"):  # the origin matters here: on raw pts the filter's ticks fall elsewhere
        assert ffmpeg_fps_filter(path, rate, shift=False)[0] != want


def test_uniform_and_window_sampling_follow_time_on_a_variable_rate_clip(timed_clips):
    path = timed_clips["vfr"]
    _, images = pyav_frames(path)

    def shown_at(t):  # the frame on screen at time t
        return max(i for i, start in enumerate(VFR_TIMES) if start <= t + 1e-9)

    # 8 frames over 3 s: the frames shown at 0.1875 s, 0.5625 s, ... (by frame count they bunch in the 30 fps parts)
    video = VideoFrames([("vfr", path)], n_frames=8)[0]
    assert video.indices == [shown_at((k + 0.5) * 3 / 8) for k in range(8)]
    assert np.allclose(video.times, [VFR_TIMES[i] for i in video.indices], atol=1e-5)
    assert max(np.diff(video.times)) < 0.45  # no 1.8 s hole
    assert all(np.array_equal(f, images[i]) for f, i in zip(video.frames.numpy(), video.indices))
    # a window: only frames whose time falls inside [1.0, 2.5); its frames are shown from 1.0 to 2.5 s
    windowed = VideoFrames([("vfr", path)], n_frames=4, windows={"vfr": (1.0, 2.5)})[0]
    assert windowed.indices == [shown_at(1.0 + (k + 0.5) * 1.5 / 4) for k in range(4)] == [30, 32, 34, 44]
    per_second = VideoFrames([("vfr", path)], sample_fps=2.0, windows={"vfr": (1.0, 2.5)})[0]
    assert per_second.indices == [shown_at(1.0 + (k + 0.5) / 2) for k in range(3)]  # 1.25, 1.75, 2.25 s
    for v in (windowed, per_second):
        assert all(1.0 <= t < 2.5 for t in v.times), v.times


def test_av1_is_read_with_pyav_with_the_same_sampling(timed_clips, tmp_path):
    import decord
    path = write_timed_video(tmp_path / "av1.mp4", VFR_TIMES, codec=av1_encoder())
    with pytest.raises(Exception, match="cannot find video stream"):
        decord.VideoReader(str(path))  # decord 0.6 cannot open AV1 at all
    _, images = pyav_frames(path)
    for kw in (dict(n_frames=8), dict(n_frames=4, windows={"clip": (1.0, 2.5)}), dict(sample_fps=3.0)):
        video = VideoFrames([("clip", path)], **kw)[0]
        twin = VideoFrames([("clip", timed_clips["vfr"])], **kw)[0]  # the same frame times in H.264, via decord
        assert video.decoder == "pyav" and "decord cannot open it" in video.fallback and video.filled == 0
        assert twin.decoder == "decord" and twin.fallback is None
        assert video.indices == twin.indices and video.times == pytest.approx(twin.times, abs=1e-5)
        assert all(np.array_equal(f, images[i]) for f, i in zip(video.frames.numpy(), video.indices))


def damage_packets(clean: Path, out: Path, which) -> Path:
    """A copy of `clean` with the data of its packets `which` (presentation order) overwritten with garbage: the
    container is intact, those frames are not."""
    import av
    with av.open(str(clean)) as container:
        packets = sorted((p.pts, p.pos, p.size) for p in container.demux(video=0) if p.size)
    data = bytearray(clean.read_bytes())
    rng = np.random.default_rng(0)
    for i in which:
        _, pos, size = packets[i]
        data[pos:pos + size] = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
    out.write_bytes(bytes(data))
    return out


@pytest.fixture(scope="module")
def damaged_clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("damaged")
    clean = write_timed_video(root / "clean.mp4", [i / 30 for i in range(60)])
    return {"clean": clean,
            "damaged": damage_packets(clean, root / "damaged.mp4", [25, 26, 27, 41]),
            "wrecked": damage_packets(clean, root / "wrecked.mp4", range(5, 56))}  # 9 of 60 frames left


def test_a_damaged_video_keeps_the_frames_that_decode_and_fills_the_rest(damaged_clips):
    from data.video import VideoReadError, read_video
    path = damaged_clips["damaged"]
    with pytest.raises(Exception):
        read_video(path, decoder="decord")  # decord gives up on the whole file
    decodable, images = pyav_frames(path)
    clean_pts, _ = pyav_frames(damaged_clips["clean"])
    assert sorted(clean_pts.index(p) for p in set(clean_pts) - set(decodable)) == [25, 26, 27, 41]  # the damaged ones
    got = read_video(path)  # every frame
    assert got.decoder == "pyav" and "decord cannot decode its frames" in got.fallback
    assert got.indices == list(range(60)) and got.filled == 4
    own = [clean_pts[i] in decodable for i in got.indices]
    assert got.decoded == own

    def nearest(i):  # the decoded frame nearest in time to frame i, the earlier on a tie
        return decodable.index(min(decodable, key=lambda p: (abs(p - clean_pts[i]), p)))

    for frame, i in zip(got.frames.numpy(), got.indices):
        assert np.array_equal(frame, images[nearest(i)]), i
    # frames 25 <- 24, 26 <- 24 (a tie with 28), 27 <- 28, 41 <- 40 (a tie with 42)
    assert [clean_pts.index(decodable[nearest(i)]) for i in (25, 26, 27, 41)] == [24, 24, 28, 40]
    # sampled frames come from the timestamps, so the damage does not move them
    video = VideoFrames([("d", path)], n_frames=20)[0]
    assert video.indices == VideoFrames([("c", damaged_clips["clean"])], n_frames=20)[0].indices
    assert video.decoder == "pyav" and video.filled == 1  # frame 25 of 1, 4, ..., 58

    wrecked = damaged_clips["wrecked"]
    with pytest.raises(VideoReadError, match=r"corrupt or truncated video data: 3 of 20 sampled frames decoded "
                                             r"\(15%\), below the minimum of 50%"):
        read_video(wrecked, n=20)
    failure = VideoFrames([("w", wrecked)], n_frames=20, min_decodable=0.2)[0]
    assert failure.reason.startswith("corrupt or truncated video data: 3 of 20") and "20%" in failure.reason
    kept = VideoFrames([("w", wrecked)], n_frames=20, min_decodable=0.15)[0]
    assert kept.filled == 17 and kept.frames.shape == (20, 48, 64, 3)


def test_the_loader_counts_and_logs_fallbacks_filled_frames_and_skips(damaged_clips, caplog):
    items = [("clean", damaged_clips["clean"]), ("damaged", damaged_clips["damaged"]),
             ("wrecked", damaged_clips["wrecked"])]
    loader = VideoLoader(VideoFrames(items, n_frames=20), num_workers=0)
    with caplog.at_level("INFO", logger="data.video"):
        assert [v.id for v in loader] == ["clean", "damaged"]
    # the wrecked file went to PyAV too, but it is a skip (a failure), not a video read by the fallback
    assert set(loader.fallbacks) == {"damaged"} and loader.filled == {"damaged": 1}
    assert "3 of 20 sampled frames decoded (15%)" in loader.failures["wrecked"]
    text = caplog.text
    assert "'damaged'" in text and "read with PyAV" in text and "1 of its 20 sampled frames did not decode" in text
    assert "video 'wrecked' skipped" in text


@pytest.mark.parametrize("suffix", [".mp4", ".mkv"])
def test_a_file_cut_short_keeps_its_length_and_counts_the_lost_frames(damaged_clips, tmp_path, suffix):
    """An interrupted download with its header in front (MP4 with the index first; Matroska): the header declares
    2 s, the data stops after about 35 frames. decord fails on the MP4 and reads the Matroska file as a 1.2 s
    video; both are sampled over their declared length, the frames after the cut counting as not decoded."""
    import av
    from data.video import read_video
    whole = tmp_path / f"whole{suffix}"
    with av.open(str(damaged_clips["clean"])) as source, \
            av.open(str(whole), "w", options={"movflags": "faststart"} if suffix == ".mp4" else {}) as out:
        stream = out.add_stream_from_template(source.streams.video[0])
        for packet in source.demux(video=0):
            if packet.dts is not None:
                packet.stream = stream
                out.mux(packet)
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(whole.read_bytes()[:int(whole.stat().st_size * 0.6)])
    got, want = read_video(cut, n=6), read_video(whole, n=6)
    assert want.decoder == "decord" and got.decoder == "pyav"
    assert got.n_video_frames == want.n_video_frames == 60 and got.indices[:3] == want.indices[:3]
    # the lost frames' times are not in the file: they are placed at the average frame spacing (Matroska's 1 ms
    # clock rounds the real ones), so a sample after the cut may land one frame off
    assert all(abs(a - b) <= 1 for a, b in zip(got.indices, want.indices)) and len(got.indices) == 6
    assert got.decoded == [True, True, True, False, False, False] and got.filled == 3
    assert torch.equal(got.frames[:3], want.frames[:3])
    last_decoded = pyav_frames(cut)[1][-1]  # the nearest decoded frame to everything after the cut
    assert all(np.array_equal(f, last_decoded) for f in got.frames[3:].numpy())
    assert got.times[:3] == pytest.approx(want.times[:3], abs=1e-6) and got.times[-1] < 2.0


@pytest.mark.parametrize("audio_seconds", [2.3, 4.0])
def test_audio_running_past_the_video_is_not_a_cut(damaged_clips, tmp_path, audio_seconds):
    """A Matroska file's own duration is its longest track's: audio longer than the video (by 0.3 s, and by 2 s,
    beyond any tolerance) must not make a whole video look cut short; the video track's DURATION tag says its own
    length."""
    import av
    from data.video import read_video
    path = tmp_path / "with_audio.mkv"
    with av.open(str(damaged_clips["clean"])) as source, av.open(str(path), "w") as out:
        video = out.add_stream_from_template(source.streams.video[0])
        audio = out.add_stream("pcm_s16le", rate=8000, layout="mono")
        for packet in source.demux(video=0):
            if packet.dts is not None:
                packet.stream = video
                out.mux(packet)
        for k in range(round(audio_seconds * 10)):  # silence, in frames of 0.1 s; the video lasts 2 s
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
            frame.sample_rate, frame.pts = 8000, 800 * k
            for packet in audio.encode(frame):
                out.mux(packet)
        for packet in audio.encode():
            out.mux(packet)
    for decoder in ("auto", "pyav"):
        got = read_video(path, n=6, decoder=decoder)
        assert got.decoder == ("decord" if decoder == "auto" else "pyav") and got.filled == 0
        assert got.n_video_frames == 60 and got.indices == [4, 15, 25, 34, 45, 55]


def test_extraction_counts_fallbacks_and_filled_frames(tmp_path, damaged_clips, capsys):
    folder = tmp_path / "videos"
    folder.mkdir()
    for name in ("clean", "damaged", "wrecked"):
        (folder / f"{name}.mp4").write_bytes(damaged_clips[name].read_bytes())
    write_timed_video(folder / "av1.mp4", [i / 30 for i in range(45)], codec=av1_encoder())
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY_VIT_CONFIG))
    args = ["features", "--videos-dir", str(folder), "--out", str(tmp_path / "s"), "--model", TINY, "--model-config",
            str(config), "--pretrained", "none", "--n-frames", "20", "--num-workers", "1", "--no-progress"]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["extracted"] == 3 and summary["failed"] == 1 and summary["failed_ids"] == ["wrecked"]
    assert summary["decoder_fallbacks"] == 2 and summary["decoder_fallback_ids"] == ["av1", "damaged"]
    assert summary["filled_frames"] == 1 and summary["videos_with_filled_frames"] == 1
    store = FeatureStore(tmp_path / "s")
    assert "3 of 20 sampled frames decoded (15%)" in store.failures()["wrecked"]
    notes = store.notes()
    assert set(notes) == {"av1", "damaged"}
    assert notes["damaged"]["decoder"] == "pyav" and notes["damaged"]["filled_frames"] == 1
    assert notes["damaged"]["sampled_frames"] == 20 and "cannot decode" in notes["damaged"]["fallback"]
    assert notes["av1"]["filled_frames"] == 0 and "cannot open" in notes["av1"]["fallback"]
    assert store.metadata["sampling"]["timestamps"] == "pts" and store.shape("av1") == (20, 32)
    # a lower bar takes the wrecked video on the next run; the others are already done
    assert main(args + ["--min-decodable", "0.1"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["extracted"] == 1 and summary["skipped"] == 3 and summary["filled_frames"] == 17
    assert FeatureStore(tmp_path / "s").notes()["wrecked"]["filled_frames"] == 17
    with pytest.raises(SystemExit):
        main(args + ["--min-decodable", "1.5"])


def test_a_store_of_the_frame_index_rule_is_not_resumed(tmp_path, demo):
    """A store written before sampling by timestamps (the metadata it recorded then) is refused, not extended
    with frames picked by the new rule."""
    from data.features import FeatureWriter
    from data.video import video_feature_metadata
    videos = dict(sorted(find_videos(demo["videos_tv"]).items())[:1])
    old = video_feature_metadata(TINY, None, TINY_VIT_CONFIG, n_frames=4)
    old["sampling"] = {"n_frames": 4, "min_frames": 1, "window": "whole video"}
    old["decoder"] = "decord"
    del old["damaged_frames"]
    FeatureWriter(tmp_path / "old", old).close()
    with pytest.raises(ValueError, match=r"other settings(.|\n)*sampling: store has .*this writer has .*\"pts\""):
        extract_video_features(videos, tmp_path / "old", n_frames=4, num_workers=0, **TINY_KW)


# ------------------------------------------------------------------------------------------------ features

def direct_features(visual, mean, std, path, n):
    """The tower's output on each frame, computed here step by step (the crop is tested on its own above)."""
    frames, _, _, _ = read_frames(path, n=n)
    pixels = preprocess_frames(frames, 224, "crop").float() / 255
    pixels = (pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        return visual(pixels)


def test_extraction_writes_one_entry_per_video_and_matches_the_tower(tmp_path, demo):
    videos = dict(sorted(find_videos(demo["videos_how2"]).items())[:5])
    videos["gone"] = tmp_path / "gone.mp4"
    store_dir = tmp_path / "store"
    # batch of 6 frames over videos of 4: batches mix videos and split them
    report = extract_video_features(videos, store_dir, n_frames=4, batch_size=6, num_workers=1, shard_size=2,
                                    **TINY_KW)
    assert report.extracted == 5 and report.frames == 20 and set(report.failed) == {"gone"}
    store = FeatureStore(store_dir)
    assert sorted(store.ids()) == sorted(k for k in videos if k != "gone")
    assert store.failures() == {"gone": "file not found"}
    assert store.metadata["kind"] == "video_frames" and store.metadata["sampling"]["n_frames"] == 4
    assert store.metadata["feature_dim"] == TINY_VIT_CONFIG["embed_dim"] and store.dtype == torch.float16
    visual, mean, std = load_clip_tower(TINY, None, "cpu", TINY_VIT_CONFIG)
    for key in store.ids():
        got = store.get(key)
        want = direct_features(visual, mean, std, videos[key], 4)
        assert got.shape == (4, 32) and got.dtype == torch.float16
        torch.testing.assert_close(got.float(), want.half().float(), atol=2e-3, rtol=2e-3)
        assert not torch.allclose(got.float().norm(dim=1), torch.ones(4), atol=1e-2)  # not L2-normalised

    # a rerun skips everything; other settings are refused, not mixed into the store
    again = extract_video_features(videos, store_dir, n_frames=4, batch_size=6, num_workers=0, **TINY_KW)
    assert again.skipped == 5 and again.extracted == 0
    with pytest.raises(ValueError, match="other settings"):
        extract_video_features(videos, store_dir, n_frames=8, num_workers=0, **TINY_KW)


TINY_RN = "tiny_rn_video_test"
TINY_RN_CONFIG = {"embed_dim": 32, "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8,
                                                  "head_width": 32}}


def test_batchnorm_calibration_of_a_random_resnet_tower(tmp_path, demo):
    """calibrate_batchnorm=N: the BatchNorm statistics come from the frames of the first N videos (by id), sampled
    and resized as extracted; the store records it, and it makes the frames' embeddings tell frames apart."""
    from data.image_features import estimate_batchnorm_statistics

    videos = dict(sorted(find_videos(demo["videos_tv"]).items()))
    kw = dict(model_name=TINY_RN, pretrained=None, model_config=TINY_RN_CONFIG, n_frames=4, num_workers=0,
              progress=False)
    plain = FeatureStore(extract_video_features(videos, tmp_path / "plain", **kw).store)
    report = extract_video_features(videos, tmp_path / "calibrated", calibrate_batchnorm=3, **kw)
    calibrated = FeatureStore(report.store)
    assert report.extracted == len(videos) and calibrated.metadata["calibrate_batchnorm"] == 3
    assert "calibrate_batchnorm" not in plain.metadata

    visual, mean, std = load_clip_tower(TINY_RN, None, "cpu", TINY_RN_CONFIG)
    frames = [preprocess_frames(read_frames(p, n=4)[0], 64, "crop") for p in list(videos.values())[:3]]
    pixels = (torch.cat(frames).float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    estimate_batchnorm_statistics(visual, pixels)
    for key, path in videos.items():
        frames = preprocess_frames(read_frames(path, n=4)[0], 64, "crop").float() / 255
        with torch.no_grad():
            want = visual((frames - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1))
        torch.testing.assert_close(calibrated.get(key).float(), want.half().float(), atol=2e-3, rtol=2e-3)

    def mean_cosine(store):
        x = torch.cat([store.get(k).float() for k in store.ids()])
        return F.cosine_similarity(x[:, None], x[None], dim=-1).mean().item()
    assert mean_cosine(calibrated) < 0.8 < 0.95 < mean_cosine(plain)  # measured 0.58 and 0.998

    with pytest.raises(ValueError, match="other settings"):  # a resume must calibrate the same way
        extract_video_features(videos, tmp_path / "calibrated", calibrate_batchnorm=2, **kw)
    with pytest.raises(ValueError, match="BatchNorm"):
        extract_video_features(videos, tmp_path / "vit", n_frames=4, num_workers=0, calibrate_batchnorm=2, **TINY_KW)
    with pytest.raises(ValueError, match="random towers"):
        extract_video_features(videos, tmp_path / "pretrained", model_name="RN50", pretrained="openai",
                               calibrate_batchnorm=2, progress=False)


def test_value_rate_extraction_frame_counts(tmp_path, demo):
    videos = dict(sorted(find_videos(demo["videos_yc2"]).items())[:2])
    report = extract_video_features(videos, tmp_path / "s", sample_fps=1.0, batch_size=64, num_workers=0,
                                    **TINY_KW)
    store = FeatureStore(tmp_path / "s")
    assert report.extracted == 2
    for key in videos:  # 4 s at 1 frame a second: frames at 0.5, 1.5, 2.5, 3.5 s
        assert store.shape(key) == (4, 32)
    meta = store.metadata["sampling"]
    assert meta["sample_fps"] == 1.0 and meta["first_frame_s"] == 0.5


def test_extraction_resumes_after_a_kill(tmp_path, demo):
    videos = {k: str(v) for k, v in sorted(find_videos(demo["videos_tv"]).items())}
    store_dir = tmp_path / "store"
    script = textwrap.dedent(f"""
        import os, signal, torch
        import data.video as video
        calls = [0]
        forward = video.frame_embeddings
        def dying(visual, pixels):  # killed -9 in the 4th tower batch, with shards already written
            calls[0] += 1
            if calls[0] == 4:
                os.kill(os.getpid(), signal.SIGKILL)
            return forward(visual, pixels)
        video.frame_embeddings = dying
        torch.set_num_threads(1)
        video.extract_video_features({videos!r}, {str(store_dir)!r}, model_name={TINY!r}, pretrained=None,
            model_config=video.TINY_VIT_CONFIG, n_frames=2, batch_size=2, num_workers=1, shard_size=1,
            progress=False)
    """)
    proc = subprocesses.run([sys.executable, "-c", script], what="video extraction killed in its 4th batch", timeout=120,
                            cwd=REPO)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    done = FeatureStore(store_dir).ids()
    assert 1 <= len(done) < len(videos)
    report = extract_video_features(videos, store_dir, n_frames=2, batch_size=2, num_workers=0, **TINY_KW)
    assert report.skipped == len(done) and report.extracted == len(videos) - len(done)
    store = FeatureStore(store_dir)
    assert sorted(store.ids()) == sorted(videos) and store.duplicates == 0
    visual, mean, std = load_clip_tower(TINY, None, "cpu", TINY_VIT_CONFIG)
    for key in done[:1] + [k for k in videos if k not in done][:1]:  # one from each run: same tower
        torch.testing.assert_close(store.get(key).float(),
                                   direct_features(visual, mean, std, videos[key], 2).half().float(),
                                   atol=2e-3, rtol=2e-3)


def test_features_cli(tmp_path, demo, capsys):
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY_VIT_CONFIG))
    assert main(["features", "--videos-dir", str(demo["videos_tv"]), "--glob", "*clip_0[01].mp4", "--out",
                 str(tmp_path / "s"), "--model", TINY, "--model-config", str(config), "--pretrained", "none",
                 "--n-frames", "3", "--num-workers", "0", "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    n = len(list(Path(demo["videos_tv"]).glob("*clip_0[01].mp4")))
    assert summary["extracted"] == n and summary["failed"] == 0 and n >= 2
    assert all(FeatureStore(tmp_path / "s").shape(k) == (3, 32) for k in FeatureStore(tmp_path / "s").ids())
    # VALUE's rate as a fraction: exactly the default, so a store made with the default resumes
    args = ["features", "--videos-dir", str(demo["videos_yc2"]), "--out", str(tmp_path / "v"), "--model", TINY,
            "--model-config", str(config), "--pretrained", "none", "--num-workers", "0", "--no-progress"]
    assert main(args) == 0 and main(args + ["--sample-fps", "2/3"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["skipped"] == summary["requested"] == 6 and summary["extracted"] == 0
    assert FeatureStore(tmp_path / "v").metadata["sampling"]["sample_fps"] == VALUE_SAMPLE_FPS


# ------------------------------------------------------------------------------------------------ VALUE import

def write_value_npz(folder: Path, names_frames: dict[str, int], seed=0) -> dict[str, np.ndarray]:
    """Files exactly as VALUE's release: {vid_name}.npz holding "features", (n_frames, 512) float16."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = {}
    for name, n in names_frames.items():
        a = rng.normal(0, 0.5, (n, 512)).astype(np.float16)
        np.savez(folder / f"{name}.npz", features=a)
        out[name] = a
    return out


def test_value_import(tmp_path, capsys):
    arrays = write_value_npz(tmp_path / "clip-vit", {"s03e02_seg02_clip_10": 47, "25848": 3, "ljyO7IaGWLY_10": 130})
    report = import_value_features(tmp_path / "clip-vit", tmp_path / "store", progress=False)
    assert report.imported == 3 and report.frames == 180
    store = FeatureStore(tmp_path / "store")
    assert store.metadata["source"].startswith("VALUE release") and store.dtype == torch.float16
    for name, a in arrays.items():
        got = store.get(name)
        assert got.dtype == torch.float16 and np.array_equal(got.numpy(), a)
    # the CLI, resumed: nothing new to import
    assert main(["import-value", "--features-dir", str(tmp_path / "clip-vit"), "--out", str(tmp_path / "store"),
                 "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["skipped"] == 3 and summary["imported"] == 0 and summary["in_store"] == 3


def test_bad_value_files_name_the_file(tmp_path):
    folder = tmp_path / "clip-vit"
    write_value_npz(folder, {"a_good": 5, "z_good": 7})
    (folder / "b_text.npz").write_text("not an npz")
    np.savez(folder / "c_nokey.npz", feats=np.zeros((4, 512), np.float16))
    np.savez(folder / "d_3d.npz", features=np.zeros((4, 2, 512), np.float16))
    np.savez(folder / "e_empty.npz", features=np.zeros((0, 512), np.float16))
    np.savez(folder / "f_dim.npz", features=np.zeros((4, 256), np.float16))
    expected = {"b_text": "not a readable .npz", "c_nokey": "no array 'features' (arrays: ['feats'])",
                "d_3d": "shape (4, 2, 512)", "e_empty": "0 frames", "f_dim": "feature dim 256"}
    for name, message in expected.items():
        only = {"a_good": folder / "a_good.npz", name: folder / f"{name}.npz"}
        with pytest.raises(ValueFeatureError) as raised:
            import_value_features(only, tmp_path / f"store_{name}", progress=False)
        assert f"{name}.npz" in str(raised.value) and message in str(raised.value)
    report = import_value_features(folder, tmp_path / "store", on_error="skip", progress=False)
    assert report.imported == 2 and set(report.failed) == set(expected)
    assert set(FeatureStore(tmp_path / "store").failures()) == set(expected)
    assert read_value_npz(folder / "a_good.npz").shape == (5, 512)


# ------------------------------------------------------------------------------------------------ 64-frame resize

def direct_resize(x: torch.Tensor, n: int) -> torch.Tensor:
    """The rule written out: zero rows appended, or max over frames floor(i*T/n) .. ceil((i+1)*T/n) - 1."""
    t, d = x.shape
    if t <= n:
        out = torch.zeros(n, d, dtype=x.dtype)
        out[:t] = x
        return out
    return torch.stack([x[(i * t) // n: -((-(i + 1) * t) // n)].max(0).values for i in range(n)])


@pytest.mark.parametrize("t", [1, 10, 63, 64, 65, 100, 127, 200, 1000])
def test_resize_frames_to_64(t):
    x = torch.randn(t, 512).half()
    got = resize_frames(x, 64)
    assert got.shape == (64, 512) and got.dtype == torch.float16
    assert torch.equal(got, direct_resize(x, 64))
    if t < 64:
        assert torch.equal(got[:t], x) and not got[t:].any()
    if t == 64:
        assert got is x
    if t > 64:
        assert torch.equal(got, F.adaptive_max_pool1d(x.float().t()[None], 64)[0].t().half())


def test_resize_frames_rejects_bad_input():
    with pytest.raises(ValueError, match="frames, dim"):
        resize_frames(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="n must be"):
        resize_frames(torch.zeros(2, 3), 0)


# ------------------------------------------------------------------------------------------------ demo

def test_demo_files_are_value_files_the_eval_readers_read(demo, tmp_path):
    for key in ("tvqa_val", "how2qa_val", "tvc_val", "yc2c_val", "tv_subtitles"):
        assert Path(demo[key]).is_file()
    assert demo["tvqa_val"].relative_to(demo["root"]).as_posix() == "ann/tvqa/tvqa_val.jsonl"
    assert demo["how2qa_val"].name == "how2qa_val_release.jsonl" and demo["tvc_val"].name == "tvc_val_release.jsonl"
    answers, shows = read_value_qa(demo["tvqa_val"], 5)
    assert len(answers) == 2 * 4 and set(shows.values()) <= {"Shape Street", "Colour Hall"}
    h_answers, h_shows = read_value_qa(demo["how2qa_val"], 4)
    assert len(h_answers) == 8 and h_shows is None and max(h_answers.values()) <= 3
    tvc = read_value_captions(demo["tvc_val"])
    assert len(tvc) == 2 and all(len(d) == 4 for d in tvc.values())
    assert all(len(d) == 2 for d in read_value_captions(demo["tvc_train"]).values())
    yc2c = read_value_captions(demo["yc2c_val"])
    assert len(yc2c) == 2 and all(len(d) == 1 for d in yc2c.values())
    # perfect predictions score 1.0 through the scoring CLI
    pred = tmp_path / "pred.jsonl"
    pred.write_text("".join(json.dumps({"question_id": q, "text": f"a{a}"}) + "\n" for q, a in answers.items()))
    assert eval_main(["score", "tvqa", "--pred", str(pred), "--gt", str(demo["tvqa_val"]), "--out",
                      str(tmp_path / "s.json")]) == 0
    assert json.loads((tmp_path / "s.json").read_text())["scores"]["accuracy"] == 1.0


def test_demo_questions_need_more_than_one_frame(demo):
    scenes = load_scenes(demo["scenes"])
    for line in Path(demo["tvqa_train"]).read_text().splitlines():
        r = json.loads(line)
        scene = scenes[r["vid_name"]]
        choices = [r[f"a{i}"] for i in range(5)]
        answer = choices[r["answer_idx"]]
        assert len(set(choices)) == 5
        if "colour does" in r["q"]:
            assert answer == scene.colour_after and scene.colour_before in choices  # order decides
        elif "before it changes" in r["q"]:
            assert answer == scene.colour_before and scene.colour_after in choices
        # subtitles never name a colour, direction or visibility
    for line in Path(demo["tv_subtitles"]).read_text().splitlines():
        text = " ".join(s["text"] for s in json.loads(line)["sub"]).lower()
        assert not any(w in text for w in [*COLOURS, "left", "right", "up ", "down", "appear", "disappear"])
    # every scene has two colours and a change inside the video, seen before and after by 8 uniform frames
    for scene in scenes.values():
        assert scene.colour_before != scene.colour_after
        times = [(i + 0.5) * scene.duration / 8 for i in range(8)]
        seen = [scene.state(t)[1] for t in times if scene.state(t)[0]]
        assert scene.colour_before in seen and scene.colour_after in seen
        visible = [scene.state(t)[0] for t in times]
        if scene.visibility == "always":
            assert all(visible)
        else:
            assert not all(visible) and any(visible)


def test_fixed_choices_list_every_answer_in_one_order(tmp_path):
    """choices="fixed" (the demo's): each list is all the answers a source's videos can have, in the fixed order,
    so the label names the answer; both colours are still among the choices, so the order of events decides."""
    files = write_video_demo(tmp_path, n_train_videos=12, n_test_videos=0, seed=1, choices="fixed",
                             question_kinds=("direction", "colour_after", "colour_before", "visibility"))
    scenes = load_scenes(files["scenes"])
    want = {5: {"colour": list(COLOURS)[:5], "vis": list(VISIBILITY_ANSWERS.values())},
            4: {"colour": list(COLOURS)[:4], "vis": list(VISIBILITY_ANSWERS.values())[:4]}}
    seen_answers = {5: set(), 4: set()}
    for key, n in (("tvqa_train", 5), ("how2qa_train", 4)):
        for line in Path(files[key]).read_text().splitlines():
            r = json.loads(line)
            scene, choices = scenes[r["vid_name"]], [r[f"a{i}"] for i in range(n)]
            assert f"a{n}" not in r
            seen_answers[n].add((r["q"].split(" the ")[0], r["answer_idx"]))
            if "colour" in r["q"]:
                assert choices == want[n]["colour"]
                assert {scene.colour_before, scene.colour_after} <= set(choices)
                assert choices[r["answer_idx"]] == (scene.colour_after if "turn" in r["q"] else scene.colour_before)
            elif "seen" in r["q"]:
                assert choices == want[n]["vis"] and choices[r["answer_idx"]] == VISIBILITY_ANSWERS[scene.visibility]
            else:
                assert choices[r["answer_idx"]] == DIRECTION_ANSWERS[scene.direction]
                assert choices == list(DIRECTION_ANSWERS.values())[:n]
    assert len(seen_answers[5]) > 8 and len(seen_answers[4]) > 8  # answers spread over the labels
    with pytest.raises(ValueError, match="shuffled' or 'fixed"):
        write_video_demo(tmp_path / "x", n_train_videos=1, n_test_videos=0, choices="sorted")


def test_demo_videos_decode_and_move_as_annotated(demo):
    scenes = load_scenes(demo["scenes"])
    videos = {**find_videos(demo["videos_tv"]), **find_videos(demo["videos_how2"]), **find_videos(demo["videos_yc2"])}
    assert set(videos) == set(scenes)
    loader = VideoLoader(VideoFrames(videos, n_frames=32), num_workers=2)
    checked = 0
    for video in loader:
        scene = scenes[video.id]
        assert video.indices == list(range(32)) and video.n_video_frames == 32
        track = []
        for i, frame in zip(video.indices, video.frames.numpy()):
            visible, colour, _ = scene.state(i / scene.fps)
            x, y, count = shape_centroid(frame, COLOURS[colour])
            assert (count > 100) == visible, (video.id, i)
            if visible:
                track.append((x, y))
        dx, dy = track[-1][0] - track[0][0], track[-1][1] - track[0][1]
        direction = "still" if max(abs(dx), abs(dy)) < 4 else \
            ("right" if dx > 0 else "left") if abs(dx) > abs(dy) else ("down" if dy > 0 else "up")
        assert direction == scene.direction, video.id
        checked += 1
    assert checked == len(scenes) and not loader.failures
