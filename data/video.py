"""Video decoding (decord, PyAV), frame sampling, per-frame CLIP features into a FeatureStore, VALUE feature import, and
the reference's resize of a video's features to 64 time steps.

How VALUE's released `clip-vit` features were made (HERO_Video_Feature_Extractor, facts 5.4): one frame every
1.5 s (ffmpeg's fps filter at 2/3 fps), the shorter side scaled to 224 keeping the aspect, a 224 centre crop, /255
and CLIP's mean/std, OpenAI CLIP ViT-B/32 `encode_image` (512-d, NOT L2-normalised), stored float16 as
`{vid_name}.npz` with the array "features" of shape (frames, 512). `extract_video_features` does the same with
decord (PyAV where decord fails) + open_clip (defaults: ViT-B-32, 2/3 fps, crop, float16);
`import_value_features` reads the release files instead. Both write one (T, D) entry per video id to a
FeatureStore (data/features.py).

    python -m data.video features --videos-dir videos/tv --out features/tv_vit --model ViT-B-32 --pretrained openai
    python -m data.video import-value --features-dir vis_features/tv/clip-vit --out features/tv_value
    store = FeatureStore("features/tv_vit"); resize_frames(store.get("s03e02_seg02_clip_10").float(), 64)

Frame sampling (`sample_frame_times`), by presentation timestamps (the decoder's per-frame pts, so variable frame
rate videos sample right), in seconds from the first video frame (ffmpeg's command line, which made VALUE's
features, counts from the file's start, the earliest of its streams: the two agree unless a file's audio starts
before its video):
- sample_fps (VALUE: 2/3): ffmpeg's `fps` filter (`fps=2/3`, default round=near). A frame at time t lands on
  output tick round(t * fps), halves rounded up; tick k (k = 0, 1, ...) takes the last frame whose tick is <= k,
  i.e. the frame shown at (k + 0.5) / fps (0.75 s, 2.25 s, ... for 2/3 fps), a frame starting exactly there
  belonging to the next tick; the end of the last frame, rounded the same way, is the first tick not taken
  (round(duration * fps) frames). A frame shown across several ticks is taken once for each (a rate above the
  video's own, or a long-held frame of a variable-rate video), as ffmpeg repeats it, so row k is always time
  k / fps. Fewer than `min_frames` ticks: `min_frames` uniform frames instead.
- n frames: the frame shown at the middle of each of n equal time segments of the clip (a frame shown across
  two middles is taken twice). A window holding n frames or fewer gives each of its frames once (fewer than n
  come back; the recipe zero-pads to 64).
- a window [start, end] (seconds): only frames whose timestamp falls inside it, start <= t < end (as ffmpeg's
  `trim`); the n segments cover the time those frames are shown, and sample_fps counts its ticks from the
  window's start to its end. A window in which no frame starts gives the frame on screen at its start.
On a constant-rate video these are the frames `sample_frame_indices(n_frames, fps, ...)` gives.

Decoding runs in DataLoader worker processes (`VideoLoader`); each worker opens its own reader per video (nothing
of a decoder is pickled). decord reads a video with one batched `get_batch` of the sampled frames; the timestamps
come from its packet index (no frame is decoded to sample). Rules for users' own files:
- decoder fallback: a file decord cannot open or decode (AV1, which decord 0.6 cannot open at all; damaged frame
  data; a file cut short, below) is read with PyAV (FFmpeg's decoders, AV1 through libdav1d), with the same
  timestamps, sampling and frames. The run counts these fallbacks (report, CLI summary), and the entry of each
  such video in the store carries a note with the decoder and why (`FeatureStore.notes()`).
- end of stream: decord's bundled FFmpeg gives some MP4s' last frame (edit lists) up to a frame more than
  current FFmpeg; when that decides the number of sample_fps ticks, the end is read from PyAV's packet index.
- damaged files: PyAV decodes what it can; a sampled frame that does not decode shows the nearest decoded frame
  in time instead (any decoded frame, sampled or not; the earlier one on a tie). A file whose data stops before
  the length its header declares (an interrupted download; decord reads such a Matroska/WebM file as a shorter
  video, so the decord path checks their header) keeps its declared length, the lost frames placed at its average
  frame spacing and counting as not decoded. Filled frames are counted per video (report, log, the entry's
  note); a video of which fewer than `min_decodable` (default 0.5, `--min-decodable`) of the sampled frames
  decode is skipped, with a reason that gives the share.
A missing, empty or non-video file is reported by id with its reason (logged, counted, recorded in the store's
failures file) and skipped, or raises with on_error='raise'. A worker that crashes inside the decoder (a
segfault) or hangs longer than `decode_timeout` is identified by the video it was decoding: that video is
reported, and decoding resumes with the rest.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import re
import signal
import sys
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from .features import DEFAULT_PREFIX, FeatureWriter, dtype_from_name, dtype_name, parse_shard
from .image_features import CLIP_MEAN, CLIP_STD, RESIZE_MODES, load_clip_tower, register_model_config

log = logging.getLogger(__name__)

VALUE_SAMPLE_FPS = 2 / 3  # one frame every 1.5 s, as VALUE's features
VALUE_FRAMES = 64  # the reference resizes every video's features to 64 time steps
VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".flv", ".mpg", ".mpeg", ".ts")
ON_ERROR = ("skip", "raise")

# A ViT small enough for tests and demos, on the same code path as ViT-B-32 (224 px, 32 px patches, 49 tokens + CLS)
TINY_VIT_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "patch_size": 32, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 1000, "width": 32, "heads": 2, "layers": 1},
}

PathLike = Union[str, os.PathLike]


class VideoDecodeError(RuntimeError):
    """A video that could not be decoded (message names the id, the file and the reason)."""

    def __init__(self, message: str, video_id: Optional[str] = None, reason: Optional[str] = None):
        # one positional message: DataLoader re-raises a worker's exception as type(e)(message)
        super().__init__(message)
        self.video_id, self.reason = video_id, reason


class ValueFeatureError(ValueError):
    """A VALUE feature file that cannot be used (message names the file)."""


# ---------------------------------------------------------------------------------------------------------- sampling

def _slack(x):
    """How close two times (or tick counts) must be to count as equal. decord reports timestamps as float32
    (7 significant digits), so a frame that starts exactly on a sampled time, or exactly on a half tick (a tie
    that ffmpeg rounds up), must be recognised within that precision; real near-misses are far larger on
    ordinary time bases."""
    return 1e-9 + np.abs(x) * 2.5e-7


def sample_frame_times(frame_times: Sequence[float], video_end: float, *, n: Optional[int] = None,
                       start: Optional[float] = None, end: Optional[float] = None,
                       sample_fps: Optional[float] = None, min_frames: int = 1) -> list[int]:
    """Frame indices (presentation order, non-decreasing) picked by the rules of the module docstring, from the
    frames' presentation times `frame_times` (seconds, sorted; the first frame's time is the video's 0 s) and
    `video_end`, the time the last frame stops being shown. `n` frames over the clip or over the window
    [start, end] (seconds from the first frame), or `sample_fps` frames per second. Exactly one of n /
    sample_fps."""
    if (n is None) == (sample_fps is None):
        raise ValueError("give exactly one of n (frames over the clip) and sample_fps (frames per second)")
    t = np.asarray(frame_times, dtype=np.float64).reshape(-1)
    if t.size < 1:
        raise ValueError("the video has 0 frames")
    if not np.isfinite(t).all() or (np.diff(t) < 0).any():
        raise ValueError("frame times must be finite and in presentation order")
    t = t - t[0]  # the first frame is 0 s, as ffmpeg's command line shifts a file's start to 0
    duration = float(video_end) - float(frame_times[0])
    if not (math.isfinite(duration) and duration > t[-1]):
        raise ValueError(f"the video ends at {duration!r} s, not after its last frame ({t[-1]:.3f} s)")
    s = 0.0 if start is None else float(start)
    e = duration if end is None else float(end)
    if e < s:
        raise ValueError(f"window end {e:g} s is before its start {s:g} s")
    if s >= duration:
        raise ValueError(f"window starts at {s:g} s, at or after the end of the video ({duration:.3f} s)")
    s, e = max(s, 0.0), min(e, duration)
    # the window's frames: those whose presentation time falls in [s, e)
    first = int(np.searchsorted(t, s - _slack(s), side="left"))
    stop = int(np.searchsorted(t, e - _slack(e), side="left"))
    if stop <= first:  # no frame starts inside the window: the one on screen at its start
        first = max(int(np.searchsorted(t, s + _slack(s), side="right")) - 1, 0)
        stop = first + 1
    inside = t[first:stop]
    if sample_fps is not None:
        if not (sample_fps > 0 and math.isfinite(sample_fps)):
            raise ValueError(f"sample_fps must be positive, got {sample_fps!r}")
        # ffmpeg's fps filter: a frame's time becomes a tick of the output rate rounded to the nearest, halves
        # up (round=near); output tick k shows the last frame whose tick is <= k (the first frame before any);
        # the stream's end, rounded the same way, is the first tick not output
        slots = (e - s) * sample_fps
        slots = int(math.floor(slots + 0.5 + _slack(slots)))
        if slots >= max(min_frames, 1):
            x = (inside - s) * sample_fps
            ticks = np.floor(x + 0.5 + _slack(x))
            shown = np.searchsorted(ticks, np.arange(slots), side="right") - 1
            return (first + np.maximum(shown, 0)).tolist()
        n = max(min_frames, 1)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if stop - first <= n:
        return list(range(first, stop))
    # the frame shown at the middle of each of n equal segments of the time the window's frames are shown
    lo, hi = inside[0], (t[stop] if stop < len(t) else duration)
    middles = lo + (np.arange(n) + 0.5) * ((hi - lo) / n)
    shown = np.searchsorted(inside, middles + _slack(middles), side="right") - 1
    return (first + np.maximum(shown, 0)).tolist()


def sample_frame_indices(n_video_frames: int, video_fps: float, *, n: Optional[int] = None,
                         start: Optional[float] = None, end: Optional[float] = None,
                         sample_fps: Optional[float] = None, min_frames: int = 1) -> list[int]:
    """`sample_frame_times` for a constant-rate video of `n_video_frames` frames at `video_fps` (frame i shown
    from i / video_fps)."""
    if n_video_frames < 1:
        raise ValueError(f"the video has {n_video_frames} frames")
    if not (video_fps > 0 and math.isfinite(video_fps)):
        raise ValueError(f"the video's frame rate is {video_fps!r}")
    return sample_frame_times(np.arange(n_video_frames) / video_fps, n_video_frames / video_fps, n=n, start=start,
                              end=end, sample_fps=sample_fps, min_frames=min_frames)


# ---------------------------------------------------------------------------------------------------------- decoding

DECODERS = ("auto", "decord", "pyav")
MIN_DECODABLE = 0.5  # default share of a video's sampled frames that must decode for it to be kept


class VideoReadError(ValueError):
    """A file that cannot be used as a video; the message is the reason, as reported."""


def _as_uint8_tensor(batch) -> torch.Tensor:
    # decord returns its NDArray, or a torch / other tensor when a bridge was set globally by someone else
    if isinstance(batch, torch.Tensor):
        return batch
    if hasattr(batch, "asnumpy"):
        return torch.from_numpy(batch.asnumpy())
    return torch.from_numpy(np.asarray(batch))


def _check_file(path: str) -> None:
    """The problems that have a clearer reason than a decoder's message."""
    if not os.path.exists(path):
        raise FileNotFoundError("file not found")
    if os.path.isdir(path):
        raise IsADirectoryError("is a directory, not a video file")
    if os.path.getsize(path) == 0:
        raise ValueError("empty file (0 bytes)")


def open_video(path: PathLike, num_threads: int = 0, fault_tol: float = -1):
    """A decord VideoReader, after the checks that give a clear reason (missing, empty file)."""
    import decord
    path = os.fspath(path)
    _check_file(path)
    return decord.VideoReader(path, ctx=decord.cpu(0), num_threads=num_threads, fault_tol=fault_tol)


def _decord_message(e: BaseException) -> str:
    # decord's errors start with its source location ("[12:00:00] /src/video/video_reader.cc:83: ..."), nested
    text = re.sub(r"\[[\d:]+\] \S+:\d+: ", "", str(e).strip().splitlines()[0] if str(e).strip() else "")
    return (text or type(e).__name__)[:200]


def _video_end(starts: np.ndarray, stops: Optional[np.ndarray], fps: float) -> float:
    """When the last frame stops being shown: its end time if the file gives one, else one frame period later
    (the median gap between frames, or 1 / fps)."""
    last = float(starts[-1])
    if stops is not None and math.isfinite(float(stops[-1])) and float(stops[-1]) > last:
        return float(stops[-1])
    gaps = np.diff(starts)
    gaps = gaps[gaps > 0]
    if len(gaps):
        return last + float(np.median(gaps))
    return last + (1.0 / fps if fps > 0 and math.isfinite(fps) else 1.0)


@dataclass
class FrameRead:
    """What `read_video` returns."""
    frames: torch.Tensor  # (T, H, W, 3) uint8 RGB
    indices: list[int]  # frame numbers in presentation order; a frame shown at several sampled times repeats
    times: list[float]  # presentation time (s) of each, from the first frame
    fps: float  # the container's average rate (informational: sampling uses the timestamps)
    n_video_frames: int
    decoder: str = "decord"  # "decord" or "pyav"
    decoded: Optional[list[bool]] = None  # per sampled frame: its own frame decoded (False: filled); None: all
    fallback: Optional[str] = None  # why decord did not read the file (decoder "pyav" chosen automatically)

    @property
    def filled(self) -> int:
        """Sampled frames that did not decode and show the nearest decoded frame in time instead."""
        return 0 if self.decoded is None else self.decoded.count(False)


def read_video(path: PathLike, *, indices: Optional[Sequence[int]] = None, n: Optional[int] = None,
               sample_fps: Optional[float] = None, start: Optional[float] = None, end: Optional[float] = None,
               min_frames: int = 1, num_threads: int = 0, fault_tol: float = -1,
               min_decodable: float = MIN_DECODABLE, decoder: str = "auto") -> FrameRead:
    """The sampled frames of one video. `indices` directly, or sampled by `sample_frame_times` from the frames'
    timestamps (n / sample_fps / window); neither: every frame.

    decoder="auto": decord, with one batched `get_batch` of the sampled frames; a file decord cannot open or
    decode (AV1, damaged data) is read with PyAV instead, with the same timestamps and sampling ("decord" or
    "pyav": only that one). PyAV decodes what it can; see `_read_with_pyav` for damaged files and
    `min_decodable`. Raises `VideoReadError` (or FileNotFoundError, ...) with the reason."""
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}")
    if not 0.0 <= min_decodable <= 1.0:
        raise ValueError(f"min_decodable must be in [0, 1], got {min_decodable!r}")
    path = os.fspath(path)
    _check_file(path)

    def choose(starts: np.ndarray, video_end: float, exact_end: Optional[Callable[[], Optional[float]]] = None
               ) -> list[int]:
        total = len(starts)
        if indices is not None:
            chosen = [int(i) for i in indices]
            bad = [i for i in chosen if not 0 <= i < total]
            if bad:
                raise IndexError(f"frame indices {bad[:5]} out of range for a video of {total} frames")
            return chosen
        if n is None and sample_fps is None and start is None and end is None:
            return list(range(total))
        if exact_end is not None and sample_fps is not None and \
                _tick_count_in_doubt(starts, video_end, sample_fps, start, end):
            since_first = exact_end()
            if since_first is not None:
                video_end = float(starts[0]) + since_first
        return sample_frame_times(starts, video_end, n=n, sample_fps=sample_fps, start=start, end=end,
                                  min_frames=min_frames)

    if decoder == "pyav":
        return _read_with_pyav(path, choose, num_threads, min_decodable)
    read, fallback = _read_with_decord(path, choose, num_threads, fault_tol, decoder == "decord")
    if read is not None:
        return read
    log.debug("%s: %s; reading it with PyAV", path, fallback)
    return _read_with_pyav(path, choose, num_threads, min_decodable, fallback)


def _read_with_decord(path: str, choose, num_threads: int, fault_tol: float, only: bool
                      ) -> tuple[Optional[FrameRead], Optional[str]]:
    """(the frames, None), or (None, why decord cannot read the file) for the PyAV fallback; only=True raises
    instead."""
    import decord

    def give_up(why: str, e: BaseException):
        if only:
            raise e
        return None, why

    try:
        vr = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=num_threads, fault_tol=fault_tol)
    except Exception as e:  # DECORDError / RuntimeError: no stream decord can decode (AV1), not a video, ...
        return give_up(f"decord cannot open it ({_decord_message(e)})", e)
    try:
        total, fps = len(vr), float(vr.get_avg_fps())
        if total < 1:
            return give_up("decord finds no frames", VideoReadError("no video frames"))
        # [start, end] seconds per frame from the packet index: no frame is decoded
        stamps = np.asarray(vr.get_frame_timestamp(range(total)), dtype=np.float64).reshape(total, 2)
        starts = stamps[:, 0]
        if not np.isfinite(starts).all() or (np.diff(starts) < 0).any():
            return give_up("decord's frame timestamps are not in presentation order",
                           VideoReadError("frame timestamps out of order"))
        video_end = _video_end(starts, stamps[:, 1], fps)
        cut = _cut_short(path, video_end, video_end - float(starts[-1]))
        if cut:
            return give_up(cut, VideoReadError(f"corrupt or truncated video data: {cut}"))
        chosen = choose(starts, video_end, lambda: _pyav_video_end(path))
        distinct = sorted(set(chosen))
        try:
            if len(distinct) == len(chosen):
                frames = _as_uint8_tensor(vr.get_batch(chosen))
            else:  # a frame shown at several sampled times is decoded once
                frames = _as_uint8_tensor(vr.get_batch(distinct))
                frames = frames[torch.from_numpy(np.searchsorted(distinct, chosen))]
        except Exception as e:  # DECORDError: the container opened, the frame data did not decode
            return give_up(f"decord cannot decode its frames ({_decord_message(e)})", e)
    finally:
        del vr  # frees the decoder now, not at the next garbage collection
    if frames.dtype != torch.uint8 or frames.dim() != 4 or frames.shape[0] != len(chosen):
        raise RuntimeError(f"decoder returned {tuple(frames.shape)} {frames.dtype} for {len(chosen)} frames")
    return FrameRead(frames, chosen, (starts[chosen] - starts[0]).tolist(), fps, total, "decord"), None


def _read_with_pyav(path: str, choose, num_threads: int, min_decodable: float,
                    fallback: Optional[str] = None) -> FrameRead:
    """Read with PyAV (FFmpeg's own decoders: AV1 via libdav1d, ...). The frames' timestamps come from the
    packets (demuxed, not decoded), so the sampling is the same as decord's. Then one pass decodes the packets
    in order, skipping what does not decode, and keeps the sampled frames.

    A damaged file: a sampled frame that does not decode shows the nearest decoded frame in time instead (the
    earlier one on a tie; decoded frames that were not sampled count too). The video is refused when fewer
    than `min_decodable` of its sampled frames decoded themselves."""
    import av

    def contents(container) -> str:
        return ", ".join(sorted({s.type for s in container.streams})) or "none"

    try:
        container = av.open(path)
    except Exception as e:  # av.error.InvalidDataError etc.: FFmpeg's own words on what is wrong
        raise VideoReadError(f"cannot open as a video: {type(e).__name__}: {e}"[:400]) from None
    with container:
        if not container.streams.video:
            raise VideoReadError(f"cannot open as a video: no video stream (streams: {contents(container)})")
        stream = container.streams.video[0]
        fps = float(stream.average_rate or stream.guessed_rate or 0)
        timeline, last_end = _pyav_timeline(container, stream)
        time_base = float(stream.time_base)
        if timeline:
            timeline, last_end = _with_cut_frames(timeline, last_end, container, stream)
    if not timeline:
        raise VideoReadError("cannot open as a video: no video frames in the file")
    starts = np.array(timeline, dtype=np.float64) * time_base
    chosen = choose(starts, _video_end(starts, None if last_end is None else np.array([last_end * time_base]), fps))
    wanted = sorted({timeline[i] for i in chosen})

    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        stream.codec_context.thread_count = num_threads
        found, error = _decode_nearest(container, stream, wanted)
    own = [found.get(timeline[i], (None, False))[1] for i in chosen]
    decoded = sum(own)
    if not found:
        raise VideoReadError(f"corrupt or truncated video data: none of its {len(timeline)} frames decoded"
                             + (f" ({error})" if error else ""))
    if decoded < min_decodable * len(chosen):
        raise VideoReadError(f"corrupt or truncated video data: {decoded} of {len(chosen)} sampled frames decoded "
                             f"({decoded / len(chosen):.0%}), below the minimum of {min_decodable:.0%} "
                             f"(min_decodable)")
    arrays = [found[timeline[i]][0] for i in chosen]
    height, width = arrays[0].shape[:2]
    if any(a.shape[:2] != (height, width) for a in arrays):
        raise VideoReadError(f"the frame size changes inside the video ({sorted({a.shape[:2] for a in arrays})})")
    frames = torch.from_numpy(np.stack(arrays))
    return FrameRead(frames, chosen, (starts[chosen] - starts[0]).tolist(), fps, len(timeline), "pyav",
                     None if decoded == len(chosen) else own, fallback)


def _pyav_timeline(container, stream) -> tuple[list[int], Optional[int]]:
    """The pts of every frame, sorted, from the packets alone (demuxed, not decoded), and when the last one ends
    (None: no duration given)."""
    durations: dict[int, int] = {}
    for packet in _packets(container, stream):
        pts = packet.pts if packet.pts is not None else packet.dts
        if pts is not None and packet.size:
            durations[pts] = max(durations.get(pts, 0), packet.duration or 0)
    timeline = sorted(durations)
    last_end = timeline[-1] + durations[timeline[-1]] if timeline and durations[timeline[-1]] else None
    return timeline, last_end


def _pyav_video_end(path: str) -> Optional[float]:
    """Seconds from the first frame to the end of the last, as current FFmpeg's demuxer gives them (None if it
    cannot tell)."""
    import av
    try:
        with av.open(path) as container:
            stream = container.streams.video[0]
            timeline, last_end = _pyav_timeline(container, stream)
            return None if last_end is None else float((last_end - timeline[0]) * stream.time_base)
    except Exception as e:  # the caller keeps decord's value
        log.debug("%s: no end time from PyAV (%s)", path, e)
        return None


def _tick_count_in_doubt(starts: np.ndarray, video_end: float, sample_fps: float, start: Optional[float],
                         end: Optional[float]) -> bool:
    """Whether the number of sample_fps ticks hangs on the last frame's duration: decord's bundled FFmpeg gives
    some MP4s' last frame (edit lists) up to a frame more than current FFmpeg, whose fps filter is the reference."""
    duration = video_end - float(starts[0])
    margin = max(video_end - float(starts[-1]), float(np.median(np.diff(starts))) if len(starts) > 1 else 0.0)
    s = max(0.0, start or 0.0)
    e = duration if end is None else float(end)
    counts = {math.floor((min(e, d) - s) * sample_fps + 0.5) for d in (duration - margin, duration + margin)}
    return len(counts) > 1


def _declared_end(container, stream, frame_step: float) -> Optional[tuple[float, float]]:
    """When the file's header says the video ends (seconds, on the stream's clock), and how far short of it the
    data may stop before the file counts as cut: half a frame against the video stream's own duration (MP4's, or
    the DURATION tag Matroska writes per track), at least 0.5 s against the whole file's when the file holds the
    video alone (else that length may be the audio's). None: the header does not say (a cut Matroska file with
    audio has lost its tags, which come last: it reads as the shorter video it now is)."""
    start = float((stream.start_time or 0) * stream.time_base)
    if stream.duration:
        return float(((stream.start_time or 0) + stream.duration) * stream.time_base), 0.5 * frame_step
    tagged = _duration_tag((stream.metadata or {}).get("DURATION"))
    if tagged is not None:
        return start + tagged, 0.5 * frame_step
    if container.duration and len(container.streams) == 1:  # in AV_TIME_BASE units (microseconds)
        return (container.duration + (container.start_time or 0)) / 1e6, max(2 * frame_step, 0.5)
    return None


def _duration_tag(text: Optional[str]) -> Optional[float]:
    """Matroska's DURATION tag ("00:00:02.000000000") in seconds."""
    match = re.fullmatch(r"(\d+):(\d{2}):(\d{2}(?:\.\d+)?)", (text or "").strip())
    if not match:
        return None
    hours, minutes, seconds = match.groups()
    return int(hours) * 3600 + int(minutes) * 60 + float(seconds)


def _with_cut_frames(timeline: list[int], last_end: Optional[int], container, stream
                     ) -> tuple[list[int], Optional[int]]:
    """A file cut short (an interrupted download whose header is at the front) demuxes to fewer frames than its
    header declares, without an error. The frames from where the data stops to the declared end are added, at the
    average frame rate, as frames that do not decode: the video keeps its length, and they count as damage."""
    time_base = float(stream.time_base)
    if len(timeline) > 1:  # the frames' own average spacing (a header's average_rate can be nonsense)
        step = (timeline[-1] - timeline[0]) / (len(timeline) - 1)
    else:
        step = 1 / float(stream.average_rate) / time_base if stream.average_rate else 0.0
    if not step > 0:
        return timeline, last_end
    declared = _declared_end(container, stream, step * time_base)
    end = last_end if last_end is not None else timeline[-1] + step
    if declared is None or declared[0] - end * time_base <= declared[1]:
        return timeline, last_end
    declared_end = declared[0] / time_base
    missing = [round(end + k * step) for k in range(int(round((declared_end - end) / step)))]
    log.debug("the file stops %d frames before the end its header declares", len(missing))
    return timeline + [p for p in missing if p > timeline[-1]], int(round(declared_end))


MATROSKA_MAGIC = b"\x1a\x45\xdf\xa3"  # EBML: Matroska and WebM


def _cut_short(path: str, video_end: float, frame_step: float) -> Optional[str]:
    """Why the file looks cut short (its data stops well before the end its header declares), or None. decord
    reads a cut Matroska/WebM file as a shorter video without complaint (a cut MP4 it refuses to open), so only
    those are checked; this reads only the header (importing PyAV costs ~40 ms a process: not for every file)."""
    with open(path, "rb") as f:
        if f.read(4) != MATROSKA_MAGIC:
            return None
    import av
    try:
        with av.open(path) as container:
            stream = container.streams.video[0]
            declared = _declared_end(container, stream, frame_step)
            origin = float((stream.start_time or 0) * stream.time_base)  # decord's 0 s
    except Exception as e:  # no verdict: decord's reading stands
        log.debug("%s: no header duration from PyAV (%s)", path, e)
        return None
    if declared is None or declared[0] - origin - video_end <= declared[1]:
        return None
    return f"the data stops at {video_end:.2f} s of the {declared[0] - origin:.2f} s its header declares"


def _packets(container, stream) -> Iterator:
    """The stream's packets, ending at the first one the demuxer cannot read (a truncated or garbled file)."""
    packets = container.demux(stream)
    while True:
        try:
            yield next(packets)
        except StopIteration:
            return
        except Exception as e:  # av.error.FFmpegError
            log.debug("demuxing stopped: %s", e)
            return


def _decode_nearest(container, stream, wanted: list[int]) -> tuple[dict[int, tuple[np.ndarray, bool]], str]:
    """{pts: (RGB frame, decoded itself)} for each pts in `wanted` (sorted): its own frame, or the decoded frame
    nearest in time (the earlier on a tie) when its own did not decode. Decoding stops after the last wanted
    frame. Also FFmpeg's last error on a packet that did not decode ("" if none)."""
    import av

    found: dict[int, tuple[np.ndarray, bool]] = {}
    error = ""
    rgb_cache: dict[int, np.ndarray] = {}

    def rgb(pts: int, frame) -> np.ndarray:
        if pts not in rgb_cache:
            rgb_cache[pts] = frame.to_ndarray(format="rgb24")
        return rgb_cache[pts]

    k, previous = 0, None  # next wanted pts; last decoded (pts, frame)

    def place(frames) -> None:
        nonlocal k, previous
        for frame in frames:
            pts = frame.pts
            if pts is None or (previous is not None and pts <= previous[0]):
                continue  # no timestamp, or out of order after damage: cannot be placed in time
            while k < len(wanted) and wanted[k] < pts:  # passed without decoding: the nearer neighbour
                near = previous if previous is not None and wanted[k] - previous[0] <= pts - wanted[k] \
                    else (pts, frame)
                found[wanted[k]] = (rgb(*near), False)
                k += 1
            if k < len(wanted) and wanted[k] == pts:
                found[pts] = (rgb(pts, frame), True)
                k += 1
            previous = (pts, frame)

    flushed = False
    for packet in _packets(container, stream):
        flushed = not packet.size  # the demuxer's last, empty packet drains the decoder
        try:
            place(packet.decode())
        except av.error.FFmpegError as e:  # a damaged packet: its frame (and any it broke) are missing
            error = f"{type(e).__name__}: {e}"[:200]
        if k == len(wanted):
            break
    if k < len(wanted) and not flushed:  # demuxing stopped early: the frames still inside the decoder
        with contextlib.suppress(av.error.FFmpegError):
            place(stream.codec_context.decode(None))
    if previous is not None:
        for pts in wanted[k:]:  # after the last decoded frame
            found[pts] = (rgb(*previous), False)
    return found, error


def read_frames(path: PathLike, *, indices: Optional[Sequence[int]] = None, n: Optional[int] = None,
                sample_fps: Optional[float] = None, start: Optional[float] = None, end: Optional[float] = None,
                min_frames: int = 1, num_threads: int = 0, fault_tol: float = -1, **kwargs
                ) -> tuple[torch.Tensor, list[int], float, int]:
    """(frames (T, H, W, 3) uint8 RGB, frame indices, video fps, video frame count): `read_video` without the
    decoder's notes."""
    r = read_video(path, indices=indices, n=n, sample_fps=sample_fps, start=start, end=end, min_frames=min_frames,
                   num_threads=num_threads, fault_tol=fault_tol, **kwargs)
    return r.frames, r.indices, r.fps, r.n_video_frames


def resized_size(height: int, width: int, size: int, resize: str) -> tuple[int, int]:
    """(h, w) before the centre crop: the shorter side to `size`, the other scaled and truncated (as
    torchvision's Resize and HERO's extractor); squash: (size, size)."""
    if resize == "squash":
        return size, size
    if height <= width:
        return size, max(size, int(width * size / height))
    return max(size, int(height * size / width)), size


def preprocess_frames(frames: torch.Tensor, size: int = 224, resize: str = "crop") -> torch.Tensor:
    """(T, H, W, 3) uint8 -> (T, 3, size, size) uint8. crop: shorter side to `size` (aspect kept), bicubic with
    antialiasing (like ffmpeg's bicubic scaler that made VALUE's features), then the centre `size` crop;
    squash: bicubic to size x size. Kept uint8 so 4x fewer bytes cross from the workers; normalised by the tower
    side (`normalise`)."""
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
    t, h, w, _ = frames.shape
    x = frames.permute(0, 3, 1, 2).contiguous()  # uint8 bicubic runs fastest on contiguous NCHW here
    nh, nw = resized_size(h, w, size, resize)
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
    top, left = int(round((nh - size) / 2)), int(round((nw - size) / 2))
    return x[:, :, top:top + size, left:left + size].contiguous()


def normalise(pixels: torch.Tensor, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(B, 3, H, W) uint8 -> float: /255, then (x - mean) / std per channel."""
    m = torch.tensor(mean, dtype=dtype, device=pixels.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=dtype, device=pixels.device).view(1, 3, 1, 1)
    return (pixels.to(dtype) / 255.0 - m) / s


@dataclass
class DecodedVideo:
    id: str
    path: str
    frames: torch.Tensor  # (T, H, W, 3) uint8 without resize; (T, 3, S, S) uint8 with resize
    indices: list[int]  # frame numbers in the video, presentation order (a frame shown at two sampled times: twice)
    fps: float  # the container's average rate
    n_video_frames: int
    times: list[float]  # presentation time (s) of each sampled frame, from the first frame
    decoder: str = "decord"  # which decoder read it: "decord", or "pyav" for a file decord could not read
    filled: int = 0  # sampled frames that did not decode, showing the nearest decoded frame instead
    fallback: Optional[str] = None  # why decord could not read it

    def pin_memory(self) -> "DecodedVideo":  # DataLoader(pin_memory=True) calls this on custom types
        self.frames = self.frames.pin_memory()
        return self


@dataclass
class VideoFailure:
    id: str
    path: Optional[str]
    reason: str


def _reason(e: BaseException) -> str:
    if isinstance(e, VideoReadError):
        return str(e)[:400]
    msg = _decord_message(e)
    if isinstance(e, (FileNotFoundError, IsADirectoryError)) or msg in ("empty file (0 bytes)",):
        return msg
    if type(e).__name__.startswith("DECORD"):  # decoder="decord": the container opened, the frame data did not
        return f"corrupt or truncated video data ({type(e).__name__}: {msg})"[:400]
    return f"{type(e).__name__}: {msg}"[:400]


class VideoFrames(torch.utils.data.Dataset):
    """(id, path) pairs -> `DecodedVideo`, or `VideoFailure` (on_error='skip') / `VideoDecodeError`
    (on_error='raise') for a video that cannot be read. Opens a reader per item (decord; PyAV for a file decord
    cannot read), in the process that calls it (a DataLoader worker), so the dataset pickles as plain paths.

    Sampling: `n_frames` uniform frames, or `sample_fps` frames per second (one of them; default VALUE's 2/3
    fps), over the whole video or over `windows[id]` = (start, end) seconds. `resize`: None keeps the decoded
    frames (T, H, W, 3); 'crop' / 'squash' gives (T, 3, image_size, image_size) (`preprocess_frames`).
    `decode_threads`: decoder threads per reader; None gives 1 in a DataLoader worker (the workers are the
    parallelism) and the decoder's automatic count in the main process. `min_decodable`: a damaged video is
    kept when at least this share of its sampled frames decodes (the rest are filled, see the module docstring)."""

    def __init__(self, videos: Union[Mapping[str, Optional[PathLike]], Sequence[tuple[str, Optional[PathLike]]]],
                 *, n_frames: Optional[int] = None, sample_fps: Optional[float] = None,
                 windows: Optional[Mapping[str, tuple[float, float]]] = None, min_frames: int = 1,
                 resize: Optional[str] = None, image_size: int = 224, on_error: str = "skip",
                 decode_threads: Optional[int] = None, fault_tol: float = -1,
                 min_decodable: float = MIN_DECODABLE):
        items = videos.items() if isinstance(videos, Mapping) else videos
        self.items = [(str(k), None if p is None else os.fspath(p)) for k, p in items]
        if n_frames is not None and sample_fps is not None:
            raise ValueError("give n_frames or sample_fps, not both")
        if n_frames is None and sample_fps is None:
            sample_fps = VALUE_SAMPLE_FPS
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
        if resize is not None and resize not in RESIZE_MODES:
            raise ValueError(f"resize must be None or one of {RESIZE_MODES}, got {resize!r}")
        self.n_frames, self.sample_fps, self.min_frames = n_frames, sample_fps, min_frames
        self.windows = dict(windows or {})
        self.resize, self.image_size, self.on_error = resize, image_size, on_error
        if not 0.0 <= min_decodable <= 1.0:
            raise ValueError(f"min_decodable must be in [0, 1], got {min_decodable!r}")
        self.decode_threads, self.fault_tol, self.min_decodable = decode_threads, fault_tol, min_decodable

    def __len__(self) -> int:
        return len(self.items)

    def decode(self, key: str, path: Optional[str]) -> DecodedVideo:
        """Decode one video; raises on any problem (the caller turns it into a failure)."""
        if path is None:
            raise FileNotFoundError("no video file for this id")
        threads = self.decode_threads
        if threads is None:
            threads = 1 if torch.utils.data.get_worker_info() is not None else 0
        start, end = self.windows.get(key, (None, None))
        r = read_video(path, n=self.n_frames, sample_fps=self.sample_fps, start=start, end=end,
                       min_frames=self.min_frames, num_threads=threads, fault_tol=self.fault_tol,
                       min_decodable=self.min_decodable)
        frames = r.frames if self.resize is None else preprocess_frames(r.frames, self.image_size, self.resize)
        return DecodedVideo(key, path, frames, r.indices, r.fps, r.n_video_frames, r.times, r.decoder, r.filled,
                            r.fallback)

    def __getitem__(self, i: int) -> Union[DecodedVideo, VideoFailure]:
        key, path = self.items[i]
        try:
            return self.decode(key, path)
        except Exception as e:  # VideoReadError, FileNotFoundError, ...; decord's own errors with decoder="decord"
            reason = _reason(e)
        if self.on_error == "raise":
            raise VideoDecodeError(f"video {key!r} ({path}): {reason}", key, reason)
        return VideoFailure(key, path, reason)


# ---------------------------------------------------------------------------------------------------------- loader

class _WorkerSlots:
    """What each DataLoader worker is decoding right now, in shared memory: dataset index (-1: idle), since when,
    and the worker's pid. The main process reads it to name the video of a worker that died or hangs."""

    def __init__(self, n: int):
        self.index = torch.full((n,), -1, dtype=torch.int64).share_memory_()
        self.started = torch.zeros(n, dtype=torch.float64).share_memory_()
        self.pid = torch.zeros(n, dtype=torch.int64).share_memory_()

    def busy(self) -> list[tuple[int, int, float, int]]:
        """(worker, dataset index, seconds busy, pid) of every worker inside a decode."""
        now = time.time()
        return [(w, int(self.index[w]), now - float(self.started[w]), int(self.pid[w]))
                for w in range(len(self.index)) if int(self.index[w]) >= 0]


class _Tracked(torch.utils.data.Dataset):
    """`dataset` restricted to `indices`, marking the worker's slot around each item."""

    def __init__(self, dataset, indices: Sequence[int], slots: _WorkerSlots):
        self.dataset, self.indices, self.slots = dataset, list(indices), slots

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        index = self.indices[i]
        info = torch.utils.data.get_worker_info()
        if info is None:
            return self.dataset[index]
        w = info.id
        self.slots.pid[w] = os.getpid()
        self.slots.started[w] = time.time()
        self.slots.index[w] = index  # last: a reader that sees the index also sees its start time
        try:
            return self.dataset[index]
        except VideoDecodeError as e:  # on_error='raise': raised again in the main process, without the
            key, path = self.dataset.items[index] if hasattr(self.dataset, "items") else (str(index), None)
            return VideoFailure(e.video_id or key, path, e.reason or str(e))  # worker's traceback
        finally:
            self.slots.index[w] = -1


def _as_list(batch):
    return list(batch)


class _WorkersDied(Exception):
    def __init__(self, pids: set[int], message: str, exitcodes: dict[int, Optional[int]]):
        super().__init__(message)
        self.pids, self.exitcodes = pids, exitcodes


@contextlib.contextmanager
def _worker_deaths_at_next():
    """While decoding, a dead worker is reported by the DataLoader's next() (it polls worker liveness) instead of
    by its SIGCHLD handler, which raises wherever the main thread happens to be (inside the tower forward, or
    the store writer) and would leave that work half done."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGCHLD"):
        yield
        return
    previous = signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    try:
        yield
    finally:
        signal.signal(signal.SIGCHLD, previous)


_SIGNAL_NAMES = {-s.value: s.name for s in signal.Signals}


class VideoLoader:
    """Iterate the decoded videos of a `VideoFrames` dataset, in order, decoded by `num_workers` DataLoader
    processes (0: in this process). Failed videos are logged, counted in `failures` ({id: reason}), passed to
    `on_failure(id, reason)`, and skipped; with the dataset's on_error='raise' they raise `VideoDecodeError`.
    Videos read with PyAV because decord could not are counted in `fallbacks` ({id: why}), and damaged ones
    kept with filled-in frames in `filled` ({id: frames filled}), both logged.

    A worker that dies inside the decoder (a segfault on a broken file), or that has been decoding one video for
    more than `decode_timeout` seconds (it is then killed), costs only that video: it is reported like any bad
    video and the loader restarts its workers for the videos after it (at most `max_restarts` times)."""

    def __init__(self, dataset: VideoFrames, *, num_workers: int = 2, videos_per_batch: int = 1,
                 prefetch_factor: int = 2, pin_memory: bool = False, decode_timeout: Optional[float] = 600.0,
                 max_restarts: int = 20, on_failure: Optional[Callable[[str, str], None]] = None,
                 poll_seconds: float = 0.5):
        self.dataset, self.num_workers, self.videos_per_batch = dataset, num_workers, videos_per_batch
        self.prefetch_factor, self.pin_memory = prefetch_factor, pin_memory
        self.decode_timeout, self.max_restarts, self.poll_seconds = decode_timeout, max_restarts, poll_seconds
        self.on_failure = on_failure
        self.failures: dict[str, str] = {}
        self.fallbacks: dict[str, str] = {}  # id -> why decord could not read it (read with PyAV)
        self.filled: dict[str, int] = {}  # id -> sampled frames that did not decode (filled in)
        self.decoded = 0
        self.restarts = 0

    def __len__(self) -> int:
        return len(self.dataset)

    def _fail(self, key: str, path: Optional[str], reason: str) -> None:
        if getattr(self.dataset, "on_error", "skip") == "raise":
            raise VideoDecodeError(f"video {key!r} ({path}): {reason}", key, reason)
        log.warning("video %r skipped (%s): %s", key, path, reason)
        self.failures[key] = reason
        if self.on_failure is not None:
            self.on_failure(key, reason)

    def _handle(self, item) -> Optional[DecodedVideo]:
        if isinstance(item, VideoFailure):
            self._fail(item.id, item.path, item.reason)
            return None
        self.decoded += 1
        if item.fallback:
            self.fallbacks[item.id] = item.fallback
            log.info("video %r (%s): %s; read with PyAV", item.id, item.path, item.fallback)
        if item.filled:
            self.filled[item.id] = item.filled
            log.warning("video %r (%s): %d of its %d sampled frames did not decode; each shows the nearest decoded "
                        "frame in time", item.id, item.path, item.filled, len(item.indices))
        return item

    def __iter__(self) -> Iterator[DecodedVideo]:
        if self.num_workers == 0:
            for i in range(len(self.dataset)):
                item = self._handle(self.dataset[i])
                if item is not None:
                    yield item
            return
        remaining = list(range(len(self.dataset)))
        while remaining:
            slots = _WorkerSlots(self.num_workers)
            loader = torch.utils.data.DataLoader(
                _Tracked(self.dataset, remaining, slots), batch_size=self.videos_per_batch, shuffle=False,
                num_workers=self.num_workers, collate_fn=_as_list, pin_memory=self.pin_memory,
                prefetch_factor=self.prefetch_factor, timeout=self.poll_seconds)
            consumed, hung = 0, {}
            it = iter(loader)
            try:
                with _worker_deaths_at_next():
                    while True:
                        batch = self._next(it, slots, hung)
                        if batch is None:
                            remaining = []
                            break
                        for item in batch:
                            consumed += 1
                            item = self._handle(item)
                            if item is not None:
                                yield item
            except _WorkersDied as died:
                remaining = self._after_crash(died, slots, hung, remaining, consumed)
            finally:
                shutdown = getattr(it, "_shutdown_workers", None)
                if shutdown is not None:
                    shutdown()
                del it

    def _next(self, it, slots: _WorkerSlots, hung: dict) -> Optional[list]:
        while True:
            try:
                return next(it)
            except StopIteration:
                return None
            except RuntimeError as e:
                message = str(e)
                if type(e) is RuntimeError and message.startswith("DataLoader timed out"):
                    self._stop_hung_workers(it, slots, hung)  # our poll interval: nothing decoded yet
                    continue
                m = re.match(r"DataLoader worker \(pids?(?:\(s\))? ([\d, ]+)\)", message)
                if type(e) is RuntimeError and m:
                    exitcodes = {w.pid: w.exitcode for w in getattr(it, "_workers", [])}
                    raise _WorkersDied({int(p) for p in m.group(1).split(",")}, message, exitcodes) from None
                raise

    def _stop_hung_workers(self, it, slots: _WorkerSlots, hung: dict) -> None:
        if self.decode_timeout is None:
            return
        ours = {w.pid for w in getattr(it, "_workers", [])}
        for _, index, busy, pid in slots.busy():
            if busy > self.decode_timeout and index not in hung and (not ours or pid in ours):
                key = self.dataset.items[index][0] if hasattr(self.dataset, "items") else str(index)
                log.warning("video %r: still decoding after %.0f s; stopping its worker (pid %d)", key, busy, pid)
                hung[index] = busy
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)  # our own DataLoader worker; the next poll reports it dead

    def _after_crash(self, died: _WorkersDied, slots: _WorkerSlots, hung: dict, remaining: list[int],
                     consumed: int) -> list[int]:
        suspects = {}
        for _, index, _, pid in slots.busy():
            if pid in died.pids or index in hung:
                if index in hung:
                    reason = (f"decoding did not finish within {self.decode_timeout:g} s; its worker was stopped")
                else:
                    code = died.exitcodes.get(pid)
                    how = f"killed by {_SIGNAL_NAMES[code]}" if code in _SIGNAL_NAMES else "exited unexpectedly"
                    reason = f"the decoder crashed (DataLoader worker {how})"
                suspects[index] = reason
        self.restarts += 1
        if not suspects and consumed == 0:
            raise RuntimeError(f"video decoding workers died before delivering any video ({died}); the videos "
                               f"being decoded could not be identified") from None
        if self.restarts > self.max_restarts:
            raise RuntimeError(f"video decoding workers died {self.restarts} times (limit max_restarts="
                               f"{self.max_restarts}); last: {died}") from None
        items = getattr(self.dataset, "items", None)
        for index, reason in suspects.items():
            key, path = items[index] if items else (str(index), None)
            self._fail(key, path, reason)
        log.warning("restarting video decoding workers (%d of at most %d restarts)", self.restarts,
                    self.max_restarts)
        return [i for i in remaining[consumed:] if i not in suspects]


# ---------------------------------------------------------------------------------------------------------- towers

def tower_config(model_name: str, model_config: Optional[Mapping] = None) -> dict:
    """open_clip's config of `model_name` (after registering `model_config` under that name, if given)."""
    import open_clip
    if model_config is not None:
        register_model_config(model_name, model_config)
    cfg = open_clip.get_model_config(model_name)
    if cfg is None:
        raise ValueError(f"open_clip has no model {model_name!r}; pass model_config (open_clip's layout, e.g. "
                         f"TINY_VIT_CONFIG), or a name such as ViT-B-32, ViT-B-16, ViT-L-14")
    return json.loads(json.dumps(cfg))


def _image_size(cfg: Mapping, image_size: Optional[int]) -> int:
    if image_size is not None:
        return int(image_size)
    size = cfg.get("vision_cfg", {}).get("image_size", 224)
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise ValueError(f"tower input {size} is not square; pass image_size")
        size = size[0]
    return int(size)


def frame_embeddings(visual: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """(B, 3, S, S) normalised pixels -> (B, D): the tower's pooled, projected output, i.e. CLIP's
    `encode_image` without L2 normalisation (what VALUE's features hold)."""
    out = visual(pixels)
    if isinstance(out, (tuple, list)):  # towers built with output_tokens=True return (pooled, tokens)
        out = out[0]
    return out


# ---------------------------------------------------------------------------------------------------------- extraction

@dataclass
class VideoExtractionReport:
    store: str
    requested: int  # ids given (after --shard selection)
    extracted: int  # videos written by this run
    skipped: int  # already in the store
    failed: dict = field(default_factory=dict)  # id -> reason, this run
    frames: int = 0  # frames embedded by this run
    in_store: int = 0
    seconds: float = 0.0  # decode + forward + write loop, model loading excluded
    wait_seconds: float = 0.0  # of which: waiting for decoded videos (input-bound time)
    load_seconds: float = 0.0
    restarts: int = 0  # decoder worker crashes survived
    device: str = "cpu"
    feature_dim: Optional[int] = None
    decoder_fallbacks: dict = field(default_factory=dict)  # id -> why decord could not read it (PyAV did), this run
    filled_frames: dict = field(default_factory=dict)  # id -> sampled frames that did not decode (filled), this run

    @property
    def videos_per_s(self) -> float:
        return self.extracted / self.seconds if self.seconds > 0 else 0.0

    @property
    def frames_per_s(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> dict:
        d = asdict(self)
        d["failed"] = len(self.failed)
        d["failed_ids"] = sorted(self.failed)[:20]
        d["decoder_fallbacks"] = len(self.decoder_fallbacks)
        d["decoder_fallback_ids"] = sorted(self.decoder_fallbacks)[:20]
        d["filled_frames"] = sum(self.filled_frames.values())
        d["videos_with_filled_frames"] = len(self.filled_frames)
        d["videos_per_s"] = round(self.videos_per_s, 3)
        d["frames_per_s"] = round(self.frames_per_s, 3)
        for k in ("seconds", "wait_seconds", "load_seconds"):
            d[k] = round(d[k], 3)
        return d


def video_feature_metadata(model_name: str = "ViT-B-32", pretrained: Optional[str] = "openai",
                           model_config: Optional[Mapping] = None, *, sample_fps: Optional[float] = VALUE_SAMPLE_FPS,
                           n_frames: Optional[int] = None, min_frames: int = 1, window=None, resize: str = "crop",
                           image_size: Optional[int] = None, dtype: torch.dtype = torch.float16, seed: int = 0,
                           calibrate_batchnorm: int = 0) -> dict:
    """What a store of per-frame video features records (and what a resumed run must match)."""
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
    cfg = tower_config(model_name, model_config)
    # what picks the frames, so that a store made by another rule (index-based, before "timestamps") is not resumed
    if n_frames is not None:
        sampling = {"n_frames": int(n_frames), "rule": "frame shown at the middle of n equal time segments"}
    else:
        sampling = {"sample_fps": float(sample_fps), "first_frame_s": 0.5 / float(sample_fps),
                    "rule": "ffmpeg fps filter, round near"}
    sampling["timestamps"] = "pts"
    sampling["min_frames"] = int(min_frames)
    if window is None:
        sampling["window"] = "whole video"
    elif isinstance(window, Mapping):
        sampling["window"] = "per video"
    else:
        sampling["window"] = [float(window[0]), float(window[1])]
    meta = {
        "kind": "video_frames",
        "source": "extracted",
        "model_name": model_name,
        "pretrained": pretrained,
        "model_config": None if model_config is None else cfg,
        "output": "encode_image (pooled, projected, not L2-normalised)",
        "decoder": "decord; PyAV for files decord cannot read",
        "sampling": sampling,
        "damaged_frames": "nearest decoded frame in time",
        "image_size": _image_size(cfg, image_size),
        "resize": resize,
        "interpolation": "bicubic, antialiased",
        "feature_dim": int(cfg["embed_dim"]),
        "dtype": dtype_name(dtype),
    }
    if not pretrained:
        meta["init_seed"] = seed  # random towers differ by seed: a resume must use the same one
        if calibrate_batchnorm:
            meta["calibrate_batchnorm"] = calibrate_batchnorm
    return meta


class _FramePacker:
    """Packs the frames of consecutive videos into tower batches of `batch_size` frames (short videos share a
    batch, long ones span several) and reassembles each video's (T, D) features."""

    def __init__(self, batch_size: int):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.queue: deque = deque()  # [id, frames, next frame offset]
        self.queued = 0
        self.parts: dict[str, list[torch.Tensor]] = {}

    def add(self, key: str, frames: torch.Tensor) -> None:
        self.queue.append([key, frames, 0])
        self.queued += frames.shape[0]
        self.parts[key] = []

    def ready(self) -> bool:
        return self.queued >= self.batch_size

    def take(self) -> tuple[torch.Tensor, list[tuple[str, int, bool]]]:
        """Up to batch_size frames, and (id, frames from it, is its last part) per video in the batch."""
        chunks, spans, n = [], [], 0
        while self.queue and n < self.batch_size:
            entry = self.queue[0]
            key, frames, offset = entry
            k = min(self.batch_size - n, frames.shape[0] - offset)
            chunks.append(frames[offset:offset + k])
            entry[2] += k
            n += k
            last = entry[2] == frames.shape[0]
            spans.append((key, k, last))
            if last:
                self.queue.popleft()
        self.queued -= n
        return (torch.cat(chunks) if len(chunks) > 1 else chunks[0]), spans

    def put(self, feats: torch.Tensor, spans) -> list[tuple[str, torch.Tensor]]:
        """Give back the batch's features; returns the videos now complete."""
        done, at = [], 0
        for key, k, last in spans:
            self.parts[key].append(feats[at:at + k])
            at += k
            if last:
                parts = self.parts.pop(key)
                done.append((key, parts[0] if len(parts) == 1 else torch.cat(parts)))
        return done


def extract_video_features(videos: Mapping[str, Optional[PathLike]], store_root: PathLike, *,
                           model_name: str = "ViT-B-32", pretrained: Optional[str] = "openai",
                           model_config: Optional[Mapping] = None, sample_fps: Optional[float] = VALUE_SAMPLE_FPS,
                           n_frames: Optional[int] = None,
                           window: Union[None, tuple[float, float], Mapping[str, tuple[float, float]]] = None,
                           min_frames: int = 1, batch_size: int = 64, num_workers: int = 2,
                           device: Union[str, torch.device, None] = None, dtype: torch.dtype = torch.float16,
                           resize: str = "crop", image_size: Optional[int] = None, progress: bool = True,
                           on_error: str = "skip", decode_timeout: Optional[float] = 600.0,
                           shard: Optional[tuple[int, int]] = None, shard_size: int = 1024, seed: int = 0,
                           amp: Optional[bool] = None, calibrate_batchnorm: int = 0,
                           min_decodable: float = MIN_DECODABLE) -> VideoExtractionReport:
    """Per-frame CLIP embeddings of `videos` ({id: file}) into the store at `store_root`, one (T, D) entry per id.

    Sampling: `n_frames` uniform frames if given (sample_fps is then not used), else `sample_fps` per second;
    `window` (start, end) seconds for every video, or {id: (start, end)} (ids not in it: the whole video).
    Frames are decoded and resized in `num_workers` DataLoader processes while this process runs the tower on
    batches of `batch_size` frames. Ids already in the store are skipped; a kill loses at most the entries not
    yet written as a shard. shard=(i, n): every n-th id from the i-th, under its own writer prefix, so that n
    processes fill one store. amp (default: on for CUDA) runs the tower under float16 autocast, as VALUE ran
    OpenAI's fp16 weights; on CPU it runs in float32. The store holds `dtype`.
    calibrate_batchnorm=N (random ModifiedResNet towers only): BatchNorm statistics from the sampled frames of the
    first N videos in id order, before extraction (data.image_features.estimate_batchnorm_statistics); the same
    videos on every run and shard, so a resume matches.
    A file decord cannot read is read with PyAV (counted in report.decoder_fallbacks); a damaged video is kept
    when at least `min_decodable` of its sampled frames decode, the rest filled (report.filled_frames); either
    is noted with its entry in the store (`FeatureStore.notes()`)."""
    from tqdm.auto import tqdm

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    amp = (device.type == "cuda") if amp is None else amp
    if n_frames is not None:
        sample_fps = None
    items = sorted((str(k), v) for k, v in videos.items())
    calibration = items[:calibrate_batchnorm]  # before sharding: every shard calibrates on the same videos
    if calibrate_batchnorm and pretrained:
        raise ValueError("calibrate_batchnorm is for random towers: pretrained weights keep their statistics")
    prefix = DEFAULT_PREFIX
    if shard is not None:
        i, n = shard
        if not 0 <= i < n:
            raise ValueError(f"shard {i}/{n}: expected 0 <= i < n")
        items, prefix = items[i::n], f"part{i}of{n}"
    meta = video_feature_metadata(model_name, pretrained, model_config, sample_fps=sample_fps, n_frames=n_frames,
                                  min_frames=min_frames, window=window, resize=resize, image_size=image_size,
                                  dtype=dtype, seed=seed, calibrate_batchnorm=calibrate_batchnorm)
    if window is None or isinstance(window, Mapping):
        windows = dict(window or {})
    else:
        windows = {k: tuple(window) for k, _ in items}

    writer = FeatureWriter(store_root, meta, shard_size=shard_size, prefix=prefix, background=True)
    report = VideoExtractionReport(store=str(store_root), requested=len(items), extracted=0, skipped=0,
                                   device=str(device), feature_dim=meta["feature_dim"])
    t_loop = None
    try:
        pending = [(k, v) for k, v in items if k not in writer]
        report.skipped = len(items) - len(pending)
        if pending:
            t0 = time.perf_counter()
            visual, mean, std = load_clip_tower(model_name, pretrained, device, model_config, seed)
            dataset = VideoFrames(pending, n_frames=n_frames, sample_fps=sample_fps, windows=windows,
                                  min_frames=min_frames, resize=resize, image_size=meta["image_size"],
                                  on_error=on_error, min_decodable=min_decodable)
            if calibration:
                _calibrate_batchnorm(visual, dataset, calibration, mean, std, device)
            report.load_seconds = time.perf_counter() - t0

            def failed(key: str, reason: str) -> None:
                writer.add_failure(key, reason)
                report.failed[key] = reason

            loader = VideoLoader(dataset, num_workers=num_workers, pin_memory=device.type == "cuda",
                                 decode_timeout=decode_timeout, on_failure=failed)
            t_loop = time.perf_counter()
            _extract(loader, visual, mean, std, writer, report, meta, batch_size=batch_size, device=device,
                     dtype=dtype, amp=amp, bar=tqdm(total=len(pending), unit="video", disable=not progress,
                                                    desc="video features"))
            report.restarts = loader.restarts
    finally:
        writer.close()  # writes what is buffered, also after an error or Ctrl-C: those entries are complete
        if t_loop is not None:
            report.seconds = time.perf_counter() - t_loop
    report.in_store = len(writer)
    if report.failed:
        log.warning("%d video(s) could not be read; listed with reasons in %s/failures-%s.json",
                    len(report.failed), store_root, prefix)
    return report


def _calibrate_batchnorm(visual, dataset: VideoFrames, videos: Sequence[tuple[str, Optional[PathLike]]], mean, std,
                         device: torch.device) -> None:
    """A random ModifiedResNet's BatchNorm statistics from the frames of `videos`, sampled and resized as the
    extraction samples them. With its own statistics (mean 0, variance 1) a random tower's frame embeddings are
    nearly the same for every frame (cosine similarity 0.95 between demo frames, measured), so a model learns
    nothing from them; after calibration 0.53-0.65."""
    from .image_features import estimate_batchnorm_statistics

    if not any(isinstance(m, torch.nn.BatchNorm2d) for m in visual.modules()):
        raise ValueError("calibrate_batchnorm needs a tower with BatchNorm layers (a CLIP ModifiedResNet, e.g. RN50)")
    frames = []
    for key, path in videos:
        try:
            frames.append(dataset.decode(str(key), None if path is None else os.fspath(path)).frames)
        except Exception as e:  # an unreadable video is reported by the extraction itself
            log.warning("calibration skips video %r: %s", key, _reason(e))
    if not frames:
        raise ValueError("calibrate_batchnorm: none of the calibration videos could be decoded")
    estimate_batchnorm_statistics(visual, normalise(torch.cat(frames).to(device), mean, std))


def _extract(loader: VideoLoader, visual, mean, std, writer: FeatureWriter, report: VideoExtractionReport,
             meta: dict, *, batch_size: int, device: torch.device, dtype: torch.dtype, amp: bool, bar) -> None:
    autocast = torch.autocast("cuda", dtype=torch.float16) if amp and device.type == "cuda" \
        else contextlib.nullcontext()
    packer = _FramePacker(batch_size)
    expected = meta["feature_dim"]
    notes: dict[str, dict] = {}  # id -> what to keep with its entry: read by PyAV, frames filled

    def run_batch() -> None:
        pixels, spans = packer.take()
        pixels = pixels.to(device, non_blocking=True)
        with torch.no_grad(), autocast:
            feats = frame_embeddings(visual, normalise(pixels, mean, std))
        if feats.dim() != 2 or feats.shape[1] != expected:
            raise RuntimeError(f"tower {meta['model_name']} gave features of shape {tuple(feats.shape)}, the store "
                               f"metadata says (frames, {expected})")
        feats = feats.to(dtype).cpu()  # cast on the device: half the bytes to move for float16
        for key, f in packer.put(feats, spans):
            note = notes.pop(key, None)
            writer.add(key, f, note=note)
            if note:
                report.decoder_fallbacks[key] = note["fallback"]
                if note["filled_frames"]:
                    report.filled_frames[key] = note["filled_frames"]
            report.extracted += 1
            report.frames += f.shape[0]
            bar.update(1)

    seen_failures = 0
    videos = iter(loader)
    try:
        with bar:
            while True:
                t_wait = time.perf_counter()
                video = next(videos, None)
                report.wait_seconds += time.perf_counter() - t_wait
                if len(loader.failures) != seen_failures:  # failed videos count as done on the bar
                    bar.update(len(loader.failures) - seen_failures)
                    seen_failures = len(loader.failures)
                    bar.set_postfix(failed=seen_failures)
                if video is None:
                    break
                if video.decoder != "decord":
                    notes[video.id] = {"decoder": video.decoder, "fallback": video.fallback,
                                       "filled_frames": video.filled, "sampled_frames": len(video.indices)}
                packer.add(video.id, video.frames)
                while packer.ready():
                    run_batch()
            while packer.queued:
                run_batch()
    finally:
        videos.close()  # after an error too: stops the workers and restores the SIGCHLD handler now, not at GC


# ---------------------------------------------------------------------------------------------------------- VALUE

def read_value_npz(path: PathLike) -> torch.Tensor:
    """The (frames, D) array "features" of one VALUE release file ({vid_name}.npz), as a tensor of its dtype."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            if not hasattr(z, "files"):
                raise ValueFeatureError(f"{path}: a single .npy array, not an .npz archive with 'features'")
            if "features" not in z.files:
                raise ValueFeatureError(f"{path}: no array 'features' (arrays: {z.files})")
            a = z["features"]
    except ValueFeatureError:
        raise
    except FileNotFoundError:
        raise ValueFeatureError(f"{path}: file not found") from None
    except Exception as e:  # BadZipFile, EOFError (empty file), ValueError (pickled objects), OSError
        raise ValueFeatureError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from None
    if a.ndim != 2:
        raise ValueFeatureError(f"{path}: 'features' has shape {a.shape}, expected (frames, dim)")
    if a.shape[0] == 0:
        raise ValueFeatureError(f"{path}: 'features' has 0 frames")
    if not np.issubdtype(a.dtype, np.floating):
        raise ValueFeatureError(f"{path}: 'features' has dtype {a.dtype}, expected floating point")
    if not np.isfinite(a).all():
        raise ValueFeatureError(f"{path}: 'features' holds NaN or infinite values")
    return torch.from_numpy(np.ascontiguousarray(a))


def value_feature_metadata(feature_dim: int = 512, dtype: torch.dtype = torch.float16) -> dict:
    """What a store of imported VALUE release features records. Not equal to an extracted store's metadata
    (other decoder, scaler and frame placement), so the two are never mixed in one store."""
    return {
        "kind": "video_frames",
        "source": "VALUE release (HERO_Video_Feature_Extractor, clip-vit)",
        "model_name": "ViT-B-32",
        "pretrained": "openai",
        "output": "encode_image (pooled, projected, not L2-normalised)",
        "decoder": "ffmpeg",
        "sampling": {"sample_fps": VALUE_SAMPLE_FPS},
        "image_size": 224,
        "resize": "crop",
        "feature_dim": int(feature_dim),
        "dtype": dtype_name(dtype),
    }


@dataclass
class ValueImportReport:
    store: str
    requested: int
    imported: int
    skipped: int  # already in the store
    failed: dict = field(default_factory=dict)  # id -> reason (on_error='skip')
    frames: int = 0
    in_store: int = 0
    seconds: float = 0.0

    def summary(self) -> dict:
        d = asdict(self)
        d["failed"] = len(self.failed)
        d["failed_ids"] = sorted(self.failed)[:20]
        d["seconds"] = round(self.seconds, 3)
        return d


def find_value_features(features_dir: PathLike, glob: str = "*.npz") -> dict[str, Path]:
    """{vid_name: file} of a VALUE feature folder (vis_features/{tv,how2,yc2}/clip-vit/{vid_name}.npz)."""
    features_dir = Path(features_dir)
    if not features_dir.is_dir():
        raise FileNotFoundError(f"feature folder {features_dir} not found")
    return _by_stem([p for p in features_dir.glob(glob) if p.is_file()])


def import_value_features(features: Union[PathLike, Mapping[str, PathLike]], store_root: PathLike, *,
                          glob: str = "*.npz", dtype: Optional[torch.dtype] = None, on_error: str = "raise",
                          shard_size: int = 1024, progress: bool = True) -> ValueImportReport:
    """VALUE's released features (a folder of {vid_name}.npz, or {id: file}) into a FeatureStore, one (frames, D)
    entry per video. dtype: None keeps the files' dtype (float16 in the release). A bad file raises
    `ValueFeatureError` naming it (on_error='skip': recorded as a failure and skipped). Resumable."""
    from tqdm.auto import tqdm

    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    files = find_value_features(features, glob) if not isinstance(features, Mapping) else \
        {str(k): Path(v) for k, v in features.items()}
    items = sorted(files.items())
    t0 = time.perf_counter()
    report = ValueImportReport(store=str(store_root), requested=len(items), imported=0, skipped=0)
    if not items:
        raise FileNotFoundError(f"no {glob} files in {features}")
    # the first readable file fixes the store's feature dim and dtype (the metadata must exist before writing)
    first, failures = None, {}
    for key, path in items:
        try:
            first = read_value_npz(path)
            break
        except ValueFeatureError as e:
            if on_error == "raise":
                raise
            failures[key] = str(e)
    if first is None:
        raise ValueFeatureError(f"none of the {len(items)} files in {features} is a readable VALUE feature file")
    dtype = dtype or first.dtype
    writer = FeatureWriter(store_root, value_feature_metadata(first.shape[1], dtype), shard_size=shard_size,
                           background=True)
    try:
        for key, reason in failures.items():
            writer.add_failure(key, reason)
            report.failed[key] = reason
        pending = [(k, p) for k, p in items if k not in writer and k not in failures]
        report.skipped = len(items) - len(pending) - len(failures)
        for key, path in tqdm(pending, unit="video", disable=not progress, desc="VALUE features"):
            try:
                feats = read_value_npz(path)
                if feats.shape[1] != first.shape[1]:
                    raise ValueFeatureError(f"{path}: feature dim {feats.shape[1]}, the other files have "
                                            f"{first.shape[1]}")
            except ValueFeatureError as e:
                if on_error == "raise":
                    raise
                log.warning("%s", e)
                writer.add_failure(key, str(e))
                report.failed[key] = str(e)
                continue
            writer.add(key, feats.to(dtype))
            report.imported += 1
            report.frames += feats.shape[0]
    finally:
        writer.close()
    report.in_store = len(writer)
    report.seconds = time.perf_counter() - t0
    return report


# ---------------------------------------------------------------------------------------------------------- resize

def resize_frames(features: torch.Tensor, n: int = VALUE_FRAMES) -> torch.Tensor:
    """(T, D) -> (n, D), the reference loader's rule: T < n appends zero rows at the end; T > n takes adaptive
    max pooling over time (F.adaptive_max_pool1d: output step i is the max over frames floor(i*T/n) ..
    ceil((i+1)*T/n) - 1); T == n returns the input unchanged. The zero rows are not masked (as the reference)."""
    if features.dim() != 2:
        raise ValueError(f"features must be (frames, dim), got shape {tuple(features.shape)}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    t, d = features.shape
    if t == n:
        return features
    if t < n:
        return torch.cat([features, features.new_zeros(n - t, d)])
    x = features.t().unsqueeze(0)  # (1, D, T): pool over time per feature
    if x.dtype in (torch.float16, torch.bfloat16) and x.device.type == "cpu":
        x = x.float()  # a max is exact in any precision; float32 is the safe CPU kernel
    return F.adaptive_max_pool1d(x, n).squeeze(0).t().to(features.dtype).contiguous()


# ---------------------------------------------------------------------------------------------------------- CLI

def _by_stem(files: Sequence[Path]) -> dict[str, Path]:
    by_stem: dict[str, Path] = {}
    for p in sorted(files):
        if p.stem in by_stem:
            raise ValueError(f"two files have the id {p.stem!r}: {by_stem[p.stem]} and {p}; narrow --glob")
        by_stem[p.stem] = p
    return by_stem


def find_videos(videos_dir: PathLike, glob: Optional[str] = None,
                ids: Optional[Sequence[str]] = None) -> dict[str, Optional[Path]]:
    """{id: path}, id = file stem (VALUE's vid_name). `glob` (relative, '**' recurses) defaults to the video
    files directly in videos_dir. With `ids`, only those, and an id without a file maps to None (reported as
    failed by the extraction)."""
    videos_dir = Path(videos_dir)
    if not videos_dir.is_dir():
        raise FileNotFoundError(f"video folder {videos_dir} not found")
    if glob:
        files = [p for p in videos_dir.glob(glob) if p.is_file()]
    else:
        files = [p for p in videos_dir.iterdir() if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES]
    by_stem = _by_stem(files)
    if ids is None:
        return dict(by_stem)
    return {i: by_stem.get(i) for i in ids}


def _read_ids(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        ids = [line.strip() for line in f if line.strip()]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path}: repeated ids")
    return ids


def parse_rate(text: str) -> float:
    """'2/3' or '0.6667' -> frames per second (a fraction keeps VALUE's rate exact, so a resumed run matches)."""
    try:
        if "/" in text:
            a, b = text.split("/")
            value = float(a) / float(b)
        else:
            value = float(text)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a rate (e.g. 2/3 or 0.5)") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"rate {text!r} must be positive")
    return value


def parse_share(text: str) -> float:
    """'0.5' -> 0.5, a share in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} must be between 0 and 1")
    return value


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data.video",
                                     description=" ".join(__doc__.split("\n\n")[0].split()))
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("features", help="per-frame CLIP features of a folder of videos (VALUE's recipe by default)")
    p.add_argument("--videos-dir", required=True)
    p.add_argument("--out", required=True, help="store directory (created, or resumed)")
    p.add_argument("--glob", help="file pattern relative to --videos-dir (e.g. '*.mp4', '**/*.mkv')")
    p.add_argument("--ids", help="file with one id (file stem) per line; default every video in the folder")
    p.add_argument("--model", default="ViT-B-32", help="open_clip model name")
    p.add_argument("--model-config", help="JSON file with an open_clip model config, registered as --model")
    p.add_argument("--pretrained", default="openai", help="open_clip pretrained tag or checkpoint file; 'none' for "
                   "random init (tests, benchmarks)")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--sample-fps", type=parse_rate, default=VALUE_SAMPLE_FPS,
                     help="frames per second, at the middle of each 1/fps segment, e.g. 2/3 (default: VALUE's 2/3)")
    how.add_argument("--n-frames", type=int, help="instead: this many frames, uniformly over each video")
    p.add_argument("--min-frames", type=int, default=1, help="at least this many frames per video")
    p.add_argument("--resize", choices=RESIZE_MODES, default="crop",
                   help="crop: shorter side to the tower size + centre crop (VALUE's); squash: ignore the aspect")
    p.add_argument("--image-size", type=int, help="default: the tower's input size")
    p.add_argument("--batch-size", type=int, default=64, help="frames per tower forward")
    p.add_argument("--num-workers", type=int, default=2, help="DataLoader processes decoding videos")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default="float16", help="storage dtype")
    p.add_argument("--on-error", choices=ON_ERROR, default="skip", help="a video that cannot be decoded")
    p.add_argument("--decode-timeout", type=float, default=600.0, help="seconds one video may take to decode")
    p.add_argument("--min-decodable", type=parse_share, default=MIN_DECODABLE, metavar="SHARE",
                   help="keep a damaged video when at least this share of its sampled frames decodes (the others "
                   "show the nearest decoded frame); below it the video is skipped (default %(default)s)")
    p.add_argument("--shard", type=parse_shard, help="i/n: extract the i-th of n disjoint parts (0-based)")
    p.add_argument("--shard-size", type=int, default=1024, help="entries per shard file")
    p.add_argument("--calibrate-batchnorm", type=int, default=0, metavar="N",
                   help="random ResNet towers: BatchNorm statistics from the frames of the first N videos")
    p.add_argument("--no-progress", action="store_true")
    q = sub.add_parser("import-value", help="VALUE's released features ({vid_name}.npz) into a store")
    q.add_argument("--features-dir", required=True, help="e.g. vis_features/tv/clip-vit")
    q.add_argument("--out", required=True)
    q.add_argument("--glob", default="*.npz")
    q.add_argument("--on-error", choices=ON_ERROR, default="raise", help="a file that cannot be read")
    q.add_argument("--shard-size", type=int, default=1024)
    q.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    if args.command == "import-value":
        report = import_value_features(args.features_dir, args.out, glob=args.glob, on_error=args.on_error,
                                       shard_size=args.shard_size, progress=not args.no_progress)
        print(json.dumps(report.summary()))
        return 0

    videos = find_videos(args.videos_dir, args.glob, _read_ids(args.ids) if args.ids else None)
    if not videos:
        raise FileNotFoundError(f"no videos in {args.videos_dir} (glob {args.glob or 'video suffixes'})")
    model_config = None
    if args.model_config:
        with open(args.model_config, encoding="utf-8") as f:
            model_config = json.load(f)
    report = extract_video_features(
        videos, args.out, model_name=args.model,
        pretrained=None if args.pretrained.lower() == "none" else args.pretrained, model_config=model_config,
        sample_fps=args.sample_fps, n_frames=args.n_frames, min_frames=args.min_frames, batch_size=args.batch_size,
        num_workers=args.num_workers, device=args.device, dtype=dtype_from_name(args.dtype), resize=args.resize,
        image_size=args.image_size, progress=not args.no_progress, on_error=args.on_error,
        decode_timeout=args.decode_timeout, shard=args.shard, shard_size=args.shard_size,
        calibrate_batchnorm=args.calibrate_batchnorm, min_decodable=args.min_decodable)
    print(json.dumps(report.summary()))
    return 0


if __name__ == "__main__":
    from .features import USER_ERRORS, run_cli
    sys.exit(run_cli(main, USER_ERRORS + (VideoDecodeError,)))
