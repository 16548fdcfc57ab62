"""The VL-BART recipe's tasks as its config describes them: data, loss, prediction and scoring per task.

A task section of a config:

    vqa:
      format: vqa                     # vqa (VQAv2 / GQA files) | nlvr | karpathy_caption
      train: [datasets/vqa/karpathy_train.json]
      test: datasets/vqa/karpathy_test.json
      features: [features/coco]       # feature stores, looked up in turn
      batch_size: 300                 # global, per optimizer step (each process takes batch_size / processes)
      prompt: "vqa: "
      max_input_length: 20            # tokens, special tokens included (null: no limit)
      max_target_length: 10
      loss: example                   # example: mean per example, then over the batch | token: over all tokens
      score_weighted: true            # weight each example's loss by its answer's score (VQA)
      empty_labels: zero_weight       # a label without a positive-score answer ({}): zero_weight | drop | refuse
      predict: {mode: generate, num_beams: 1, max_length: 20}     # or {mode: choose} (NLVR2: true vs false)
      score: {task: vqav2, gt: datasets/vqa/karpathy_test.json}   # how `python -m eval` scores the predictions
      submit: {questions: ..., file: ...}   # optional: the server-only test split, written by evaluate --submit

Video tasks add `subtitles` (VALUE's subtitle files), `frames` (features resized to 64 time steps) and `truncate`
(context: the subtitles are cut first to fit max_input_length; right: the end is cut, as the reference did).

`predict` holds transformers' generate arguments (num_beams, max_length, no_repeat_ngram_size, early_stopping,
length_penalty, min_length, forced_bos_token_id, forced_eos_token_id, ...); what it leaves out comes from the
backbone's generation config, and `python -m recipes.vlbart.evaluate` prints the settings that ran. Besides them:
`mode` (generate | choose), `answers` (choose: the candidates) and `strip` (default true: strip the decoded text;
the reference kept it as decoded).
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Optional

import torch
import torch.nn.functional as F

from data.vlbart import (
    EMPTY_LABELS,
    IGNORE_INDEX,
    NLVR_ANSWERS,
    PROMPTS,
    Example,
    FeatureLookup,
    TaskDataError,
    TaskDataset,
    read_karpathy_captions,
    read_nlvr,
    read_vqa,
)
from data.value import VIDEO_PROMPTS, read_subtitles, video_examples
from recipes.config import ConfigError, unknown_keys

FORMATS = ("vqa", "nlvr", "karpathy_caption", "video_qa", "video_caption")
DEFAULT_FORMAT = {"vqa": "vqa", "gqa": "vqa", "nlvr": "nlvr", "caption": "karpathy_caption",
                  "tvqa": "video_qa", "how2qa": "video_qa", "tvc": "video_caption", "yc2c": "video_caption"}


@dataclass
class TaskConfig:
    name: str
    train: list = field(default_factory=list)
    test: Optional[str] = None
    features: list = field(default_factory=list)
    format: Optional[str] = None
    batch_size: int = 32
    prompt: Optional[str] = None
    max_input_length: Optional[int] = None
    max_target_length: Optional[int] = None
    loss: str = "example"
    score_weighted: bool = False
    train_splits: list = field(default_factory=lambda: ["train", "restval"])  # karpathy_caption only
    test_splits: list = field(default_factory=lambda: ["test"])
    predict: dict = field(default_factory=lambda: {"mode": "generate", "num_beams": 1, "max_length": 20})
    score: dict = field(default_factory=dict)
    submit: dict = field(default_factory=dict)  # {questions: test file, file: name}: a server's submission file
    subtitles: list = field(default_factory=list)  # video tasks: VALUE's subtitle files
    frames: Optional[int] = None  # video tasks: features resized to this many time steps (64)
    truncate: str = "context"  # video tasks: "context" (subtitles cut first) or "right" (the reference's cut)
    empty_labels: str = "zero_weight"  # training examples without a positive-score answer: EMPTY_LABELS

    @classmethod
    def from_dict(cls, name: str, data: dict) -> "TaskConfig":
        known = {f.name for f in fields(cls)} - {"name"}
        unknown = set(data) - known
        if unknown:
            raise unknown_keys(f"tasks.{name}", unknown, known)
        config = cls(name=name, **data)
        if isinstance(config.train, str):
            config.train = [config.train]
        for key in ("features", "subtitles"):
            if isinstance(getattr(config, key), str):
                setattr(config, key, [getattr(config, key)])
        config.format = config.format or DEFAULT_FORMAT.get(name)
        if config.format not in FORMATS:
            raise ConfigError(f"tasks.{name}.format must be one of {FORMATS} (no default for a task named {name!r})")
        if config.prompt is None:
            config.prompt = {**PROMPTS, **VIDEO_PROMPTS}.get(name, f"{name}: ")
        if config.truncate not in ("context", "right"):
            raise ConfigError(f"tasks.{name}.truncate must be context or right, not {config.truncate!r}")
        if config.loss not in ("example", "token"):
            raise ConfigError(f"tasks.{name}.loss must be example or token, not {config.loss!r}")
        if config.predict.get("mode", "generate") not in ("generate", "choose"):
            raise ConfigError(f"tasks.{name}.predict.mode must be generate or choose")
        if config.empty_labels not in EMPTY_LABELS:
            raise ConfigError(f"tasks.{name}.empty_labels must be one of {EMPTY_LABELS}, not {config.empty_labels!r}")
        for key, known in (("predict", _predict_keys()), ("score", _score_keys())):
            unknown = set(getattr(config, key)) - known
            if unknown:
                raise unknown_keys(f"tasks.{name}.{key}", unknown, known)
        return config


def _predict_keys() -> set[str]:
    """`predict:` holds the mode, NLVR2's candidate answers, `strip`, and generation settings (GenerationConfig's
    names)."""
    from transformers import GenerationConfig
    return set(NOT_GENERATE_OPTIONS) | set(GenerationConfig().to_dict())


def _score_keys() -> set[str]:
    """`score:` names eval's task and ground truth, and eval's scoring options."""
    from eval.tasks import TaskOptions
    return {"task", "gt"} | {f.name for f in fields(TaskOptions)}


def task_configs(config: dict) -> dict[str, TaskConfig]:
    tasks = config.get("tasks") or {}
    if not isinstance(tasks, dict) or not tasks:
        raise ConfigError("the config needs a 'tasks' section naming at least one task")
    return {name: TaskConfig.from_dict(name, data or {}) for name, data in tasks.items()}


def read_examples(task: TaskConfig, split: str) -> list[Example]:
    paths = task.train if split == "train" else [task.test]
    if not paths or paths == [None]:
        raise ConfigError(f"tasks.{task.name} has no {split} file")
    if task.format == "vqa":
        return read_vqa(paths)
    if task.format == "nlvr":
        return [e for p in paths for e in read_nlvr(p)]
    if task.format in ("video_qa", "video_caption"):
        return video_examples(task.name, paths, read_subtitles(task.subtitles) if task.subtitles else {},
                              train=split == "train")
    splits = task.train_splits if split == "train" else task.test_splits
    return [e for p in paths for e in read_karpathy_captions(p, splits, per_caption=split == "train")]


def open_features(task: TaskConfig, feat_dim: Optional[int] = None) -> FeatureLookup:
    """The task's feature stores, each checked whole before any model runs: a store that is missing or has a
    damaged shard, or whose features are not `feat_dim` wide (the model's visual input), is an error naming it."""
    from data.features import FeatureStore, StoreError

    if not task.features:
        raise ConfigError(f"tasks.{task.name} names no feature store")
    stores = []
    for path in task.features:
        try:
            store = FeatureStore(path)
            store.verify()
        except (FileNotFoundError, StoreError) as e:
            raise TaskDataError(f"tasks.{task.name}.features: {e}") from None
        if feat_dim is not None and store.feature_dim is not None and store.feature_dim != feat_dim:
            made_by = store.metadata.get("model_name") or store.metadata.get("model")
            raise ConfigError(f"tasks.{task.name}.features: {path} holds {store.feature_dim}-wide features"
                              f"{f' ({made_by})' if made_by else ''}, but the model takes {feat_dim} (model.feat_dim): "
                              f"use a store made by the tower the model expects, or set model.feat_dim")
        stores.append(store)
    return FeatureLookup(stores)


def read_task_data(task: TaskConfig, split: str, feat_dim: Optional[int] = None) -> tuple[list[Example],
                                                                                        FeatureLookup]:
    """A split's examples and feature stores, checked: what a run reads before it builds the model."""
    examples = read_examples(task, split)
    if not examples:
        files = task.train if split == "train" else [task.test]
        where = f" in splits {task.train_splits if split == 'train' else task.test_splits}" \
            if task.format == "karpathy_caption" else ""
        raise TaskDataError(f"tasks.{task.name}: the {split} file{'s' if len(files) > 1 else ''} "
                            f"{', '.join(map(str, files))} hold{'' if len(files) > 1 else 's'} no examples{where}")
    return examples, open_features(task, feat_dim)


def task_dataset(task: TaskConfig, tokenizer, split: str, seed: int = 0, feat_dim: Optional[int] = None,
                 data: Optional[tuple[list[Example], FeatureLookup]] = None) -> TaskDataset:
    """`data`: what `read_task_data` returned (read otherwise)."""
    examples, features = data or read_task_data(task, split, feat_dim)
    return TaskDataset(task.name, examples, features, tokenizer, prompt=task.prompt,
                       max_input_length=task.max_input_length, max_target_length=task.max_target_length,
                       train=split == "train", seed=seed, frames=task.frames, truncate=task.truncate,
                       empty_labels=task.empty_labels)


# --------------------------------------------------------------------------------------------------- loss
def task_loss(logits: torch.Tensor, labels: torch.Tensor, score: Optional[torch.Tensor], task: TaskConfig):
    """The reference's reductions: VQA, GQA, NLVR2 average each example's tokens, then the examples (VQA
    weighted by the answer's score); captions average all target tokens of the batch.

    The batch is the global one: data-parallel training averages the processes' gradients, so a token mean is
    taken over the tokens of every process (one all-reduce of a count), else processes with fewer target tokens
    would weigh more than one process holding the whole batch."""
    ce = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                         reduction="none").view(labels.shape)
    mask = (labels != IGNORE_INDEX).float()
    if task.loss == "token":
        tokens = mask.sum()
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            world = torch.distributed.get_world_size()
            total = tokens.detach().clone()
            torch.distributed.all_reduce(total)
            return (ce * mask).sum() * world / total.clamp_min(1.0)
        return (ce * mask).sum() / tokens.clamp_min(1.0)
    per_example = (ce * mask).sum(1) / mask.sum(1).clamp_min(1.0)
    if task.score_weighted and score is not None:
        per_example = per_example * score.to(per_example.device)
    return per_example.mean()


# --------------------------------------------------------------------------------------------------- prediction
@torch.no_grad()
def predict_batch(model, tokenizer, batch: dict, task: TaskConfig, device) -> list[str]:
    """Answer texts for a batch: generated (greedy / beam), or the better of the task's candidate answers."""
    args = (batch["input_ids"].to(device), batch["attention_mask"].to(device),
            batch["vis_feats"].to(device, next(model.parameters()).dtype))
    if task.predict.get("mode", "generate") == "choose":
        answers = task.predict.get("answers", list(NLVR_ANSWERS))
        candidates = tokenizer(answers, padding=True, return_tensors="pt")["input_ids"].to(device)
        return [answers[i] for i in model.choose(*args, candidates=candidates).tolist()]
    out = model.generate(*args, **generate_options(task))
    texts = tokenizer.batch_decode(out, skip_special_tokens=True)
    return [t.strip() for t in texts] if task.predict.get("strip", True) else texts


NOT_GENERATE_OPTIONS = ("mode", "answers", "strip")
# The settings that decide what generate returns, printed at evaluation with where each came from
GENERATION_SETTINGS = ("do_sample", "num_beams", "max_length", "min_length", "no_repeat_ngram_size", "early_stopping",
                       "length_penalty", "forced_bos_token_id", "forced_eos_token_id")


def generate_options(task: TaskConfig) -> dict:
    """The task's `predict` keys that are transformers' generate arguments."""
    return {k: v for k, v in task.predict.items() if k not in NOT_GENERATE_OPTIONS}


def generation_settings(model, task: TaskConfig) -> str:
    """One line: what the task's predictions run with. Generation: each setting pinned by the config, or taken from
    the backbone's generation config (marked "from the model")."""
    if task.predict.get("mode", "generate") == "choose":
        return f"choose among {task.predict.get('answers', list(NLVR_ANSWERS))} (first differing token's logits)"
    pinned = generate_options(task)
    defaults = model.backbone.generation_config
    parts = [f"{k}={pinned[k]!r}" if k in pinned else f"{k}={getattr(defaults, k, None)!r} (from the model)"
             for k in GENERATION_SETTINGS]
    parts += [f"{k}={v!r}" for k, v in pinned.items() if k not in GENERATION_SETTINGS]
    return "generate: " + ", ".join(parts) + f"; strip={task.predict.get('strip', True)}"


def prediction_rows(ids: list[str], texts: list[str]) -> list[dict]:
    """Predictions as the evaluators read them: LLaVA's answer-file shape {"question_id", "text"}."""
    return [{"question_id": i, "text": t} for i, t in zip(ids, texts)]

