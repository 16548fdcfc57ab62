"""Image feature extraction: the whole pipeline's throughput as a ratio to the bare tower forward, in one run.

    python bench/features.py            # RN101 (random weights), 32 JPEGs of 640x480, batch 8, 5 rounds for
                                        # each of: main-process threads (torch's default, and 1 on CPU) x
                                        # DataLoader workers (1, 2)
    python bench/features.py --quick    # 16 images, batch 4, workers 2, torch's threads, one round

pipeline = `extract_image_features` into a fresh store: JPEG files read and decoded, resized (squash, bicubic) and
normalised in DataLoader worker processes, the tower forward to layer4, the float16 cast and the shard writes;
model loading excluded. bare = the same tower's forward (`grid_features`) on the same images, preprocessed
beforehand and held in memory, same batch size. ratio = pipeline images/s / bare images/s (1.0: decoding and
writing fully hidden behind the forward). steady = the same without the pipeline's start (worker start-up and the
first batch's decoding, which nothing can overlap; a fixed cost that a real run of 100k images amortises).
wait = the share of the steady part that the main process spent waiting for decoded batches, measured inside
the same run (so, unlike the ratio, not moved by other load on the machine: 0 means the tower never waited).
decode = one process decoding + preprocessing alone, for scale. Rounds alternate bare and pipeline so that both
see the same machine state; medians over rounds are reported, and the load average, since the timings are only
as quiet as the machine.
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
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.image_features import (extract_image_features, grid_features, image_preprocess,  # noqa: E402
                                 load_clip_tower, load_image)


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def make_images(folder: Path, n: int, size: tuple[int, int], seed: int = 0) -> dict[str, Path]:
    """Photo-like JPEGs (smooth shading, shapes, sensor-like noise; quality 90), so decoding costs what a real
    640x480 photo costs (a flat image decodes much faster, pure noise much slower)."""
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for i in range(n):
        c = rng.uniform(0, 255, (3, 3))
        base = np.stack([c[k, 0] + c[k, 1] * x / w - c[k, 2] * y / h * 0.5 for k in range(3)], -1)
        img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        for _ in range(12):
            x0, y0 = rng.integers(0, w), rng.integers(0, h)
            draw.ellipse([x0, y0, x0 + rng.integers(20, 200), y0 + rng.integers(20, 200)],
                         fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
        arr = np.asarray(img, np.float32) + rng.normal(0, 6, (h, w, 3))
        path = folder / f"bench_{i:05d}.jpg"
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(path, "JPEG", quality=90)
        out[path.stem] = path
    return out


def bare_forward(visual, batches, device) -> float:
    """Seconds for the tower forward over preprocessed batches (already in memory)."""
    amp = torch.autocast("cuda", dtype=torch.float16) if device.type == "cuda" else torch.autocast("cpu",
                                                                                                   enabled=False)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.no_grad(), amp:
        sync()
        t0 = time.perf_counter()
        for b in batches:
            grid_features(visual, b.to(device, non_blocking=True))
        sync()
    return time.perf_counter() - t0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="16 images, batch 4, workers 2, torch's threads, "
                        "one round")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--size", default="640x480")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", default="1,2", help="DataLoader worker counts to measure, comma-separated")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--model", default="RN101")
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", default=None, help="torch threads of the main process to measure, "
                        "comma-separated (default on CPU: torch's own (one per core), then 1; the workers use one)")
    parser.add_argument("--out", default=None, help="results JSON (default bench/results_features_{cpu,cuda}.json)")
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.batch_size, args.workers, args.rounds = 16, 4, "2", 1
        args.threads = args.threads or str(torch.get_num_threads())
    if args.images % args.batch_size:
        parser.error("--images must be a multiple of --batch-size (one batch shape, warmed up once)")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    default_threads = torch.get_num_threads()
    if args.threads:
        thread_counts = [int(t) for t in args.threads.split(",")]
    else:
        thread_counts = [default_threads] if device.type == "cuda" or default_threads == 1 else [default_threads, 1]
    workers = [int(w) for w in args.workers.split(",")]
    size = tuple(int(v) for v in args.size.split("x"))
    out_path = Path(args.out or Path(__file__).with_name(f"results_features_{device.type}.json"))

    load_before = load_average()
    tmp = Path(tempfile.mkdtemp(prefix="bench_features_"))
    try:
        images = make_images(tmp / "images", args.images, size)
        visual, mean, std = load_clip_tower(args.model, None, device)
        if device.type == "cuda":
            visual.to(memory_format=torch.channels_last)
        transform = image_preprocess(224, "squash", mean, std)
        torch.set_num_threads(1)  # as in a DataLoader worker
        t0 = time.perf_counter()
        pixels = [transform(load_image(p)) for p in images.values()]
        decode_s = time.perf_counter() - t0
        batches = [torch.stack(pixels[i:i + args.batch_size]) for i in range(0, len(pixels), args.batch_size)]
        if device.type == "cuda":
            batches = [b.pin_memory() for b in batches]

        rows = []
        for threads, nw in [(t, w) for t in thread_counts for w in workers]:
            torch.set_num_threads(threads)
            bare_forward(visual, batches[:2], device)  # warm-up: kernel selection for this batch shape and threads
            bare, pipe, steady, startup, wait = [], [], [], [], []
            for r in range(args.rounds):
                bare.append(args.images / bare_forward(visual, batches, device))
                store = tmp / f"store_{nw}_{r}"
                report = extract_image_features(images, store, model_name=args.model, pretrained=None,
                                                batch_size=args.batch_size, num_workers=nw, device=device,
                                                progress=False)
                assert report.extracted == args.images and not report.failed
                pipe.append(report.images_per_s)
                steady.append(report.extracted / (report.seconds - report.startup_seconds))
                startup.append(report.startup_seconds)
                wait.append((report.wait_seconds - report.startup_seconds) / (report.seconds - report.startup_seconds))
                shutil.rmtree(store)
            ratios = [p / b for p, b in zip(pipe, bare)]
            steady_ratios = [p / b for p, b in zip(steady, bare)]
            rows.append({"threads": threads, "workers": nw, "bare_img_s": statistics.median(bare),
                         "pipeline_img_s": statistics.median(pipe), "ratio": statistics.median(ratios),
                         "steady_ratio": statistics.median(steady_ratios),
                         "startup_s": statistics.median(startup), "wait_share": statistics.median(wait),
                         "ratios": [round(x, 3) for x in ratios], "steady_ratios": [round(x, 3) for x in steady_ratios],
                         "bare_rounds": [round(x, 3) for x in bare], "pipeline_rounds": [round(x, 3) for x in pipe]})
            print(f"threads {threads} workers {nw}: ratio per round {rows[-1]['ratios']}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    load_after = load_average()

    head = (f"Feature extraction benchmark: {args.model} (random weights) grid to layer4, {args.images} JPEGs "
            f"{size[0]}x{size[1]}, batch {args.batch_size}, {device.type}, torch {torch.__version__}, "
            f"{os.cpu_count()} CPUs, {args.rounds} rounds")
    print(head)
    print(f"load average (1, 5, 15 min): before {load_before}, after {load_after}")
    print(f"decode + preprocess alone, one process, one thread: {args.images / decode_s:.1f} img/s")
    print(f"{'threads':>7} {'workers':>7} | {'bare img/s':>10} {'pipeline img/s':>14} {'ratio':>6} {'steady':>6} "
          f"{'wait':>6} {'start s':>7} | ratio per round")
    print("-" * 94)
    for row in rows:
        print(f"{row['threads']:>7} {row['workers']:>7} | {row['bare_img_s']:>10.2f} {row['pipeline_img_s']:>14.2f} "
              f"{row['ratio']:>6.3f} {row['steady_ratio']:>6.3f} {row['wait_share']:>6.3f} {row['startup_s']:>7.2f} "
              f"| {row['ratios']}")
    result = {"model": args.model, "images": args.images, "size": list(size), "batch_size": args.batch_size,
              "device": device.type, "device_name": torch.cuda.get_device_name() if device.type == "cuda"
              else platform.processor() or platform.machine(), "torch": torch.__version__,
              "threads": thread_counts, "rounds": args.rounds, "cpus": os.cpu_count(), "load_before": load_before,
              "load_after": load_after, "decode_img_s_one_process": args.images / decode_s, "rows": rows,
              "quick": args.quick}
    out_path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
