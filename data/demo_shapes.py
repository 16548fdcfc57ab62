"""A generated visual-question dataset for demos and tests: coloured shapes on a plain background.

Every image holds 1-3 shapes of one kind and one colour, in the cells of a 2x2 grid. Questions ask the colour,
the shape and the count (chance: 1/4, 1/3, 1/3). (Yes/no questions that compare a word of the question with
the image were tried and did not train within the demo's budget with a 100k-parameter LLM.) Written in LLaVA's formats: training conversations (JSON list), evaluation
questions (JSONL: question_id, image, text) and ground truth as VQAv2-style annotations (ten identical human
answers), so `python -m eval score vqav2` scores the demo like a real benchmark.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30)}
SHAPES = ("circle", "square", "triangle")
BACKGROUND = (245, 245, 240)
SHORT = "Answer the question using a single word or phrase."


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    count: int


def draw_scene(scene: Scene, size: int, rng: random.Random) -> Image.Image:
    image = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    cell = size // 2
    slots = rng.sample(range(4), scene.count)  # distinct cells of a 2x2 grid: shapes never overlap
    for slot in slots:
        cx, cy = (slot % 2) * cell + cell // 2, (slot // 2) * cell + cell // 2
        r = int(cell * rng.uniform(0.32, 0.45))
        box = (cx - r, cy - r, cx + r, cy + r)
        fill = COLOURS[scene.colour]
        if scene.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif scene.shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return image


QUESTION_TYPES = ("color", "shape", "count")


def questions_for(scene: Scene) -> list[tuple[str, str, str]]:
    """(question, answer, question type)."""
    return [
        ("What color are the shapes?", scene.colour, "color"),
        ("What shape is shown in the image?", scene.shape, "shape"),
        ("How many shapes are there?", str(scene.count), "count"),  # digits, as VQAv2's count answers are
    ]


def write_demo_dataset(root: str | Path, n_train_images: int = 240, n_eval_images: int = 40, image_size: int = 48,
                       seed: int = 0) -> dict[str, Path]:
    """Writes images/, train.json (LLaVA conversations), eval_questions.jsonl and eval_annotations.json."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    scenes = [Scene(s, c, n) for s in SHAPES for c in COLOURS for n in (1, 2, 3)]
    train, questions, annotations = [], [], []
    qid = 0
    for split, count in (("train", n_train_images), ("eval", n_eval_images)):
        for i in range(count):
            scene = scenes[rng.randrange(len(scenes))]
            name = f"{split}_{i:05d}.png"
            draw_scene(scene, image_size, rng).save(root / "images" / name)
            qa = questions_for(scene)
            if split == "train":
                # two conversations per image: a multi-turn one, and one question with <image> after it
                rng.shuffle(qa)
                conv = []
                for k, (q, a, _) in enumerate(qa):
                    conv += [{"from": "human", "value": (f"<image>\n{q}" if k == 0 else q) + f"\n{SHORT}"},
                             {"from": "gpt", "value": a}]
                train.append({"id": f"{split}-{i}-a", "image": name, "conversations": conv})
                q, a, _ = qa[0]
                train.append({"id": f"{split}-{i}-b", "image": name,
                              "conversations": [{"from": "human", "value": f"{q}\n<image>\n{SHORT}"},
                                                {"from": "gpt", "value": a}]})
            else:
                for q, a, kind in qa:
                    questions.append({"question_id": qid, "image": name, "text": f"{q}\n{SHORT}", "category": kind})
                    annotations.append({"question_id": qid, "image_id": i, "question_type": kind,
                                        "answer_type": "other", "multiple_choice_answer": a,
                                        "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": k + 1}
                                                    for k in range(10)]})
                    qid += 1
    # a few text-only samples, as the real mixture has
    for i in range(max(1, n_train_images // 20)):
        c = rng.choice(list(COLOURS))
        train.append({"id": f"text-{i}", "conversations": [
            {"from": "human", "value": f"Name the colour word in this sentence: the {c} one.\n{SHORT}"},
            {"from": "gpt", "value": c}]})
    paths = {"train": root / "train.json", "questions": root / "eval_questions.jsonl",
             "annotations": root / "eval_annotations.json", "images": root / "images"}
    paths["train"].write_text(json.dumps(train, indent=1))
    paths["questions"].write_text("".join(json.dumps(q) + "\n" for q in questions))
    paths["annotations"].write_text(json.dumps({"annotations": annotations}))
    return paths
