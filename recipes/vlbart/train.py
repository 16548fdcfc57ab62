"""VL-BART multitask fine-tuning with DoRA (or the paper's LoRA and full fine-tuning baselines), under DeepSpeed.

    bash launch/vlbart_dora.sh recipes/vlbart/configs/vlbart_image_dora.yaml [key=value ...]
    deepspeed recipes/vlbart/train.py CONFIG [key=value ...]

Reads the config top to bottom: build the model (model:), adapt it (method: dora | lora | full, with its section),
read every task's training data (tasks:), train the tasks in round robin with a batch size per task (train:),
then write into train.output_dir: adapter/ and adapter_peft/ (DoRA) or trainable.safetensors (LoRA, full), the
tokenizer, config.yaml (resolved) and train_summary.json. `python -m recipes.vlbart.evaluate RUN_DIR` scores it.
"""
from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Optional

import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script by the deepspeed launcher
    sys.path.insert(0, str(ROOT))

from data.vlbart import MultitaskDataset, TaskDataError, VLCollator  # noqa: E402
from data.sampling import RoundRobinBatches  # noqa: E402
from dora import adapter_state_dict, apply_dora, export_peft, save_adapter  # noqa: E402
from dora.adapter import peft_export_problem  # noqa: E402
from recipes.config import ConfigError, load_config, save_config, section  # noqa: E402
from recipes.preflight import check_folder, check_model, check_output  # noqa: E402
from recipes.trainer import TooManySkipsError, TrainConfig, Trainer, write_summary  # noqa: E402
from recipes.vlbart.model import ADDED_TOKENS, CONFIG_NAME, VisualConfig, VLSeq2Seq  # noqa: E402
from recipes.vlbart.tasks import (TaskConfig, read_task_data, task_configs, task_dataset,  # noqa: E402
                                  task_loss)

METHODS = ("dora", "lora", "full")
SECTIONS = ("model", "method", "dora", "lora", "full", "tasks", "train")
TRAINABLE_FILE = "trainable.safetensors"


@dataclass(frozen=True)
class VLModelConfig:
    backbone: Optional[str] = None  # a transformers encoder-decoder (facebook/bart-base, t5-base): + visual embedding
    pretrained: Optional[str] = None  # or a directory written by VLSeq2Seq.save_pretrained (tokenizer/ inside)
    tokenizer: Optional[str] = None  # default: the backbone's
    feat_dim: int = 2048
    n_images: int = 2
    pool_grid: Optional[list] = field(default_factory=lambda: [6, 6])
    dtype: str = "auto"  # auto: bf16 on GPUs that have it, fp32 on CPU (the reference trained in fp32)
    gradient_checkpointing: bool = False


def model_feat_dim(config: VLModelConfig) -> int:
    """The width of the visual features the model takes, known before it is built."""
    if not config.pretrained:
        return config.feat_dim
    path = Path(config.pretrained) / CONFIG_NAME
    if not path.is_file():
        raise ConfigError(f"model.pretrained: {config.pretrained} is not a VL model folder (no {CONFIG_NAME})")
    return int(json.loads(path.read_text())["visual"]["feat_dim"])


def resolve_dtype(name: str) -> torch.dtype:
    from recipes.llava.model import resolve_dtype as resolve
    return resolve(name)


def build_model(config: VLModelConfig):
    """(model, tokenizer). The tokenizer gets VL-T5's extra tokens when the model is built from a backbone."""
    from transformers import AutoTokenizer

    if bool(config.backbone) == bool(config.pretrained):
        raise ConfigError("the model section needs exactly one of model.backbone and model.pretrained")
    dtype = resolve_dtype(config.dtype)
    if config.pretrained:
        tokenizer = AutoTokenizer.from_pretrained(config.tokenizer or Path(config.pretrained) / "tokenizer")
        model = VLSeq2Seq.from_pretrained(config.pretrained, dtype=dtype)
    else:
        tokenizer = AutoTokenizer.from_pretrained(config.tokenizer or config.backbone)
        visual = VisualConfig(feat_dim=config.feat_dim, n_images=config.n_images, pool_grid=config.pool_grid)
        model = VLSeq2Seq.from_backbone(config.backbone, tokenizer, visual, dtype=dtype)
    model.to(dtype)
    if config.gradient_checkpointing:
        model.backbone.gradient_checkpointing_enable()
    return model, tokenizer


def _freeze_except(model, patterns: list[str], what: str) -> int:
    regexes = [re.compile(p) for p in patterns]
    counts = [0] * len(regexes)
    for name, p in model.named_parameters():
        hits = [i for i, r in enumerate(regexes) if r.fullmatch(name)]
        p.requires_grad_(bool(hits))
        for i in hits:
            counts[i] += 1
    empty = [patterns[i] for i, n in enumerate(counts) if not n]
    if empty:
        raise ConfigError(f"{what}: patterns {empty} match no parameter")
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def adapt(model, config: dict) -> str:
    """Apply the config's method; returns a table of what trains."""
    method = config.get("method", "dora")
    if method not in METHODS:
        raise ConfigError(f"method must be one of {METHODS}, not {method!r}")
    total = sum(p.numel() for p in model.parameters())
    if method == "dora":
        cfg = section(config, "dora", ["rules", "train_fully"])
        return apply_dora(model, cfg.get("rules", []), cfg.get("train_fully", []), verbose=False).table()
    if method == "lora":
        from peft import LoraConfig, inject_adapter_in_model
        cfg = section(config, "lora", ["target", "rank", "alpha", "dropout", "train_fully"])
        inject_adapter_in_model(LoraConfig(target_modules=cfg["target"], r=cfg.get("rank", 8),
                                           lora_alpha=cfg.get("alpha", 8), lora_dropout=cfg.get("dropout", 0.0)),
                                model)
        trainable = _freeze_except(model, [r".*\.lora_[AB]\..*"] + list(cfg.get("train_fully", [])), "lora")
        total = sum(p.numel() for p in model.parameters())
    else:
        cfg = section(config, "full", ["train_fully"])
        trainable = _freeze_except(model, list(cfg.get("train_fully", [".*"])), "full")
    return f"{method}: {trainable:,} of {total:,} parameters trained ({trainable / total:.3%})"


def empty_label_lines(datasets: dict) -> list[str]:
    """The start-up report of training examples without a positive-score answer, one line per task that has any."""
    lines = []
    for name, ds in datasets.items():
        if ds.empty_label_count:
            how = {"zero_weight": "trained with the empty answer and weight 0, as the reference",
                   "drop": "left out"}[ds.empty_labels]
            lines.append(f"tasks.{name}: {ds.empty_label_count:,} training examples have no answer with a positive "
                         f"score (label {{}}): {how} (tasks.{name}.empty_labels: {ds.empty_labels})")
    return lines


def make_loss(tasks: dict[str, TaskConfig], feat_dim: int):
    def loss_fn(engine, batch):
        """Every rank runs the same modules in the same order: a batch whose samples were all skipped runs one
        dummy example with weight 0."""
        device = engine.device
        dtype = next(p for p in engine.module.parameters() if p.is_floating_point()).dtype
        if batch.get("empty"):
            ids = torch.tensor([[0, 2]], device=device)
            logits = engine(ids, torch.ones_like(ids), torch.zeros(1, 1, 1, feat_dim, device=device, dtype=dtype),
                            labels=ids)
            # no target token, but the task's loss still joins its collective (a token mean counts all processes)
            loss = task_loss(logits, torch.full_like(ids, -100), None, tasks[batch["task"]])
            return logits.sum() * 0.0 + loss * 0.0, 0
        labels = batch["labels"].to(device)
        logits = engine(batch["input_ids"].to(device), batch["attention_mask"].to(device),
                        batch["vis_feats"].to(device, dtype), labels=labels)
        loss = task_loss(logits, labels, batch.get("score"), tasks[batch["task"]])
        return loss, int((labels != -100).sum())
    return loss_fn


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    argv = [a for a in argv if not a.startswith("--local_rank")]  # passed by the deepspeed launcher
    if not argv:
        print(__doc__)
        return 2
    config = load_config(argv[0], argv[1:], sections=SECTIONS)
    train_cfg = TrainConfig.from_dict(section(config, "train", [f.name for f in fields(TrainConfig)]))
    model_cfg = VLModelConfig(**section(config, "model", [f.name for f in fields(VLModelConfig)]))
    tasks = task_configs(config)
    check_output("train.output_dir", train_cfg.output_dir)
    check_model("model.backbone", model_cfg.backbone)
    check_folder("model.pretrained", model_cfg.pretrained)
    check_model("model.tokenizer", model_cfg.tokenizer)
    # every task's files and feature stores are checked before the model is built
    data = {name: read_task_data(t, "train", model_feat_dim(model_cfg)) for name, t in tasks.items()}
    torch.manual_seed(train_cfg.seed)  # the adapter's initialisation is the same in every process and run
    model, tokenizer = build_model(model_cfg)
    out = Path(train_cfg.output_dir)
    if int(os.environ.get("RANK") or 0) == 0:  # before DeepSpeed partitions anything
        out.mkdir(parents=True, exist_ok=True)
        model.save_added_tokens(out / ADDED_TOKENS)
    table = adapt(model, config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    dataset = MultitaskDataset({name: task_dataset(t, tokenizer, "train", seed=train_cfg.seed, data=data[name])
                                for name, t in tasks.items()})

    def batches(rank: int, world: int) -> RoundRobinBatches:
        for name, n in dataset.task_sizes.items():
            if n < world:
                raise TaskDataError(f"tasks.{name}: {n} training example{'s' * (n != 1)} in "
                                    f"{', '.join(map(str, tasks[name].train))} cannot be shared by {world} processes")
        # a task's batch is global; a batch that the processes cannot share evenly is rounded (and reported)
        sizes = {name: max(1, round(t.batch_size / world)) for name, t in tasks.items()}
        return RoundRobinBatches(dataset.task_sizes, sizes, rank, world, seed=train_cfg.seed)

    trainer = Trainer(train_cfg, model, dataset, VLCollator(tokenizer.pad_token_id),
                      make_loss(tasks, model.visual_config.feat_dim), hidden_size=model.config.d_model,
                      batches=batches)
    if trainer.is_main:
        print(table, flush=True)
        per_task = ", ".join(f"{n} {s} (batch {trainer.batches.task_batch_sizes[n] * trainer.world}"
                             f"{'' if trainer.batches.task_batch_sizes[n] * trainer.world == tasks[n].batch_size else f', rounded from {tasks[n].batch_size}'}"
                             f", {trainer.batches.batches_per_epoch(n)} steps)" for n, s in dataset.task_sizes.items())
        print(f"tasks: {per_task}; {trainer.world} processes; {trainer.steps_per_epoch} steps per epoch, "
              f"{trainer.total_steps} in all; precision {trainer.precision}; ZeRO stage {trainer.zero_stage}; "
              f"optimizer {train_cfg.optimizer}", flush=True)
        for line in empty_label_lines(dataset.datasets):
            print(line, flush=True)
    result = trainer.run()
    if result.paused:
        return 0

    module = trainer.engine.module
    method = config.get("method", "dora")
    params = adapter_state_dict(module) if method == "dora" else \
        {n: p for n, p in module.named_parameters() if p.requires_grad}
    state = trainer.full_fp32_state(params)
    if trainer.is_main:
        meta = {"recipe": "vlbart", "method": method, "steps": result.global_step}
        if method == "dora":
            save_adapter(module, out / "adapter", metadata=meta, state_dict=state)
            problem = peft_export_problem(module)
            if problem:
                print(f"{out / 'adapter_peft'} not written: {problem}", flush=True)
            else:
                export_peft(module, out / "adapter_peft", state_dict=state)
        else:
            from safetensors.torch import save_file
            out.mkdir(parents=True, exist_ok=True)
            save_file({k: v.contiguous() for k, v in state.items()}, str(out / TRAINABLE_FILE), metadata=
                      {k: str(v) for k, v in meta.items()})
        tokenizer.save_pretrained(out / "tokenizer")
        save_config(config, out / "config.yaml")
        write_summary(out, result, f"written to {out}", method=method, trainable=table, trainable_parameters=trainable,
                      total_parameters=total)
    trainer.close()
    return 0


if __name__ == "__main__":
    from recipes.cli import exit_on_user_errors
    from data.features import StoreError
    exit_on_user_errors(main, (ConfigError, TaskDataError, TooManySkipsError, StoreError))
