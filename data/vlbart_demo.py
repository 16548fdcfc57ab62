"""A generated image-text dataset for the VL-BART demo and tests, written in the reference's file formats.

Images (224 x 224) hold 1-3 shapes of one kind and one colour in the cells of a 2 x 2 grid (data.demo_shapes).
The four tasks, each in the format VL-T5 / the DoRA fork reads, plus the ground truth `python -m eval` scores:
- vqa/karpathy_{train,test}.json: colour, shape and count questions; "label" {answer: score} and ten "answers".
- gqa/{train,testdev}.json: the same facts asked another way ("What is the colour of the squares?").
- nlvr/{train,test}.json: a statement about two images, true or false (more shapes on the left? the same colour?
  the same number of shapes?); "label" 1 / 0 and NLVR2 identifiers (split-set-pair-sentence).
- coco/dataset_coco.json: Karpathy's format, five captions per image ("two red circles.").
Chance: VQA 1/3.7, GQA the same, NLVR2 1/2.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from .demo_shapes import COLOURS, SHAPES, Scene, draw_scene

NUMBERS = {1: "one", 2: "two", 3: "three"}


def _plural(scene: Scene) -> str:
    return scene.shape if scene.count == 1 else scene.shape + "s"


def vqa_questions(scene: Scene) -> list[tuple[str, str]]:
    return [("What color are the shapes?", scene.colour), ("What shape is shown in the image?", scene.shape),
            ("How many shapes are there?", str(scene.count))]


def gqa_questions(scene: Scene) -> list[tuple[str, str]]:
    return [(f"What is the colour of the {_plural(scene)}?", scene.colour),
            ("Which kind of shape is in the picture?", scene.shape),
            ("What is the number of objects?", str(scene.count))]


def captions(scene: Scene) -> list[str]:
    n, c, s = NUMBERS[scene.count], scene.colour, _plural(scene)
    return [f"{n} {c} {s}.", f"a picture of {n} {c} {s}.", f"there are {n} {c} {s}.", f"{n} {s} in {c}.",
            f"an image with {n} {c} {s}."]


NLVR_KINDS = ("more", "colour", "number")


def nlvr_statement(left: Scene, right: Scene, kind: str) -> tuple[str, bool]:
    """Statements that compare the two images. (Whether both show the same kind of shape was tried too: it stayed at
    chance within the demo's budget, where these reach 0.8-1.0.)"""
    if kind == "more":
        return "The left image has more shapes than the right image.", left.count > right.count
    if kind == "colour":
        return "Both images show shapes of the same colour.", left.colour == right.colour
    return "The two images show the same number of shapes.", left.count == right.count


def write_vlbart_demo(root: str | Path, n_train_images: int = 300, n_test_images: int = 60, seed: int = 0,
                      image_size: int = 224) -> dict[str, Path]:
    root = Path(root)
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    scenes = [Scene(s, c, n) for s in SHAPES for c in COLOURS for n in (1, 2, 3)]
    drawn: dict[str, list[tuple[str, Scene]]] = {"train": [], "test": []}
    for split, count in (("train", n_train_images), ("test", n_test_images)):
        for i in range(count):
            scene = scenes[rng.randrange(len(scenes))]
            image_id = f"demo_{split}_{i:05d}"
            draw_scene(scene, image_size, rng).save(images / f"{image_id}.png")
            drawn[split].append((image_id, scene))

    files = {}
    for split, name in (("train", "karpathy_train"), ("test", "karpathy_test")):
        files[f"vqa_{split}"] = _write(root / "vqa" / f"{name}.json", _qa_records(drawn[split], vqa_questions, 0))
    for split, name in (("train", "train"), ("test", "testdev")):
        files[f"gqa_{split}"] = _write(root / "gqa" / f"{name}.json", _qa_records(drawn[split], gqa_questions, 1))
    for split, name in (("train", "train"), ("test", "test")):
        files[f"nlvr_{split}"] = _write(root / "nlvr" / f"{name}.json", _nlvr_records(drawn[split], split, rng))
    coco = {"images": [{"filename": f"{image_id}.png", "cocoid": k, "split": split,
                        "sentences": [{"raw": c} for c in captions(scene)]}
                       for split in ("train", "test") for k, (image_id, scene) in enumerate(drawn[split],
                                                                                           start=100000 * (split == "test"))],
            "dataset": "coco"}
    files["coco"] = _write(root / "coco" / "dataset_coco.json", coco)
    files["images"] = images
    return files


def _write(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def _qa_records(drawn, questions, task_id: int) -> list[dict]:
    """VL-T5's entries: VQA's carry the ten human answers ("answers") beside the scored "label"; GQA's only the
    label (one answer)."""
    records = []
    for i, (image_id, scene) in enumerate(drawn):
        for k, (q, a) in enumerate(questions(scene)):
            record = {"img_id": image_id, "sent": q, "question_id": (task_id * 10 + k) * 1000000 + i, "label": {a: 1.0}}
            if task_id == 0:
                record["answers"] = [{"answer": a, "answer_confidence": "yes", "answer_id": j + 1} for j in range(10)]
                record["answer_type"] = "number" if a.isdigit() else "other"
            records.append(record)
    return records


def _nlvr_records(drawn, split: str, rng: random.Random) -> list[dict]:
    """Per image pair, one statement of each kind; the right image is drawn so that half the statements are
    true (chance 1/2, not the majority answer of unbalanced pairs)."""
    records = []
    for pair, (left_id, left) in enumerate(drawn):
        for k, kind in enumerate(NLVR_KINDS):
            want = rng.random() < 0.5
            fits = [(i, s) for i, s in drawn if i != left_id and nlvr_statement(left, s, kind)[1] == want]
            right_id, right = rng.choice(fits or [(i, s) for i, s in drawn if i != left_id])
            statement, truth = nlvr_statement(left, right, kind)
            records.append({"identifier": f"{split}-{pair}-{k}-0", "img0": left_id, "img1": right_id,
                            "sent": statement, "label": int(truth)})
    return records
