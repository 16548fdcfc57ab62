"""CLIP ResNet grid features of images, as the VL-BART recipe uses them, written to a FeatureStore.

The reference's released features (VL-T5 / VL-Adapter / DoRA) are OpenAI CLIP RN101 at 224x224: the image is
resized to 224x224 with bicubic interpolation ignoring its aspect ratio ("squash"), normalised with CLIP's
mean/std, and the output of `visual.layer4` (before the attention pooling) is kept: a (2048, 7, 7) map stored as
(49, 2048), row-major over (h, w). The model pools it to 6x6 = 36 tokens with AdaptiveMaxPool2d (`pool_grid`).

    from data.features import FeatureStore
    from data.image_features import extract_image_features
    report = extract_image_features({"COCO_val2014_000000391895": "val2014/COCO_val2014_000000391895.jpg"},
                                    "features/coco_RN101", model_name="RN101", pretrained="openai")
    store = FeatureStore("features/coco_RN101"); store.get("COCO_val2014_000000391895")  # (49, 2048) float16

Decoding and preprocessing run in DataLoader worker processes while the main process runs the tower; an image
that cannot be read is logged and recorded by id with its reason, and the rest goes on. Reruns skip what the
store has; a killed run loses at most the entries not yet written as a shard.
"""
from __future__ import annotations

import atexit
import contextlib
import json
import logging
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from .features import DEFAULT_PREFIX, FeatureWriter, dtype_name

log = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
RESIZE_MODES = ("squash", "crop")

# A ModifiedResNet small enough for tests and demos (layers [1,1,1,1], width 8: 256-d grid), same code path as
# RN101 (layers [3,4,23,3], width 64: 2048-d grid). Both give a 7x7 grid at 224x224.
TINY_RESNET_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 224, "layers": [1, 1, 1, 1], "width": 8, "head_width": 64},
    "text_cfg": {"context_length": 77, "vocab_size": 1000, "width": 32, "heads": 2, "layers": 1},
}
# open_clip builds whole CLIP models; a config given without a text tower gets this (unused) small one
_STUB_TEXT_CFG = {"context_length": 77, "vocab_size": 1000, "width": 32, "heads": 2, "layers": 1}


# ---------------------------------------------------------------------------------------------------------- tower

_config_dir: Optional[Path] = None


def _complete_config(config: Mapping) -> dict:
    cfg = json.loads(json.dumps(dict(config)))
    if "vision_cfg" not in cfg:
        raise ValueError("model_config needs a 'vision_cfg' (open_clip's model config layout)")
    cfg.setdefault("embed_dim", 64)
    cfg.setdefault("text_cfg", dict(_STUB_TEXT_CFG))
    return cfg


def register_model_config(name: str, config: Mapping) -> None:
    """Make `config` (open_clip's model-config layout) available to open_clip as model `name`.

    open_clip reads configs from JSON files (add_model_config), so it is written to a private temporary folder
    that lives as long as this process. Registering a name again with the same config is a no-op; a name that
    open_clip already knows with another config (e.g. 'RN101') is an error."""
    import open_clip
    global _config_dir
    if not name or "/" in name or name.startswith(("hf-hub:", "local-dir:")):
        raise ValueError(f"model name {name!r} cannot name a registered config (no '/' or schema prefix)")
    cfg = _complete_config(config)
    existing = open_clip.get_model_config(name)
    if existing is not None:
        if json.loads(json.dumps(existing)) == cfg:
            return
        raise ValueError(f"open_clip already has a model {name!r} with another config; pick another name for "
                         "model_config")
    if _config_dir is None:
        _config_dir = Path(tempfile.mkdtemp(prefix="open_clip_configs_"))
        atexit.register(shutil.rmtree, _config_dir, True)
    path = _config_dir / f"{name}.json"
    path.write_text(json.dumps(cfg), encoding="utf-8")
    open_clip.add_model_config(path)


def _model_config(model_name: str, model_config: Optional[Mapping]) -> dict:
    if model_config is not None:
        return _complete_config(model_config)
    import open_clip
    cfg = open_clip.get_model_config(model_name)
    if cfg is None:
        raise ValueError(f"open_clip has no model {model_name!r}; pass model_config, or one of "
                         f"{[m for m in open_clip.list_models() if m.startswith('RN')]}")
    return cfg


def _resnet_vision_cfg(model_name: str, cfg: Mapping) -> dict:
    vision = dict(cfg["vision_cfg"])
    if not isinstance(vision.get("layers"), (list, tuple)) or vision.get("timm_model_name"):
        raise ValueError(f"model {model_name!r} is not a CLIP ModifiedResNet (vision_cfg.layers must be a list of "
                         "4 block counts); the grid before attention pooling exists only for those towers")
    return vision


def load_clip_tower(model_name: str = "RN101", pretrained: Optional[str] = "openai",
                    device: str | torch.device | None = None, model_config: Optional[Mapping] = None,
                    seed: int = 0) -> tuple[torch.nn.Module, tuple[float, ...], tuple[float, ...]]:
    """(visual tower in eval mode without gradients, mean, std) of an open_clip model.

    pretrained: an open_clip tag ('openai') or a checkpoint file; None gives random weights, drawn from `seed`
    without touching the global RNG, so a resumed extraction gets the same tower. `model_config` (open_clip's
    layout, e.g. TINY_RESNET_CONFIG) is registered as `model_name` first."""
    import open_clip
    if model_config is not None:
        register_model_config(model_name, model_config)
    kwargs = {}
    if pretrained:
        tag_cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
        if tag_cfg.get("quick_gelu"):  # OpenAI weights were trained with QuickGELU (text tower here); no warning
            kwargs["force_quick_gelu"] = True
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.create_model(model_name, pretrained=pretrained or None, **kwargs)
    visual = model.visual
    del model  # the text tower is not needed
    if not pretrained:
        _init_random_resnet(visual, seed)
    visual.eval().requires_grad_(False)
    if device is not None:
        visual.to(device)
    mean = tuple(getattr(visual, "image_mean", None) or CLIP_MEAN)
    std = tuple(getattr(visual, "image_std", None) or CLIP_STD)
    return visual, mean, std


def _init_random_resnet(visual: torch.nn.Module, seed: int) -> None:
    """Random weights that keep an image's information at a usable scale. CLIP's own initialisation zeroes the
    last BatchNorm of every residual branch and leaves PyTorch's default conv init, so a random tower's grid is
    ~1e-3 (RN101: std 0.0013), where fp16 storage rounds it and a LayerNorm's eps swamps it. He-normal convs
    and residual branches at half scale give std ~2 for RN101 (within fp16) and ~0.04 for the tiny tower."""
    from open_clip.modified_resnet import ModifiedResNet
    if not isinstance(visual, ModifiedResNet):
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        for name, m in visual.named_modules():
            if isinstance(m, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, torch.nn.BatchNorm2d):
                torch.nn.init.constant_(m.weight, 0.5 if name.endswith("bn3") else 1.0)
                torch.nn.init.zeros_(m.bias)


def grid_features(visual: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) normalised pixels -> (B, h*w, D): `visual.layer4`'s output, before attention pooling,
    row-major over (h, w) (token k is row k // w, column k % w), as the reference stores it."""
    from open_clip.modified_resnet import ModifiedResNet
    if not isinstance(visual, ModifiedResNet):
        raise TypeError(f"grid features need open_clip's ModifiedResNet tower, got {type(visual).__name__}")
    # forward_intermediates with intermediates_only stops before attnpool: block 4 of (stem, layer1..4) = layer4
    out = visual.forward_intermediates(pixels, indices=1, intermediates_only=True)["image_intermediates"][0]
    return out.flatten(2).transpose(1, 2)


def grid_hw(image_size: int) -> tuple[int, int]:
    """Spatial size of the layer4 map of a ModifiedResNet for a square input (224 -> 7)."""
    s = (image_size - 1) // 2 + 1  # conv1: 3x3, stride 2, padding 1
    s //= 2  # stem avgpool
    for _ in range(3):  # layer2..4 downsample with AvgPool2d(2)
        s //= 2
    if s < 1:
        raise ValueError(f"image_size {image_size} is too small for a ResNet grid")
    return s, s


def pool_grid(features: torch.Tensor, out_hw: Sequence[int] = (6, 6),
              grid: Optional[Sequence[int]] = None) -> torch.Tensor:
    """(..., h*w, D) row-major grid -> (..., oh*ow, D) by adaptive max pooling on the (D, h, w) map.

    This is the reference model's 7x7 -> 6x6 downsampling (overlapping 2x2 windows). `grid` defaults to a square."""
    *lead, n, d = features.shape
    if grid is None:
        side = int(round(n ** 0.5))
        if side * side != n:
            raise ValueError(f"{n} tokens are not a square grid; pass grid=(h, w)")
        grid = (side, side)
    h, w = grid
    if h * w != n:
        raise ValueError(f"grid {h}x{w} does not match {n} tokens")
    x = features.reshape(-1, h, w, d).permute(0, 3, 1, 2)
    y = F.adaptive_max_pool2d(x, tuple(out_hw))
    return y.permute(0, 2, 3, 1).reshape(*lead, out_hw[0] * out_hw[1], d)


# ---------------------------------------------------------------------------------------------------------- images

def load_image(path: str | Path) -> Image.Image:
    """Decoded RGB image. Converted before resizing: a palette or greyscale file is then resized in RGB with
    bicubic interpolation (PIL would resize a palette image with nearest neighbour)."""
    with Image.open(path) as im:
        return im.convert("RGB")  # forces the full decode here, inside the try of the caller


def image_preprocess(image_size: int = 224, resize: str = "squash", mean: Sequence[float] = CLIP_MEAN,
                     std: Sequence[float] = CLIP_STD):
    """PIL RGB image -> (3, image_size, image_size) tensor: open_clip's eval transform.

    squash: bicubic resize to image_size x image_size, aspect not kept (how the reference's features were made);
    crop: shorter side to image_size, bicubic, then centre crop (open_clip's / CLIP's own preprocessing)."""
    import open_clip
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
    return open_clip.image_transform(image_size, is_train=False, mean=tuple(mean), std=tuple(std),
                                     resize_mode="squash" if resize == "squash" else "shortest",
                                     interpolation="bicubic")


class ImageFiles(torch.utils.data.Dataset):
    """(id, path) pairs -> (id, pixels or None, failure reason or None); never raises, so one bad file cannot
    stop the DataLoader."""

    def __init__(self, items: Sequence[tuple[str, Optional[str | Path]]], transform):
        self.items = list(items)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        key, path = self.items[i]
        if path is None:
            return key, None, "no image file for this id"
        try:
            return key, self.transform(load_image(path)), None
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
            return key, None, f"{path}: {type(e).__name__}: {e}"


def collate_images(samples):
    keys = [k for k, x, _ in samples if x is not None]
    pixels = torch.stack([x for _, x, _ in samples if x is not None]) if keys else None
    failed = [(k, reason) for k, x, reason in samples if x is None]
    return keys, pixels, failed


# ---------------------------------------------------------------------------------------------------------- extraction

@dataclass
class ExtractionReport:
    store: str
    requested: int  # ids given (after --shard selection)
    extracted: int  # written by this run
    skipped: int  # already in the store
    failed: dict = field(default_factory=dict)  # id -> reason, this run
    in_store: int = 0
    seconds: float = 0.0  # the decode + forward + write loop, model loading excluded
    startup_seconds: float = 0.0  # of which: until the first batch was decoded (workers start, nothing to overlap)
    wait_seconds: float = 0.0  # of which: waiting for decoded batches, startup included (input-bound time)
    load_seconds: float = 0.0
    device: str = "cpu"
    entry_shape: Optional[list] = None

    @property
    def images_per_s(self) -> float:
        return self.extracted / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> dict:
        d = asdict(self)
        d["failed"] = len(self.failed)
        d["failed_ids"] = sorted(self.failed)[:20]
        d["images_per_s"] = round(self.images_per_s, 3)
        d["seconds"] = round(self.seconds, 3)
        d["load_seconds"] = round(self.load_seconds, 3)
        d["startup_seconds"] = round(self.startup_seconds, 3)
        d["wait_seconds"] = round(self.wait_seconds, 3)
        return d


def image_feature_metadata(model_name: str, pretrained: Optional[str], model_config: Optional[Mapping],
                           image_size: int, resize: str, dtype: torch.dtype, seed: int = 0,
                           calibrate_batchnorm: int = 0) -> dict:
    """What a store of image grid features records (and what a resumed run must match)."""
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
    cfg = _model_config(model_name, model_config)
    vision = _resnet_vision_cfg(model_name, cfg)
    meta = {
        "kind": "image_grid",
        "model_name": model_name,
        "pretrained": pretrained,
        "model_config": None if model_config is None else cfg,
        "layer": "visual.layer4",  # before attention pooling
        "image_size": image_size,
        "resize": resize,
        "interpolation": "bicubic",
        "grid": list(grid_hw(image_size)),
        "feature_dim": int(vision["width"]) * 32,
        "dtype": dtype_name(dtype),
    }
    if not pretrained:
        meta["init_seed"] = seed  # random towers differ by seed: a resume must use the same one
        if calibrate_batchnorm:
            meta["calibrate_batchnorm"] = calibrate_batchnorm
    return meta


@torch.no_grad()
def estimate_batchnorm_statistics(visual: torch.nn.Module, pixels: torch.Tensor, batch_size: int = 64) -> None:
    """Re-estimate a random tower's BatchNorm statistics on these (preprocessed) images, as training estimates a
    real tower's. A random tower's own statistics (mean 0, variance 1) leave every image's grid nearly the same
    after a LayerNorm (token cosine similarity 0.99 between demo images, measured; 0.45 after calibration), so
    nothing learns from them. For demos and tests; pretrained towers keep their statistics."""
    norms = [m for m in visual.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over all the batches
    visual.train()
    for i in range(0, len(pixels), batch_size):
        grid_features(visual, pixels[i:i + batch_size])
    visual.eval()


def extract_image_features(images: Mapping[str, Optional[str | Path]], store_root: str | Path, *,
                           model_name: str = "RN101", pretrained: Optional[str] = "openai",
                           model_config: Optional[Mapping] = None, batch_size: int = 32, num_workers: int = 2,
                           device: str | torch.device | None = None, dtype: torch.dtype = torch.float16,
                           resize: str = "squash", image_size: int = 224, progress: bool = True,
                           shard: Optional[tuple[int, int]] = None, shard_size: int = 1024, seed: int = 0,
                           amp: Optional[bool] = None, calibrate_batchnorm: int = 0) -> ExtractionReport:
    """Grid features of `images` ({id: file}) into the store at `store_root`; see the module docstring.

    shard=(i, n) takes every n-th id from the i-th of the sorted ids and writes under prefix 'part{i}of{n}', so n
    processes can fill one store at once. amp (default: on for CUDA) runs the tower under float16 autocast, as
    the reference ran OpenAI's fp16 weights; on CPU the tower runs in float32. The store holds `dtype`.
    calibrate_batchnorm=N (random towers only): BatchNorm statistics from the first N images in id order, before
    extraction (see `estimate_batchnorm_statistics`); the same images on every run and shard, so a resume matches."""
    from tqdm.auto import tqdm

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    amp = (device.type == "cuda") if amp is None else amp
    items = sorted((str(k), v) for k, v in images.items())
    prefix = DEFAULT_PREFIX
    if shard is not None:
        i, n = shard
        if not 0 <= i < n:
            raise ValueError(f"shard {i}/{n}: expected 0 <= i < n")
        items, prefix = items[i::n], f"part{i}of{n}"
    if calibrate_batchnorm and pretrained:
        raise ValueError("calibrate_batchnorm is for random towers: pretrained weights keep their statistics")
    calibration = [v for _, v in sorted((str(k), v) for k, v in images.items())][:calibrate_batchnorm]
    meta = image_feature_metadata(model_name, pretrained, model_config, image_size, resize, dtype, seed,
                                  calibrate_batchnorm)

    writer = FeatureWriter(store_root, meta, shard_size=shard_size, prefix=prefix, background=True)
    report = ExtractionReport(store=str(store_root), requested=len(items), extracted=0, skipped=0,
                              device=str(device))
    try:
        pending = [(k, v) for k, v in items if k not in writer]
        report.skipped = len(items) - len(pending)
        if pending:
            t0 = time.perf_counter()
            visual, mean, std = load_clip_tower(model_name, pretrained, device, model_config, seed)
            if calibration:
                transform = image_preprocess(image_size, resize, mean, std)
                estimate_batchnorm_statistics(visual, torch.stack([transform(load_image(p)) for p in calibration]).to(device))
            if device.type == "cuda":
                visual.to(memory_format=torch.channels_last)
            report.load_seconds = time.perf_counter() - t0
            _run(visual, pending, writer, report, meta, image_preprocess(image_size, resize, mean, std),
                 batch_size=batch_size, num_workers=num_workers, device=device, dtype=dtype, amp=amp,
                 progress=progress, tqdm=tqdm)
    finally:
        t0 = time.perf_counter()
        writer.close()  # writes what is buffered, also after an error or Ctrl-C: those entries are complete
        report.seconds += time.perf_counter() - t0
    report.in_store = len(writer)
    if report.failed:
        log.warning("%d image(s) could not be read; listed with reasons in %s/failures-%s.json",
                    len(report.failed), store_root, prefix)
    return report


def _run(visual, pending, writer, report, meta, transform, *, batch_size, num_workers, device, dtype, amp,
         progress, tqdm):
    loader = torch.utils.data.DataLoader(
        ImageFiles(pending, transform), batch_size=batch_size, shuffle=False, num_workers=num_workers,
        collate_fn=collate_images, pin_memory=device.type == "cuda",
        prefetch_factor=4 if num_workers > 0 else None)
    autocast = torch.autocast("cuda", dtype=torch.float16) if amp and device.type == "cuda" \
        else contextlib.nullcontext()
    expected = (meta["grid"][0] * meta["grid"][1], meta["feature_dim"])
    t0 = time.perf_counter()
    with tqdm(total=len(pending), unit="img", disable=not progress, desc="features") as bar, torch.no_grad():
        batches = None
        while True:
            t_wait = time.perf_counter()
            if batches is None:
                batches = iter(loader)  # starts the workers: part of the wait for the first batch
            batch = next(batches, None)
            report.wait_seconds += time.perf_counter() - t_wait
            if batch is None:
                break
            keys, pixels, failed = batch
            if not report.startup_seconds:
                report.startup_seconds = time.perf_counter() - t0
            for key, reason in failed:
                log.warning("image %r skipped: %s", key, reason)
                writer.add_failure(key, reason)
                report.failed[key] = reason
            if keys:
                pixels = pixels.to(device, non_blocking=True)
                if device.type == "cuda":
                    pixels = pixels.contiguous(memory_format=torch.channels_last)
                with autocast:
                    feats = grid_features(visual, pixels)
                if tuple(feats.shape[1:]) != expected:
                    raise RuntimeError(f"tower {meta['model_name']} gave a {tuple(feats.shape[1:])} grid, the store "
                                       f"metadata says {expected}")
                feats = feats.to(dtype).cpu()  # cast on the device: half the bytes to move for float16
                for key, f in zip(keys, feats):
                    writer.add(key, f)
                report.extracted += len(keys)
                report.entry_shape = list(expected)
            bar.update(len(keys) + len(failed))
    report.seconds = time.perf_counter() - t0
