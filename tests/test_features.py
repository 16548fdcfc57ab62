"""Feature store (data/features.py) and CLIP grid extraction (data/image_features.py), with a tiny random
ModifiedResNet tower that takes the same code path as RN101."""
from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from data.features import FeatureStore, FeatureWriter, StoreError, find_images, main
from data.image_features import (CLIP_MEAN, CLIP_STD, TINY_RESNET_CONFIG, extract_image_features, grid_features,
                                 image_feature_metadata, image_preprocess, load_clip_tower, load_image, pool_grid,
                                 register_model_config)
import subprocesses

REPO = Path(__file__).resolve().parents[1]
TINY = "tiny_rn_test"  # registered with open_clip under this name
TINY_KW = dict(model_name=TINY, pretrained=None, model_config=TINY_RESNET_CONFIG, progress=False)


def write_images(folder: Path, n: int, size=(96, 64), fmt="JPEG", seed=0) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(n):
        # smooth gradient + noise: a photo-like picture, different per image
        y, x = np.mgrid[0:size[1], 0:size[0]]
        base = np.stack([x * (i + 1) % 256, y * 3 % 256, (x + y + 40 * i) % 256], -1)
        arr = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
        path = folder / f"img_{i:03d}.{'jpg' if fmt == 'JPEG' else fmt.lower()}"
        Image.fromarray(arr).save(path, fmt)
        out[path.stem] = path
    return out


def shard_ids(root: Path) -> list[str]:
    """Every id over every complete shard file's header (what is really on disk)."""
    ids = []
    for p in sorted(root.glob("*.safetensors")):
        if not p.name.startswith("."):
            with safe_open(str(p), "pt") as f:
                ids += list(f.keys())
    return ids


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # the tiny tower gains nothing from a second thread, and on a busy 2-core machine OpenMP threads waiting for
    # each other make each forward 10-100x slower
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tower():
    visual, mean, std = load_clip_tower(TINY, None, "cpu", TINY_RESNET_CONFIG)
    return visual, mean, std


# ---------------------------------------------------------------------------------------------------------- store

def test_store_round_trip_varying_rows(tmp_path):
    root = tmp_path / "store"
    g = torch.Generator().manual_seed(0)
    entries = {f"video_{i}": torch.randn(n, 16, generator=g).half() for i, n in enumerate([1, 49, 7, 64, 3])}
    meta = {"model_name": "x", "feature_dim": 16, "dtype": "float16", "grid": (7, 7)}
    with FeatureWriter(root, meta, shard_size=2) as w:
        for k, v in list(entries.items())[:3]:
            w.add(k, v)
    # reopen: resumes numbering, knows what is done, refuses a repeat
    with FeatureWriter(root, meta, shard_size=2) as w:
        assert "video_0" in w and "video_4" not in w and len(w) == 3
        with pytest.raises(ValueError, match="video_1.*already"):
            w.add("video_1", entries["video_1"])
        with pytest.raises(ValueError, match="feature dim 8"):
            w.add("bad", torch.zeros(2, 8, dtype=torch.float16))
        with pytest.raises(ValueError, match="dtype"):
            w.add("bad", torch.zeros(2, 16))
        for k, v in list(entries.items())[3:]:
            w.add(k, v)
    assert sorted(p.name for p in root.glob("*.safetensors")) == [f"part-00000{i}.safetensors" for i in range(3)]

    store = FeatureStore(root)
    assert len(store) == 5 and set(store.ids()) == set(entries) and set(store.keys()) == set(entries)
    assert "video_3" in store and "nope" not in store
    assert store.feature_dim == 16 and store.dtype == torch.float16
    assert store.metadata["grid"] == [7, 7] and store.metadata["model_name"] == "x"
    for k, v in entries.items():
        got = store.get(k)
        assert got.dtype == torch.float16 and store.shape(k) == tuple(v.shape)
        assert torch.equal(got, v), k
    # copy=True gives the caller its own memory; copy=False is a view of the mapping
    a = store.get("video_1")
    a.zero_()
    assert torch.equal(store.get("video_1"), entries["video_1"])
    assert store.get("video_1", copy=False).data_ptr() == store.get("video_1", copy=False).data_ptr()
    with pytest.raises(KeyError, match="nope.*not in feature store"):
        store.get("nope")


def test_entry_notes_live_in_their_shard(tmp_path):
    """add(..., note=) keeps a note with its entry, in the same shard file: written together, resumed together,
    and a note of an entry that is not in the store is never reported."""
    root = tmp_path / "store"
    meta = {"feature_dim": 4, "dtype": "float32"}
    with FeatureWriter(root, meta, shard_size=2) as w:
        w.add("a", torch.zeros(1, 4), note={"decoder": "pyav", "filled_frames": 2})
        w.add("b", torch.zeros(1, 4))
        w.add("c", torch.zeros(1, 4), note={"decoder": "pyav", "filled_frames": 0})
    with FeatureWriter(root, meta, shard_size=2) as w:  # resumed, a later shard
        w.add("d", torch.zeros(1, 4), note={"why": ("tuple", "as JSON")})
    store = FeatureStore(root)
    assert store.notes() == {"a": {"decoder": "pyav", "filled_frames": 2}, "c": {"decoder": "pyav", "filled_frames": 0},
                             "d": {"why": ["tuple", "as JSON"]}}
    assert store.summary()["notes"] == 3
    with safe_open(str(root / "part-000000.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()["notes"]) == {"a": {"decoder": "pyav", "filled_frames": 2}}
    with safe_open(str(root / "part-000001.safetensors"), framework="pt") as f:
        assert "c" in json.loads(f.metadata()["notes"])
    # a killed writer's buffered entries and their notes are lost together
    w = FeatureWriter(root, meta, shard_size=10)
    w.add("e", torch.zeros(1, 4), note={"lost": True})
    del w
    assert "e" not in FeatureStore(root).notes()


def test_store_without_dtype_metadata_and_pickle_and_workers(tmp_path):
    root = tmp_path / "s"
    data = {f"k{i}": torch.full((i + 1, 4), float(i)) for i in range(6)}
    with FeatureWriter(root, shard_size=4) as w:  # no metadata: dim and dtype come from the entries
        for k, v in data.items():
            w.add(k, v)
    store = FeatureStore(root)
    assert store.feature_dim == 4 and store.dtype == torch.float32
    store.get("k0")  # handles opened in this process before the workers fork
    clone = pickle.loads(pickle.dumps(store))  # what spawned workers receive
    assert torch.equal(clone.get("k5"), data["k5"])

    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return len(data)

        def __getitem__(self, i):
            return os.getpid(), store.get(f"k{i}").sum()

    loader = torch.utils.data.DataLoader(DS(), batch_size=None, num_workers=2)
    got = list(loader)
    assert {pid for pid, _ in got} - {os.getpid()}, "expected worker processes"
    assert [float(s) for _, s in got] == [float(v.sum()) for v in data.values()]


def test_atomic_shards_leftovers_ignored_and_index_repaired(tmp_path, monkeypatch):
    root = tmp_path / "s"
    with FeatureWriter(root, {"feature_dim": 3}, shard_size=2) as w:
        for i in range(4):
            w.add(f"a{i}", torch.full((2, 3), float(i)))
    # a killed writer's temporaries: a half-written shard and a half-written index
    (root / ".part-000002.safetensors.tmp-999").write_bytes(b"\x00garbage")
    (root / ".index-part.json.tmp-999-1").write_text("{")
    store = FeatureStore(root)
    assert sorted(store.ids()) == ["a0", "a1", "a2", "a3"]

    # crash between the shard's rename and the index update: the shard is complete but not indexed
    w = FeatureWriter(root, {"feature_dim": 3}, shard_size=2)
    assert not (root / ".part-000002.safetensors.tmp-999").exists(), "the writer clears its prefix's temporaries"
    assert not (root / ".index-part.json.tmp-999-1").exists(), "... its index's too"
    monkeypatch.setattr(FeatureWriter, "_save_index", lambda self: (_ for _ in ()).throw(OSError("killed")))
    w.add("b0", torch.ones(1, 3))
    with pytest.raises(OSError, match="killed"):
        w.add("b1", torch.ones(1, 3))
    w._unlock()  # the dead process's lock goes with it
    monkeypatch.undo()
    assert (root / "part-000002.safetensors").is_file()
    assert "part-000002.safetensors" not in json.loads((root / "index-part.json").read_text())["shards"]
    store = FeatureStore(root)  # readers find it from its header
    assert {"b0", "b1"} <= set(store.ids()) and torch.equal(store.get("b1"), torch.ones(1, 3))
    with FeatureWriter(root, {"feature_dim": 3}) as w:  # the next writer repairs the index and resumes after it
        assert "b1" in w
        w.add("c0", torch.zeros(1, 3))
    index = json.loads((root / "index-part.json").read_text())["shards"]
    assert sorted(i for ids in index.values() for i in ids) == sorted(shard_ids(root))
    assert sorted(shard_ids(root)) == sorted(FeatureStore(root).ids()) == ["a0", "a1", "a2", "a3", "b0", "b1", "c0"]


def test_concurrent_prefixes_and_prefix_lock(tmp_path):
    root = tmp_path / "s"
    a = FeatureWriter(root, {"m": 1}, shard_size=1, prefix="part0of2")
    b = FeatureWriter(root, {"m": 1}, shard_size=1, prefix="part1of2")
    with pytest.raises(StoreError, match="part0of2.*already open"):
        FeatureWriter(root, {"m": 1}, prefix="part0of2")
    for i in range(3):
        a.add(f"a{i}", torch.zeros(1, 2))
        b.add(f"b{i}", torch.ones(1, 2))
    a.close()
    b.close()
    store = FeatureStore(root)
    assert sorted(store.ids()) == ["a0", "a1", "a2", "b0", "b1", "b2"]
    assert torch.equal(store.get("b2"), torch.ones(1, 2))
    # another process holding a prefix: refused with the prefix named
    code = f"""
import sys, time, torch; sys.path.insert(0, {str(REPO)!r})
from data.features import FeatureWriter
w = FeatureWriter({str(root)!r}, {{"m": 1}}, prefix="part0of2"); print("locked", flush=True); time.sleep(30)
"""
    proc = subprocesses.start([sys.executable, "-c", code], stderr=subprocess.DEVNULL)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(StoreError, match="another process is writing prefix 'part0of2'"):
            FeatureWriter(root, {"m": 1}, prefix="part0of2")
    finally:
        proc.kill()
        subprocesses.finish(proc, what="a process holding a writer prefix", timeout=60)
    FeatureWriter(root, {"m": 1}, prefix="part0of2").close()  # free again once that process died


def test_metadata_mismatch_refused(tmp_path):
    root = tmp_path / "s"
    FeatureWriter(root, {"model_name": "RN101", "resize": "squash"}).close()
    with pytest.raises(ValueError, match=r"model_name: store has \"RN101\", this writer has \"RN50\""):
        FeatureWriter(root, {"model_name": "RN50", "resize": "squash"})
    w = FeatureWriter(root, None)  # None adopts the store's metadata
    assert w.metadata == {"model_name": "RN101", "resize": "squash"}
    w.close()
    # through extraction: the same tower with another resize mode must not land in the same store
    imgs = write_images(tmp_path / "img", 2)
    extract_image_features(imgs, tmp_path / "f", num_workers=0, batch_size=2, **TINY_KW)
    with pytest.raises(ValueError, match=r"resize: store has \"squash\", this writer has \"crop\""):
        extract_image_features(imgs, tmp_path / "f", num_workers=0, resize="crop", **TINY_KW)
    with pytest.raises(ValueError, match="init_seed"):
        extract_image_features(imgs, tmp_path / "f", num_workers=0, seed=1, **TINY_KW)


# ---------------------------------------------------------------------------------------------------------- tower

def test_tower_loading_and_configs():
    a, mean, std = load_clip_tower(TINY, None, "cpu", TINY_RESNET_CONFIG, seed=3)
    state = torch.random.get_rng_state()
    b, _, _ = load_clip_tower(TINY, None, "cpu", TINY_RESNET_CONFIG, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state), "loading must not move the global RNG"
    c, _, _ = load_clip_tower(TINY, None, "cpu", TINY_RESNET_CONFIG, seed=4)
    assert torch.equal(a.conv1.weight, b.conv1.weight) and not torch.equal(a.conv1.weight, c.conv1.weight)
    assert mean == CLIP_MEAN and std == CLIP_STD and not a.training
    assert all(not p.requires_grad for p in a.parameters())
    with pytest.raises(ValueError, match="already has a model 'RN101'"):
        register_model_config("RN101", TINY_RESNET_CONFIG)
    with pytest.raises(ValueError, match="not a CLIP ModifiedResNet"):
        image_feature_metadata("ViT-B-32", "openai", None, 224, "squash", torch.float16)
    meta = image_feature_metadata("RN101", "openai", None, 224, "squash", torch.float16)
    assert meta["feature_dim"] == 2048 and meta["grid"] == [7, 7] and meta["layer"] == "visual.layer4"


def test_grid_is_layer4_row_major(tmp_path, tower):
    visual, mean, std = tower
    imgs = write_images(tmp_path / "img", 3, size=(120, 90))
    report = extract_image_features(imgs, tmp_path / "f", num_workers=1, batch_size=2, **TINY_KW)
    assert report.extracted == 3 and report.entry_shape == [49, 256]
    store = FeatureStore(tmp_path / "f")
    assert store.metadata["grid"] == [7, 7] and store.feature_dim == 256 and store.dtype == torch.float16

    captured = []
    hook = visual.layer4.register_forward_hook(lambda m, i, o: captured.append(o))
    pixels = torch.stack([image_preprocess(224, "squash", mean, std)(load_image(p)) for p in imgs.values()])
    with torch.no_grad():
        visual(pixels)  # the full forward, attention pooling included; the hook keeps layer4's output
    hook.remove()
    maps = captured[0]
    assert maps.shape == (3, 256, 7, 7)
    with torch.no_grad():
        direct = grid_features(visual, pixels)  # the extraction's own call, in float32
    assert direct.shape == (3, 49, 256)
    for h in range(7):
        for w in range(7):
            assert torch.equal(direct[:, h * 7 + w], maps[:, :, h, w])
    for b, key in enumerate(imgs):
        feats = store.get(key)
        assert feats.shape == (49, 256)
        for h in range(7):
            for w in range(7):
                torch.testing.assert_close(feats[h * 7 + w].float(), maps[b, :, h, w].half().float(),
                                           rtol=2e-3, atol=2e-3)
    assert not torch.allclose(store.get("img_000").float(), store.get("img_001").float())


def test_squash_and_crop_preprocessing(tmp_path):
    arr = np.zeros((80, 160, 3), np.uint8)
    arr[:, :40] = (255, 0, 0)  # the left quarter is red: squash keeps it, crop cuts it away
    arr[:, 40:] = (0, 0, 255)
    Image.fromarray(arr).save(tmp_path / "wide.png")
    img = load_image(tmp_path / "wide.png")
    mean, std = torch.tensor(CLIP_MEAN)[:, None, None], torch.tensor(CLIP_STD)[:, None, None]

    def manual(pil):
        return (torch.from_numpy(np.asarray(pil, np.float32) / 255).permute(2, 0, 1) - mean) / std

    squash = image_preprocess(224, "squash")(img)
    torch.testing.assert_close(squash, manual(img.resize((224, 224), Image.BICUBIC)))
    crop = image_preprocess(224, "crop")(img)
    torch.testing.assert_close(crop, manual(img.resize((448, 224), Image.BICUBIC).crop((112, 0, 336, 224))))
    red = (1 - CLIP_MEAN[0]) / CLIP_STD[0]
    assert squash[0, 112, 10] > red - 0.1 and crop[0, 112, 10] < 0, "squash keeps the left edge, crop drops it"
    # a palette image is converted to RGB before the bicubic resize
    Image.fromarray(arr).convert("P").save(tmp_path / "palette.png")
    assert load_image(tmp_path / "palette.png").mode == "RGB"
    with pytest.raises(ValueError, match="resize"):
        image_preprocess(224, "pad")


def test_bad_and_missing_images_reported_by_id(tmp_path):
    imgs = write_images(tmp_path / "img", 5)
    good = imgs["img_000"].read_bytes()
    (tmp_path / "img" / "corrupt.jpg").write_bytes(b"this is not an image")
    (tmp_path / "img" / "truncated.jpg").write_bytes(good[: len(good) // 3])
    images = dict(imgs, corrupt=tmp_path / "img" / "corrupt.jpg", truncated=tmp_path / "img" / "truncated.jpg",
                  gone=tmp_path / "img" / "gone.jpg", nofile=None)
    report = extract_image_features(images, tmp_path / "f", num_workers=2, batch_size=3, **TINY_KW)
    assert report.extracted == 5 and set(report.failed) == {"corrupt", "truncated", "gone", "nofile"}
    assert "corrupt.jpg" in report.failed["corrupt"] and "UnidentifiedImageError" in report.failed["corrupt"]
    assert "truncated" in report.failed["truncated"]
    assert "gone.jpg" in report.failed["gone"] and "FileNotFoundError" in report.failed["gone"]
    store = FeatureStore(tmp_path / "f")
    assert sorted(store.ids()) == sorted(imgs)
    assert store.failures() == report.failed  # kept in the store with the reasons
    summary = report.summary()
    assert summary["failed"] == 4 and summary["failed_ids"] == ["corrupt", "gone", "nofile", "truncated"]
    # fixed file on the next run: extracted, and no longer listed as a failure
    (tmp_path / "img" / "corrupt.jpg").write_bytes(good)
    report = extract_image_features(images, tmp_path / "f", num_workers=0, batch_size=3, **TINY_KW)
    assert report.skipped == 5 and report.extracted == 1 and "corrupt" not in report.failed
    store = FeatureStore(tmp_path / "f")
    assert "corrupt" in store and "corrupt" not in store.failures() and "gone" in store.failures()


CHILD = """
import sys, time
sys.path.insert(0, {repo!r})
import torch
torch.set_num_threads(1)
import data.image_features as fx
slow = fx.grid_features
def grid_features(visual, pixels):  # slow enough for the parent to kill it mid-way
    time.sleep(0.25)
    return slow(visual, pixels)
fx.grid_features = grid_features
from data.features import find_images
fx.extract_image_features(find_images({imgs!r}), {out!r}, model_name="tiny_rn_test", pretrained=None,
                          model_config=fx.TINY_RESNET_CONFIG, batch_size=2, num_workers=1, shard_size=4,
                          progress=False)
print("finished", flush=True)
"""


def test_resume_after_kill_9(tmp_path):
    imgs = write_images(tmp_path / "img", 24, size=(64, 48))
    out = tmp_path / "killed"
    proc = subprocesses.start([sys.executable, "-c", CHILD.format(repo=str(REPO), imgs=str(tmp_path / "img"),
                                                                     out=str(out))], stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not list(out.glob("part-*.safetensors")):
            assert proc.poll() is None, "the child ended before writing a shard"
            assert time.time() < deadline, "no shard appeared"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)  # the crash
    finally:
        done = subprocesses.finish(proc, what="image feature extraction killed with SIGKILL", timeout=60)
    assert "finished" not in done.stdout
    partial = FeatureStore(out)
    assert 0 < len(partial) < 24 and len(partial) % 4 == 0, "only whole shards survive"

    report = extract_image_features(find_images(tmp_path / "img"), out, batch_size=2, num_workers=1,
                                    shard_size=4, **TINY_KW)
    assert report.skipped == len(partial) and report.extracted == 24 - len(partial)
    extract_image_features(find_images(tmp_path / "img"), tmp_path / "clean", batch_size=2, num_workers=0,
                           shard_size=4, **TINY_KW)
    on_disk = shard_ids(out)
    assert sorted(on_disk) == sorted(imgs), "every id exactly once"
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]
    resumed, clean = FeatureStore(out), FeatureStore(tmp_path / "clean")
    for key in imgs:  # same tower (seeded), same pixels: equal up to batch-composition float noise
        torch.testing.assert_close(resumed.get(key), clean.get(key), rtol=1e-3, atol=1e-3)


def test_pool_grid_equals_adaptive_max_pool():
    g = torch.Generator().manual_seed(0)
    maps = torch.randn(2, 5, 7, 7, generator=g)  # (B, D, h, w)
    tokens = torch.empty(2, 49, 5)
    for h in range(7):
        for w in range(7):
            tokens[:, h * 7 + w] = maps[:, :, h, w]
    pooled_map = torch.nn.AdaptiveMaxPool2d((6, 6))(maps)
    expected = torch.empty(2, 36, 5)
    for h in range(6):
        for w in range(6):
            expected[:, h * 6 + w] = pooled_map[:, :, h, w]
    assert torch.equal(pool_grid(tokens), expected)
    assert torch.equal(pool_grid(tokens[1]), expected[1])  # unbatched (49, D)
    assert torch.equal(pool_grid(tokens.half()).float(), expected.half().float())
    video = torch.randn(3, 64, 5, generator=g)
    assert torch.equal(pool_grid(video, (8, 8)), video)  # the video recipe's 8x8 "pooling" is the identity
    with pytest.raises(ValueError, match="not a square"):
        pool_grid(torch.zeros(48, 5))


def test_cli_shards_ids_and_info(tmp_path, capsys):
    imgs = write_images(tmp_path / "img", 6)
    Image.new("RGB", (40, 30)).save(tmp_path / "img" / "extra.png")
    (tmp_path / "cfg.json").write_text(json.dumps(TINY_RESNET_CONFIG))
    (tmp_path / "ids.txt").write_text("\n".join(list(imgs) + ["not_there"]) + "\n")
    base = ["images", "--images-dir", str(tmp_path / "img"), "--out", str(tmp_path / "f"), "--model", TINY,
            "--model-config", str(tmp_path / "cfg.json"), "--pretrained", "none", "--num-workers", "0",
            "--batch-size", "4", "--ids", str(tmp_path / "ids.txt"), "--glob", "*.jpg", "--no-progress"]
    summaries = []
    for part in ("0/2", "1/2"):
        assert main(base + ["--shard", part]) == 0
        lines = capsys.readouterr().out.strip().splitlines()
        summaries.append(json.loads(lines[-1]))
    assert sum(s["extracted"] for s in summaries) == 6 and sum(s["requested"] for s in summaries) == 7
    assert sum(s["failed"] for s in summaries) == 1
    store = FeatureStore(tmp_path / "f")
    assert sorted(store.ids()) == sorted(imgs)  # extra.png is not in --ids nor matched by --glob
    assert {p.name for p in (tmp_path / "f").glob("index-*.json")} == {"index-part0of2.json", "index-part1of2.json"}
    assert store.failures() == {"not_there": "no image file for this id"}
    assert main(["info", str(tmp_path / "f")]) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert info["ids"] == 6 and info["feature_dim"] == 256 and info["metadata"]["model_name"] == TINY
    with pytest.raises(SystemExit):
        main(base + ["--shard", "2/2"])
    assert set(find_images(tmp_path / "img")) == set(imgs) | {"extra"}


def test_random_tower_batchnorm_calibration_makes_images_distinguishable(tmp_path):
    """A random tower's own BatchNorm statistics leave every image's grid nearly the same after a LayerNorm;
    statistics estimated on the images (demos and tests only) do not. Recorded in the store's metadata."""
    from data.demo_shapes import COLOURS, SHAPES, Scene, draw_scene
    import random
    rng = random.Random(0)
    images = {}
    for i in range(12):
        scene = Scene(SHAPES[i % 3], list(COLOURS)[i % 4], 1 + i % 3)
        draw_scene(scene, 224, rng).save(tmp_path / f"im{i}.png")
        images[f"im{i}"] = tmp_path / f"im{i}.png"

    def similarity(store_dir, **kw):
        extract_image_features(images, store_dir, model_name="tiny-rn", pretrained=None,
                               model_config=TINY_RESNET_CONFIG, num_workers=0, progress=False, **kw)
        store = FeatureStore(store_dir)
        grids = torch.stack([store.get(k).float() for k in sorted(images)])
        t = torch.nn.functional.layer_norm(grids, grids.shape[-1:])
        return torch.nn.functional.cosine_similarity(t[:1].expand_as(t[1:]), t[1:], dim=-1).mean().item(), store

    plain, _ = similarity(tmp_path / "plain")
    calibrated, store = similarity(tmp_path / "calibrated", calibrate_batchnorm=8)
    assert plain > 0.95 and calibrated < 0.8, (plain, calibrated)
    assert store.metadata["calibrate_batchnorm"] == 8
    with pytest.raises(ValueError, match="calibrate_batchnorm"):  # a resume must calibrate the same way
        extract_image_features(images, tmp_path / "calibrated", model_name="tiny-rn", pretrained=None,
                               model_config=TINY_RESNET_CONFIG, num_workers=0, progress=False)
    with pytest.raises(ValueError, match="random towers"):
        extract_image_features(images, tmp_path / "p", pretrained="openai", calibrate_batchnorm=8)
