"""Video decoding and video feature extraction: our pipeline against bare decord and PyAV, in one run.

    python bench/video.py            # 8 clips of 20 s, 640x360 at 30 fps (H.264, x264 veryfast: B-frames,
                                     # a keyframe every 250 frames), VALUE's sampling (one frame every 1.5 s),
                                     # 3 interleaved rounds; then feature extraction with a tiny ViT and ViT-B-32
    python bench/video.py --quick    # 4 clips of 10 s at 320x180, 1 round

Decoding (frames/s = sampled frames delivered / wall time, all clips, same clips and frame indices for all):
- bare decord: one process, `VideoReader(path)` (decord's automatic thread count) + one `get_batch(indices)`
  per clip: what calling decord directly gives. `bare decord 1 thread`: the same with num_threads=1 (what each
  of our workers runs).
- pipeline: `VideoLoader(VideoFrames(..., resize=None), num_workers=W)`, raw frames, worker start-up included;
  `pipeline 0 workers` decodes in this process (our overhead alone); `pipeline + crop` also resizes and crops
  to 224 in the workers (the extraction's decode path).
- PyAV: one process, the same frames by seeking to the keyframe before a frame when it is more than 2 s ahead,
  then decoding forward (threads: AUTO); frames converted to RGB like decord's.
Ratios are to bare decord timed in the same round (after one warm-up pass; the order of the methods rotates
between rounds); medians over rounds. The pipeline's time to its first video (worker start-up) is printed
too. The check `same frames` compares PyAV's and decord's frames (mean absolute difference, 0-255).

Extraction (videos/s): `extract_video_features` into a fresh store (decode + crop in 2 workers, the tower in this
process, float16 writes; model loading excluded), and `tower only`: the same tower on the same frames already
decoded and preprocessed in memory, same batch size; ratio = pipeline / tower only (1.0: decoding fully hidden).
Other processes share this machine: the load average is printed and stored with the numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.video import (TINY_VIT_CONFIG, VALUE_SAMPLE_FPS, VideoFrames, VideoLoader,  # noqa: E402
                        extract_video_features, frame_embeddings, load_clip_tower, normalise, open_video,
                        preprocess_frames, read_frames, sample_frame_times)


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def make_clips(folder: Path, n: int, size: tuple[int, int], seconds: float, fps: int, seed: int = 0) -> dict:
    """TV-like clips: a textured background panning slowly, moving blocks, sensor-like noise; x264 veryfast."""
    import av
    rng = np.random.default_rng(seed)
    w, h = size
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for c in range(n):
        base = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
        texture = np.kron(base, np.ones((8, 8, 1), np.uint8))[:h, :w]  # blocky texture, cheap to pan
        texture = ((texture.astype(np.uint16) + np.roll(texture, 4, axis=1)) // 2).astype(np.uint8)
        noise = rng.integers(0, 12, (4, h, w, 3), dtype=np.uint8)
        path = folder / f"clip_{c:03d}.mp4"
        with av.open(str(path), "w") as container:
            stream = container.add_stream("libx264", rate=fps)
            stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
            stream.options = {"preset": "veryfast", "crf": "23"}
            for i in range(int(seconds * fps)):
                frame = np.roll(texture, i // 2, axis=1) + noise[i % 4]
                for k in range(3):
                    x = int((i * (3 + k) + 100 * k) % (w - 60))
                    y = int(h / 4 * (k + 1) - 20)
                    frame[y:y + 40, x:x + 60] = (60 * k + 40, 200 - 50 * k, 90)
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        out[path.stem] = path
    return out


def clip_indices(clips: dict, sample_fps: float) -> dict[str, list[int]]:
    """The frames the pipeline samples, from decord's timestamps (as the pipeline does; outside any timing)."""
    out = {}
    for key, path in clips.items():
        vr = open_video(path)
        stamps = vr.get_frame_timestamp(range(len(vr)))
        out[key] = sample_frame_times(stamps[:, 0], float(stamps[-1, 1]), sample_fps=sample_fps)
        del vr
    return out


def bare_decord(clips: dict, indices: dict, threads: int) -> tuple[float, int]:
    t0 = time.perf_counter()
    n = 0
    for key, path in clips.items():
        vr = open_video(path, num_threads=threads)
        n += vr.get_batch(indices[key]).asnumpy().shape[0]
        del vr
    return time.perf_counter() - t0, n


STARTUP: dict[str, list[float]] = {}


def pipeline(clips: dict, sample_fps: float, workers: int, resize=None) -> tuple[float, int]:
    t0 = time.perf_counter()
    loader = VideoLoader(VideoFrames(clips, sample_fps=sample_fps, resize=resize), num_workers=workers)
    n, first = 0, None
    for video in loader:
        n += video.frames.shape[0]
        first = first or time.perf_counter() - t0
    if loader.failures:
        raise RuntimeError(f"bench clips failed to decode: {loader.failures}")
    STARTUP.setdefault(f"{workers}-{resize}", []).append(first)
    return time.perf_counter() - t0, n


def pyav_frames(path: Path, wanted: list[int]) -> list[np.ndarray]:
    """Frames `wanted` (sorted) of a constant-rate video, seeking to the keyframe before a frame >2 s ahead."""
    import av
    out = []
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        fps, tb = float(stream.average_rate), stream.time_base
        start = stream.start_time or 0
        index_of = lambda frame: int(round(float((frame.pts - start) * tb) * fps))  # noqa: E731
        current = -1
        frames = None
        for target in wanted:
            if frames is None or target - current > 2 * fps:
                container.seek(int(start + target / fps / tb), stream=stream, backward=True, any_frame=False)
                frames = container.decode(stream)
            for frame in frames:
                current = index_of(frame)
                if current >= target:
                    out.append(frame.to_ndarray(format="rgb24"))
                    break
    return out


def pyav(clips: dict, indices: dict) -> tuple[float, int]:
    t0 = time.perf_counter()
    n = sum(len(pyav_frames(path, indices[key])) for key, path in clips.items())
    return time.perf_counter() - t0, n


def same_frames(clips: dict, indices: dict) -> float:
    """Largest mean absolute difference between PyAV's and decord's frames for the same indices."""
    worst = 0.0
    for key, path in clips.items():
        a = np.stack(pyav_frames(path, indices[key])).astype(np.int16)
        b = read_frames(path, indices=indices[key])[0].numpy().astype(np.int16)
        worst = max(worst, float(np.abs(a - b).mean()))
    return worst


def tower_only(model_name: str, model_config, clips: dict, sample_fps: float, batch_size: int) -> float:
    """Seconds for the tower alone on the clips' frames, decoded and preprocessed beforehand."""
    visual, mean, std = load_clip_tower(model_name, None, "cpu", model_config)
    frames = torch.cat([preprocess_frames(read_frames(p, sample_fps=sample_fps)[0]) for p in clips.values()])
    batches = list(frames.split(batch_size))
    with torch.no_grad():
        frame_embeddings(visual, normalise(batches[0], mean, std))  # warm-up
        t0 = time.perf_counter()
        for b in batches:
            frame_embeddings(visual, normalise(b, mean, std))
        return time.perf_counter() - t0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="4 clips of 10 s at 320x180, one round")
    parser.add_argument("--clips", type=int, default=8)
    parser.add_argument("--size", default="640x360")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--fps", type=int, default=30)
    parser.add_argument("--sample-fps", type=float, default=VALUE_SAMPLE_FPS)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of the pipeline")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32, help="frames per tower forward")
    parser.add_argument("--models", default="tiny,ViT-B-32", help="'tiny' (TINY_VIT_CONFIG) and/or open_clip names")
    parser.add_argument("--out", default=None, help="results JSON (default bench/results_video_cpu.json)")
    args = parser.parse_args(argv)
    if args.quick:
        args.clips, args.size, args.seconds, args.rounds = 4, "320x180", 10.0, 1
    size = tuple(int(v) for v in args.size.split("x"))
    out_path = Path(args.out or Path(__file__).with_name("results_video_cpu.json"))

    load_before = load_average()
    tmp = Path(tempfile.mkdtemp(prefix="bench_video_"))
    try:
        t0 = time.perf_counter()
        clips = make_clips(tmp / "clips", args.clips, size, args.seconds, args.fps)
        make_s = time.perf_counter() - t0
        indices = clip_indices(clips, args.sample_fps)
        n_frames = sum(len(v) for v in indices.values())
        print(f"made {args.clips} clips in {make_s:.1f} s; {n_frames} sampled frames", flush=True)
        methods = {
            "bare decord": lambda: bare_decord(clips, indices, 0),
            "bare decord 1 thread": lambda: bare_decord(clips, indices, 1),
            f"pipeline {args.workers} workers": lambda: pipeline(clips, args.sample_fps, args.workers),
            "pipeline 0 workers": lambda: pipeline(clips, args.sample_fps, 0),
            f"pipeline {args.workers} workers + crop": lambda: pipeline(clips, args.sample_fps, args.workers, "crop"),
            "PyAV": lambda: pyav(clips, indices),
        }
        bare_decord(clips, indices, 0)  # warm-up: files in the page cache, libraries loaded
        times: dict[str, list[float]] = {m: [] for m in methods}
        for r in range(args.rounds):
            names = list(methods)
            names = names[r % len(names):] + names[:r % len(names)]  # no method always first or last
            for name in names:
                run = methods[name]
                seconds, n = run()
                if n != n_frames:
                    raise RuntimeError(f"{name} delivered {n} frames, expected {n_frames}")
                times[name].append(seconds)
            print(f"round {r + 1}: " + ", ".join(f"{m} {n_frames / t[-1]:.0f}" for m, t in times.items()), flush=True)
        diff = same_frames(clips, indices)
        decode_rows = []
        for name, ts in times.items():
            ratios = [times["bare decord"][i] / t for i, t in enumerate(ts)]
            decode_rows.append({"method": name, "frames_per_s": n_frames / statistics.median(ts),
                                "ratio_to_bare": statistics.median(ratios), "ratios": [round(x, 3) for x in ratios],
                                "seconds": [round(x, 3) for x in ts]})

        extract_rows = []
        for model in [m for m in args.models.split(",") if m]:
            name, config = ("tiny_vit_bench", TINY_VIT_CONFIG) if model == "tiny" else (model, None)
            tower_s = tower_only(name, config, clips, args.sample_fps, args.batch_size)
            report = extract_video_features(clips, tmp / f"store_{name}", model_name=name, pretrained=None,
                                            model_config=config, sample_fps=args.sample_fps,
                                            batch_size=args.batch_size, num_workers=args.workers, progress=False)
            assert report.extracted == args.clips and not report.failed
            extract_rows.append({"model": model, "videos_per_s": report.videos_per_s,
                                 "frames_per_s": report.frames_per_s, "tower_only_frames_per_s": n_frames / tower_s,
                                 "ratio_to_tower": report.frames_per_s / (n_frames / tower_s),
                                 "wait_share": report.wait_seconds / report.seconds, "seconds": report.seconds})
            print(f"{model}: {report.videos_per_s:.2f} videos/s", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    load_after = load_average()

    print(f"\nVideo benchmark: {args.clips} clips {size[0]}x{size[1]}, {args.seconds:g} s at {args.fps} fps (H.264), "
          f"{args.sample_fps:.4g} sampled frames/s ({n_frames} frames), {args.rounds} rounds, torch "
          f"{torch.__version__}, {os.cpu_count()} CPUs")
    print(f"load average (1, 5, 15 min): before {load_before}, after {load_after}")
    print(f"{'decoding':<30} {'frames/s':>9} {'x bare':>7} | per round")
    print("-" * 72)
    for row in decode_rows:
        print(f"{row['method']:<30} {row['frames_per_s']:>9.1f} {row['ratio_to_bare']:>7.3f} | {row['ratios']}")
    print(f"same frames: PyAV vs decord mean |difference| <= {diff:.2f} (0-255)")
    startup = {k: round(statistics.median(v), 3) for k, v in STARTUP.items()}
    print(f"pipeline time to the first video, s (workers-resize: median): {startup}")
    print(f"\n{'extraction (random weights)':<30} {'videos/s':>9} {'frames/s':>9} {'tower f/s':>9} {'ratio':>6} "
          f"{'wait':>5}")
    print("-" * 72)
    for row in extract_rows:
        print(f"{row['model']:<30} {row['videos_per_s']:>9.2f} {row['frames_per_s']:>9.1f} "
              f"{row['tower_only_frames_per_s']:>9.1f} {row['ratio_to_tower']:>6.3f} {row['wait_share']:>5.2f}")
    result = {"clips": args.clips, "size": list(size), "seconds": args.seconds, "fps": args.fps,
              "sample_fps": args.sample_fps, "frames": n_frames, "workers": args.workers, "rounds": args.rounds,
              "batch_size": args.batch_size, "cpu": platform.processor() or platform.machine(),
              "cpus": os.cpu_count(), "torch": torch.__version__, "load_before": load_before, "load_after": load_after,
              "pyav_vs_decord_mean_abs_diff": diff, "pipeline_first_video_s": startup, "decoding": decode_rows,
              "extraction": extract_rows,
              "quick": args.quick}
    out_path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
