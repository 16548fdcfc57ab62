"""A generated video-text dataset for the video demo and tests, in the VALUE release formats (facts 5.1-5.2).

Each video (mp4/H.264 written with PyAV, 96x96, 4 s at 8 fps by default) shows one coloured shape on a plain grey
background (the same grey in every video by default: see `random_scene`) that
- MOVES left, right, up or down, or stays in place;
- CHANGES COLOUR once, from colour A to colour B;
- and is visible the whole time, APPEARS partway, DISAPPEARS partway, appears and later disappears, or
  disappears and later comes back (the colour then changes while it is hidden).
No single frame answers a question: the direction needs two positions, "what colour does it turn" / "what colour
is it before it changes" need the order of the two colours (both are always among the choices), and visibility
needs frames before and after the event. Every property is drawn uniformly, so chance is 1/5 for TVQA and 1/4
for How2QA. The choices are either shuffled, as TVQA's are, or every possible answer in a fixed order (the video
demo's: see `write_video_demo`). Subtitles are neutral lines that name no property.

Layout (as VALUE's DataRelease; `root` plays `datasets/video/`):
    videos/{tv,how2,yc2}/{vid_name}.mp4
    ann/tv_subtitles.jsonl, ann/how2_subtitles.jsonl, ann/yc2_subtitles.jsonl    {vid_name, sub: [{text, start, end}]}
    ann/tvqa/tvqa_{train,val}.jsonl                  {vid_name, ts "st-ed", q, a0..a4, answer_idx, qid, show_name}
    ann/how2qa/how2qa_{train,val}_release.jsonl      the same with a0..a3, no show_name
    ann/tvc/tvc_{train,val}_release.jsonl            {vid_name, clip_id, ts [st, ed], duration, descs [{desc, desc_id,
                                                       type, from_retrieval}]}: 2 descriptions per train clip, 4 per val
    ann/yc2c/yc2c_{train,val}_release.jsonl          {vid_name, clip_id, duration, descs [{desc, desc_id}]}: 1 each
    scenes.json                                      what was drawn in each video (for tests and inspection)
TV videos serve TVQA and TVC (as in VALUE), how2 videos How2QA, yc2 videos YC2C.
"""
from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30),
           "purple": (150, 60, 190), "orange": (240, 140, 30)}
SHAPES = ("square", "circle", "triangle")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1), "still": (0, 0)}
VISIBILITY = ("always", "appears", "disappears", "appears_then_disappears", "disappears_then_reappears")
SHOWS = ("Shape Street", "Colour Hall")

DIRECTION_ANSWERS = {"left": "It moves to the left.", "right": "It moves to the right.", "up": "It moves up.",
                     "down": "It moves down.", "still": "It stays in place."}
VISIBILITY_ANSWERS = {"always": "It is visible the whole time.", "appears": "It appears partway through.",
                      "disappears": "It disappears partway through.",
                      "appears_then_disappears": "It appears and later disappears.",
                      "disappears_then_reappears": "It disappears and later comes back."}
_MOTION = {"left": "moves left", "right": "moves right", "up": "moves up", "down": "moves down",
           "still": "stays in place"}
_MOTION_ING = {"left": "moving left", "right": "moving right", "up": "moving up", "down": "moving down",
               "still": "staying in place"}
_VIS_CLAUSE = {"always": "", "appears": " after it appears", "disappears": " before it disappears",
               "appears_then_disappears": " between appearing and disappearing",
               "disappears_then_reappears": " while it is hidden"}
_SUBTITLE_LINES = ("Let us watch this one.", "Keep your eyes on the screen.", "Here we go again.",
                   "What happens next?", "Take a good look.", "That was quick.", "Now look at this.",
                   "We will talk about it later.", "Pay attention, please.", "Another short clip.")
_SPEAKERS = ("Host", "Guest", "Narrator")


@dataclass
class VideoScene:
    vid_name: str
    shape: str
    colour_before: str
    colour_after: str
    direction: str
    visibility: str
    change_s: float  # time of the colour change
    visible: list  # [[start, end], ...] seconds the shape is drawn
    start_xy: list  # centre at t = 0 (pixels)
    travel: float  # pixels moved over the whole video
    radius: float
    background: list  # RGB
    duration: float
    fps: int
    size: int

    @property
    def n_frames(self) -> int:
        return int(round(self.duration * self.fps))

    def state(self, t: float) -> tuple[bool, str, tuple[float, float]]:
        """(visible, colour name, centre (x, y)) at time t."""
        dx, dy = DIRECTIONS[self.direction]
        frac = t / self.duration
        centre = (self.start_xy[0] + dx * self.travel * frac, self.start_xy[1] + dy * self.travel * frac)
        visible = any(a <= t < b for a, b in self.visible)
        return visible, (self.colour_before if t < self.change_s else self.colour_after), centre

    def render(self, frame: int, grid: Optional[tuple[np.ndarray, np.ndarray]] = None) -> np.ndarray:
        """(size, size, 3) uint8 RGB of frame `frame` (shown from frame / fps)."""
        y, x = grid if grid is not None else np.mgrid[0:self.size, 0:self.size].astype(np.float32)
        img = np.empty((self.size, self.size, 3), np.uint8)
        img[:] = self.background
        visible, colour, (cx, cy) = self.state(frame / self.fps)
        if visible:
            r = self.radius
            if self.shape == "square":
                mask = (np.abs(x - cx) <= r) & (np.abs(y - cy) <= r)
            elif self.shape == "circle":
                mask = (x - cx) ** 2 + (y - cy) ** 2 <= r * r
            else:  # apex up, base at cy + r
                mask = (y >= cy - r) & (y <= cy + r) & (np.abs(x - cx) <= (y - (cy - r)) / 2)
            img[mask] = COLOURS[colour]
        return img


def random_scene(vid_name: str, rng: random.Random, *, size: int = 96, duration: float = 4.0,
                 fps: int = 8, grey: tuple[int, int] = (128, 128), kinds: Optional[int] = None) -> VideoScene:
    """A scene with every property drawn uniformly: colours, direction and visibility from the first `kinds` of
    each (all by default; see `write_video_demo`'s fixed choices). The background is a grey drawn from `grey`
    (lo, hi); the default keeps it fixed: a grey drawn per video from (90, 200) was 93% of the variance of a random
    tower's frame embeddings (measured), which buried the shape's colour, visibility and position."""
    d = duration
    u = lambda a, b: rng.uniform(a * d, b * d)  # noqa: E731  (a time as a share of the video)
    visibility = rng.choice(VISIBILITY[:kinds])
    # event times keep >= 20% of the video between events, so 8 uniform frames see every phase
    if visibility == "always":
        visible, change = [[0.0, d]], u(0.35, 0.65)
    elif visibility == "appears":
        ta = u(0.2, 0.35)
        visible, change = [[ta, d]], rng.uniform(ta + 0.2 * d, 0.8 * d)
    elif visibility == "disappears":
        td = u(0.65, 0.8)
        visible, change = [[0.0, td]], rng.uniform(0.2 * d, td - 0.2 * d)
    elif visibility == "appears_then_disappears":
        ta, td = u(0.12, 0.22), u(0.78, 0.88)
        visible, change = [[ta, td]], rng.uniform(ta + 0.2 * d, td - 0.2 * d)
    else:
        t1, t2 = u(0.3, 0.4), u(0.6, 0.7)
        visible, change = [[0.0, t1], [t2, d]], rng.uniform(t1, t2)
    before, after = rng.sample(sorted(list(COLOURS)[:kinds]), 2)
    direction = rng.choice(sorted(list(DIRECTIONS)[:kinds]))
    dx, dy = DIRECTIONS[direction]
    travel = 0.45 * size
    radius = 0.12 * size
    jitter = lambda: rng.uniform(-0.06, 0.06) * size  # noqa: E731
    start = [size / 2 - dx * travel / 2 + jitter(), size / 2 - dy * travel / 2 + jitter()]
    level = rng.randint(*grey)
    return VideoScene(vid_name, rng.choice(SHAPES), before, after, direction, visibility, round(change, 3),
                      [[round(a, 3), round(b, 3)] for a, b in visible], [round(v, 2) for v in start], travel,
                      radius, [level, level, min(255, level + 10)], duration, fps, size)


def write_video(path: str | Path, scene: VideoScene, crf: int = 18) -> Path:
    """mp4 / H.264 (yuv420p, x264 ultrafast, a keyframe every second, so seeking is exercised)."""
    import av
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid = tuple(np.mgrid[0:scene.size, 0:scene.size].astype(np.float32))
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=scene.fps)
        stream.width = stream.height = scene.size
        stream.pix_fmt = "yuv420p"
        stream.options = {"preset": "ultrafast", "crf": str(crf), "g": str(scene.fps)}
        for i in range(scene.n_frames):
            frame = av.VideoFrame.from_ndarray(scene.render(i, grid), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


# ---------------------------------------------------------------------------------------------------------- text

def _choices(answer: str, options: list[str], must: list[str], k: int, rng: random.Random) -> tuple[list[str], int]:
    """`k` choices: the answer, the `must` distractors, then random others; shuffled. (choices, answer index)."""
    others = [o for o in options if o != answer and o not in must]
    picked = [answer] + must + rng.sample(others, k - 1 - len(must))
    rng.shuffle(picked)
    return picked, picked.index(answer)


QUESTION_KINDS = ("direction", "colour_after", "colour_before", "visibility")
QUESTION_TEXT = {"direction": "Which way does the {s} move?", "colour_after": "What colour does the {s} turn?",
                 "colour_before": "What colour is the {s} before it changes colour?",
                 "visibility": "When can the {s} be seen?"}


def questions(scene: VideoScene, n_choices: int, rng: random.Random,
              kinds: tuple[str, ...] = QUESTION_KINDS, fixed: bool = False) -> list[tuple[str, list[str], int]]:
    """(question, choices, answer index) per kind: direction, colour after, colour before, visibility.
    fixed: the choices are the first `n_choices` answers of the kind in their fixed order (COLOURS, DIRECTIONS,
    VISIBILITY), which must hold the answer (draw the scene with kinds=n_choices)."""
    s = scene.shape
    if fixed:
        options = {"direction": [DIRECTION_ANSWERS[k] for k in DIRECTIONS], "colour_after": list(COLOURS),
                   "colour_before": list(COLOURS), "visibility": [VISIBILITY_ANSWERS[k] for k in VISIBILITY]}
        answers = {"direction": DIRECTION_ANSWERS[scene.direction], "colour_after": scene.colour_after,
                   "colour_before": scene.colour_before, "visibility": VISIBILITY_ANSWERS[scene.visibility]}
        out = []
        for kind in kinds:
            choices = options[kind][:n_choices]
            if answers[kind] not in choices:
                raise ValueError(f"{scene.vid_name}: {answers[kind]!r} is not among the first {n_choices} answers "
                                 f"of {kind!r}; draw the scene with kinds={n_choices}")
            out.append((QUESTION_TEXT[kind].format(s=s), choices, choices.index(answers[kind])))
        return out
    colours = sorted(COLOURS)
    make = {
        "direction": lambda: (QUESTION_TEXT["direction"].format(s=s), *_choices(
            DIRECTION_ANSWERS[scene.direction], list(DIRECTION_ANSWERS.values()), [], n_choices, rng)),
        "colour_after": lambda: (QUESTION_TEXT["colour_after"].format(s=s), *_choices(
            scene.colour_after, colours, [scene.colour_before], n_choices, rng)),
        "colour_before": lambda: (QUESTION_TEXT["colour_before"].format(s=s), *_choices(
            scene.colour_before, colours, [scene.colour_after], n_choices, rng)),
        "visibility": lambda: (QUESTION_TEXT["visibility"].format(s=s), *_choices(
            VISIBILITY_ANSWERS[scene.visibility], list(VISIBILITY_ANSWERS.values()), [], n_choices, rng)),
    }
    return [make[k]() for k in kinds]


def captions(scene: VideoScene) -> list[str]:
    """Four phrasings of what happens (TVC val has 4 references per clip; train uses the first 2)."""
    a, b, s, vis = scene.colour_before, scene.colour_after, scene.shape, _VIS_CLAUSE[scene.visibility]
    m, mi = _MOTION[scene.direction], _MOTION_ING[scene.direction]
    return [f"a {a} {s} {m} and turns {b}{vis}.",
            f"the {a} {s} {m}, then it becomes {b}{vis}.",
            f"a {s} {mi} changes from {a} to {b}{vis}.",
            f"there is a {a} {s} that {m} and turns {b}{vis}."]


def subtitles(scene: VideoScene, rng: random.Random, speakers: bool) -> list[dict]:
    n = rng.randint(2, 4)
    lines = rng.sample(_SUBTITLE_LINES, n)
    step = scene.duration / n
    out = []
    for k, text in enumerate(lines):
        if speakers:  # TV subtitles carry speaker prefixes (" Chase : ...")
            text = f"{rng.choice(_SPEAKERS)} : {text}"
        out.append({"text": text, "start": round(k * step, 2), "end": round((k + 1) * step - 0.05, 2)})
    return out


# ---------------------------------------------------------------------------------------------------------- dataset

def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return path


def _vid_name(source: str, k: int, rng: random.Random) -> str:
    if source == "tv":  # TVQA style: show prefix, season, episode, segment, clip
        return f"shapest_s{1 + k // 40:02d}e{1 + (k // 8) % 5:02d}_seg{1 + (k // 4) % 2:02d}_clip_{k % 4:02d}"
    if source == "how2":  # How2QA: numeric strings
        return str(20000 + k)
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_"
    return "".join(rng.choice(alphabet) for _ in range(11)) + f"_{k % 20}"  # YouCook2 id + segment


def write_video_demo(root: str | Path, n_train_videos: int = 40, n_test_videos: int = 10, seed: int = 0, *,
                     size: int = 96, duration: float = 4.0, fps: int = 8,
                     question_kinds: tuple[str, ...] = QUESTION_KINDS, grey: tuple[int, int] = (128, 128),
                     choices: str = "shuffled") -> dict[str, Path]:
    """Write the demo under `root` (see the module docstring): per source (tv, how2, yc2) `n_train_videos`
    training and `n_test_videos` validation videos, with questions of `question_kinds` and backgrounds of a grey
    in `grey` (see `random_scene`). Returns {name: path}.

    choices="shuffled": the answer, its counterpart (both colours) and random distractors in random order, as
    TVQA's are; answering means finding the right text among the choices and naming its label.
    choices="fixed": every possible answer, in a fixed order: the TV videos draw from 5 colours, directions and
    visibilities and the How2 videos from 4, so each choice list holds all of them and the label alone names the
    answer, as in a classification task. Chance stays 1/5 and 1/4 (answers are drawn uniformly), and the
    questions still need the order of events."""
    if choices not in ("shuffled", "fixed"):
        raise ValueError(f"choices must be 'shuffled' or 'fixed', got {choices!r}")
    fixed = choices == "fixed"
    root = Path(root)
    rng = random.Random(seed)
    ann = root / "ann"
    paths: dict[str, Path] = {"root": root}
    scenes: dict[str, dict] = {}
    records: dict[str, list[dict]] = {}
    subs: dict[str, list[dict]] = {"tv": [], "how2": [], "yc2": []}
    qid, clip_id, desc_id = 0, 0, 0
    for source in ("tv", "how2", "yc2"):
        folder = root / "videos" / source
        paths[f"videos_{source}"] = folder
        k = 0
        for split, count in (("train", n_train_videos), ("val", n_test_videos)):
            for _ in range(count):
                name = _vid_name(source, k, rng)
                while name in scenes:  # a YouCook2-style id drawn twice
                    name = _vid_name(source, k, rng)
                k += 1
                kinds = {"tv": 5, "how2": 4}.get(source) if fixed else None
                scene = random_scene(name, rng, size=size, duration=duration, fps=fps, grey=grey, kinds=kinds)
                write_video(folder / f"{name}.mp4", scene)
                scenes[name] = {**asdict(scene), "source": source, "split": split}
                subs[source].append({"vid_name": name, "sub": subtitles(scene, rng, speakers=source == "tv")})
                ts = f"0.00-{duration:.2f}"
                if source in ("tv", "how2"):
                    task = "tvqa" if source == "tv" else "how2qa"
                    n_choices = 5 if source == "tv" else 4
                    for q, choices, answer in questions(scene, n_choices, rng, question_kinds, fixed):
                        r = {"vid_name": name, "ts": ts, "q": q, **{f"a{i}": c for i, c in enumerate(choices)},
                             "answer_idx": answer, "qid": qid}
                        if task == "tvqa":
                            r["show_name"] = SHOWS[k % 2]
                        records.setdefault(f"{task}_{split}", []).append(r)
                        qid += 1
                texts = captions(scene)
                if source == "tv":
                    descs = []
                    for text in texts[: 2 if split == "train" else 4]:
                        descs.append({"desc": text, "desc_id": desc_id, "type": "v", "from_retrieval": False})
                        desc_id += 1
                    records.setdefault(f"tvc_{split}", []).append(
                        {"vid_name": name, "clip_id": clip_id, "ts": [0.0, duration], "duration": duration,
                         "descs": descs})
                    clip_id += 1
                elif source == "yc2":
                    records.setdefault(f"yc2c_{split}", []).append(
                        {"vid_name": name, "clip_id": clip_id, "duration": duration,
                         "descs": [{"desc": texts[rng.randrange(4)] if split == "train" else texts[0],
                                    "desc_id": desc_id}]})
                    clip_id += 1
                    desc_id += 1
    files = {"tvqa_train": "tvqa/tvqa_train.jsonl", "tvqa_val": "tvqa/tvqa_val.jsonl",
             "how2qa_train": "how2qa/how2qa_train_release.jsonl", "how2qa_val": "how2qa/how2qa_val_release.jsonl",
             "tvc_train": "tvc/tvc_train_release.jsonl", "tvc_val": "tvc/tvc_val_release.jsonl",
             "yc2c_train": "yc2c/yc2c_train_release.jsonl", "yc2c_val": "yc2c/yc2c_val_release.jsonl"}
    for key, rel in files.items():
        paths[key] = _write_jsonl(ann / rel, records.get(key, []))
    for source in subs:
        paths[f"{source}_subtitles"] = _write_jsonl(ann / f"{source}_subtitles.jsonl", subs[source])
    paths["scenes"] = root / "scenes.json"
    paths["scenes"].write_text(json.dumps(scenes, indent=1), encoding="utf-8")
    return paths


def load_scenes(path: str | Path) -> dict[str, VideoScene]:
    """scenes.json -> {vid_name: VideoScene}."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    fields = VideoScene.__dataclass_fields__
    return {k: VideoScene(**{f: v[f] for f in fields}) for k, v in data.items()}


if __name__ == "__main__":
    import sys
    import time
    t0 = time.perf_counter()
    out = write_video_demo(sys.argv[1] if len(sys.argv) > 1 else "runs/video_demo")
    print(json.dumps({k: str(v) for k, v in out.items()} | {"seconds": round(time.perf_counter() - t0, 2)}))
