"""The VL-BART image demo's two ends; `bash launch/vlbart_dora.sh` runs prepare, training, then finish.

    python -m recipes.vlbart.demo prepare [--root runs/vlbart_demo]  # data, features, tokenizer, tiny BART
    python -m recipes.vlbart.demo finish  [--root runs/vlbart_demo]  # score before and after, table, JSON

prepare writes the generated data in the reference's file formats (data/vlbart_demo.py), extracts grid features
with a randomly initialised open_clip ResNet tower (the RN101 code path, smaller), and saves a tiny BART with a
locally trained byte-level BPE tokenizer (briefly trained on the text alone). finish scores the model before
training (the same model, no adapter) and after it, with `python -m recipes.vlbart.evaluate`, prints a table and
prints the results as JSON on its last line.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from data.vlbart_demo import captions, gqa_questions, vqa_questions, write_vlbart_demo

TASK_NAMES = {"vqa": "VQA accuracy", "gqa": "GQA accuracy", "nlvr": "NLVR2 accuracy", "caption": "COCO CIDEr"}
CHANCE = {"vqa": 1 / 3 * (1 / 4 + 1 / 3 + 1 / 3) * 100, "gqa": 1 / 3 * (1 / 4 + 1 / 3 + 1 / 3) * 100, "nlvr": 50.0}


def demo_texts() -> list[str]:
    """Every sentence the demo's tasks use (questions, answers, statements, captions, prompts): the tokenizer's
    training text and the tiny BART's denoising pretraining text, which teaches it the language, not the tasks."""
    from data.demo_shapes import COLOURS, SHAPES, Scene
    from data.vlbart_demo import NLVR_KINDS, nlvr_statement

    scenes = [Scene(s, c, n) for s in SHAPES for c in COLOURS for n in (1, 2, 3)]
    texts = {"true", "false", "vqa: ", "gqa: ", "nlvr: ", "caption: "}
    for scene in scenes:
        texts.update(q for q, _ in vqa_questions(scene) + gqa_questions(scene))
        texts.update(a for _, a in vqa_questions(scene) + gqa_questions(scene))
        texts.update(captions(scene))
        for kind in NLVR_KINDS:
            texts.add(nlvr_statement(scene, scene, kind)[0])
    return sorted(texts)


def prepare(root: Path, seed: int = 0) -> None:
    from data.image_features import TINY_RESNET_CONFIG, extract_image_features
    from recipes.vlbart.demo_models import make_tiny_bart

    data = root / "data"
    if not (data / "coco" / "dataset_coco.json").is_file():
        write_vlbart_demo(data, seed=seed)
        print(f"wrote the demo dataset to {data}", flush=True)
    images = {p.stem: p for p in sorted((data / "images").glob("*.png"))}
    report = extract_image_features(images, root / "features", model_name="demo-tiny-rn", pretrained=None,
                                    model_config=TINY_RESNET_CONFIG, batch_size=32, num_workers=1, seed=seed,
                                    calibrate_batchnorm=128)
    print(f"features: {report.extracted} extracted, {report.skipped} already in {root / 'features'}", flush=True)
    if not (root / "bart" / "model.safetensors").is_file():
        make_tiny_bart(root / "bart", demo_texts(), steps=300, seed=seed)
        print(f"wrote the tiny BART and its tokenizer to {root / 'bart'}", flush=True)
    run = root / "run"
    if (run / "train_summary.json").is_file():  # a finished run: start over (an unfinished one resumes)
        shutil.rmtree(run)


def _evaluate(run: Path, *extra: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", "recipes.vlbart.evaluate", str(run), *extra], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"recipes.vlbart.evaluate {run} {' '.join(extra)} failed:\n{proc.stdout}\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def finish(root: Path) -> dict:
    start = time.perf_counter()
    run = root / "run"
    before = _evaluate(run, "--no-adapter")
    after = _evaluate(run)
    summary = json.loads((run / "train_summary.json").read_text())
    print()
    print(f"{'held-out':<16} {'before':>8} {'after':>8} {'chance':>8}")
    for task, name in TASK_NAMES.items():
        chance = f"{CHANCE[task]:8.1f}" if task in CHANCE else f"{'':>8}"
        print(f"{name:<16} {before[task]:8.1f} {after[task]:8.1f} {chance}")
    print(f"training: {summary['steps']} steps, loss {summary['losses'][0]:.3f} -> {summary['losses'][-1]:.3f}; "
          f"{summary['trainable_parameters']:,} of {summary['total_parameters']:,} parameters trained")
    result = {"before": before, "after": after, "chance": {k: round(v, 1) for k, v in CHANCE.items()},
              "steps": summary["steps"], "final_loss": round(summary["losses"][-1], 4), "adapter": str(run / "adapter"),
              "evaluation_seconds": round(time.perf_counter() - start, 1)}
    print(json.dumps(result), flush=True)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=["prepare", "finish"])
    parser.add_argument("--root", type=Path, default=Path("runs/vlbart_demo"))
    args = parser.parse_args(argv)
    if args.step == "prepare":
        prepare(args.root)
    else:
        finish(args.root)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
