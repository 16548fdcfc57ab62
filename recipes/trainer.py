"""The training loop every recipe shares: a DeepSpeed engine over a model adapted with `dora`.

What it does: parameter groups (per-group learning rates, no weight decay on biases and norms), warmup +
cosine/linear schedule, gradient accumulation, clipping, bf16 on GPU (fp32 on CPU), DeepSpeed ZeRO configs
from launch/ with their "auto" values filled in, a progress bar with loss / lr / tokens per second, and
checkpoints that are written atomically and resume exactly (model, optimizer, scheduler, data position and
RNG states: the losses after a resume are those of an uninterrupted run).

A recipe gives the model, the dataset, a collate function and a loss function; see recipes/llava/train.py.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import re
import shutil
import socket
import sys
import time
from collections import Counter
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .config import ConfigError, unknown_keys

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[1]


@dataclass
class TrainConfig:
    output_dir: str
    epochs: float = 1.0
    max_steps: Optional[int] = None  # stop after this many optimizer steps (smoke runs, tests)
    micro_batch_size: int = 4  # per device
    global_batch_size: int = 128  # micro x accumulation x world; accumulation is derived from it
    lr: float = 2e-4
    lr_groups: list = field(default_factory=list)  # [{match: regex on parameter names, lr: .., weight_decay: ..}]
    weight_decay: float = 0.0
    no_decay: Optional[list] = None  # regexes (full match) of parameters without weight decay; None: biases and norms
    optimizer: str = "adamw"  # adamw (torch's) | adamw_hf (transformers 4.x's form) | sgd (plain SGD: what the
    # equivalence tests compare runs with)
    adam_betas: tuple = (0.9, 0.999)
    adam_eps: float = 1e-8
    scheduler: str = "cosine"  # cosine | linear | constant (all with linear warmup)
    warmup_ratio: float = 0.03
    warmup_rounding: str = "ceil"  # warmup steps = ceil(ratio x steps), as HF's Trainer; floor: int(), as VL-T5's
    max_grad_norm: float = 1.0  # 0: no clipping
    precision: str = "auto"  # auto: bf16 on GPUs that have it, fp32 on CPU; or bf16 | fp16 | fp32
    tf32: bool = False  # allow TF32 matmuls on Ampere and newer GPUs (HF's --tf32)
    deepspeed: str = "launch/zero3.json"
    seed: int = 42
    group_by_modality_length: bool = False
    num_workers: int = 0
    logging_steps: int = 1
    save_steps: int = 0  # a resumable checkpoint every N optimizer steps (0: none)
    save_total_limit: int = 2
    snapshot_steps: list = field(default_factory=list)  # optimizer steps to write snapshots/step_N/ at, for
    # `python -m dora.analysis`: the adapter only (DoRA: ours; PEFT LoRA: PEFT's), else the trained weights
    pause_at_step: Optional[int] = None  # checkpoint and stop at this step, schedule unchanged (time-sliced jobs)
    resume: str = "auto"  # auto (latest checkpoint in output_dir, if any) | none | a checkpoint directory
    max_skip_rate: float = 0.01  # stop when more than this share of an epoch's samples was skipped as unusable
    skip_check_after: int = 1000  # ... checked once this many samples of the epoch were read, and at its end

    def __post_init__(self):
        bad = [s for s in self.snapshot_steps if not isinstance(s, int) or isinstance(s, bool) or s < 1]
        if bad:
            raise ConfigError(f"train.snapshot_steps must be optimizer steps (integers >= 1), not {bad}")

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise unknown_keys("config section 'train'", unknown, known)
        if "output_dir" not in data:
            raise ConfigError("config section 'train' needs output_dir")
        return cls(**data)


class TooManySkipsError(RuntimeError):
    """More of an epoch's samples were unusable than train.max_skip_rate allows (a wrong image folder, say)."""


# --------------------------------------------------------------------------------------------- distributed
def init_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device). Works under the deepspeed launcher and as a plain single process. DeepSpeed's
    JIT ops come from this environment's own folder (recipes/deepspeed_ops.py)."""
    import deepspeed

    from .deepspeed_ops import prepare
    prepare()
    if "RANK" not in os.environ:  # a plain `python` run: a world of one
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def leave_process_group() -> None:
    """Destroy the process group, let gloo's worker threads finish, and unlink this rank's DeepSpeed CPU
    all-reduce buffer. Call it on every rank, after a barrier.

    Why the wait: a gloo worker thread destroys each finished collective after it has signalled completion, and
    a barrier keeps the collectives still in flight when it was issued, so the last reference to a tensor the
    Python side created can be dropped by a worker thread after the main thread has moved on. That needs the GIL;
    if the interpreter is already finalizing, CPython ends the thread with a forced unwind through a noexcept
    destructor and the process aborts ("terminate called without an active exception", core dumps show
    ProcessGroupGloo::runLoop -> ~AsyncBarrierWork -> ~AsyncAllreduceWork -> decref_pyobject -> take_gil ->
    pthread_exit). destroy_process_group() alone does not join those threads (DeepSpeed keeps references to the
    groups), so we release the GIL until none of them is runnable.

    On CPU, DeepSpeed (0.19) also puts a 69 MB shared-memory buffer per rank in /dev/shm
    (deepspeed_allreduce_buffer_{uid}_{addr}_{port}_{rank}) and never unlinks it: every 2-process CPU run would
    leave 138 MB of RAM behind (19 GB after a day of test runs, measured). Its peers opened it at start-up, so
    unlinking the name once every rank is done frees it when the processes exit. No such file exists on GPU."""
    rank = dist.get_rank() if dist.is_initialized() else None
    if dist.is_initialized():
        dist.destroy_process_group()
        _settle_gloo_workers()
    if rank is not None and "MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ:
        name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ['MASTER_ADDR']}_"
                f"{os.environ['MASTER_PORT']}_{rank}")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(Path("/dev/shm") / name)


def _gloo_worker_states() -> dict[str, str]:
    """{thread id: scheduler state} of this process's gloo threads (Linux /proc; empty elsewhere)."""
    states = {}
    with contextlib.suppress(OSError):
        for task in Path("/proc/self/task").iterdir():
            with contextlib.suppress(OSError):
                if "gloo" in (task / "comm").read_text():
                    states[task.name] = (task / "stat").read_text().rsplit(")", 1)[1].split()[0]
    return states


def _settle_gloo_workers(timeout_s: float = 2.0) -> None:
    """Sleep (which releases the GIL) until no gloo thread is runnable in two checks 10 ms apart: a worker that
    waits for the GIL to drop its last collective gets it and goes back to waiting for work. Bounded."""
    deadline = time.monotonic() + timeout_s
    quiet = 0
    while quiet < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
        quiet = quiet + 1 if all(state in ("S", "D", "I") for state in _gloo_worker_states().values()) else 0


def resolve_precision(name: str) -> str:
    if name == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    if name not in ("bf16", "fp16", "fp32"):
        raise ConfigError(f"train.precision must be auto, bf16, fp16 or fp32, not {name!r}")
    if name != "fp32" and not torch.cuda.is_available():
        raise ConfigError(f"train.precision={name} needs a GPU; use fp32 (or auto) on CPU")
    return name


def read_deepspeed_json(path: str | Path) -> dict:
    """A DeepSpeed JSON as written (relative to the current folder, else one shipped in the repository)."""
    path = Path(path)
    if not path.is_absolute() and not path.exists():
        path = ROOT / path
    if not path.is_file():
        raise ConfigError(f"DeepSpeed config {path} not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None


def deepspeed_config(path: str | Path, *, micro: int, accumulation: int, world: int, max_grad_norm: float,
                     precision: str, hidden_size: int) -> dict:
    """A launch/ DeepSpeed JSON with its "auto" values filled in the way the HF integration fills them."""
    cfg = read_deepspeed_json(path)
    fill = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": micro * accumulation * world,
        "gradient_clipping": max_grad_norm,
    }
    for key, value in fill.items():
        if cfg.get(key, "auto") == "auto":
            cfg[key] = value
    for kind in ("bf16", "fp16"):
        if kind in cfg and cfg[kind].get("enabled") == "auto":
            cfg[kind]["enabled"] = precision == kind
    zero = cfg.setdefault("zero_optimization", {"stage": 0})
    zero_fill = {"reduce_bucket_size": hidden_size * hidden_size,
                 "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
                 "stage3_param_persistence_threshold": 10 * hidden_size}
    for key, value in zero_fill.items():
        if zero.get(key) == "auto":
            zero[key] = value
    left = [k for k, v in _walk(cfg) if v == "auto"]
    if left:
        raise ConfigError(f"{path}: no value known for 'auto' at {left}")
    if not torch.cuda.is_available():
        for key in ("offload_optimizer", "offload_param"):
            if key in zero:
                zero[key]["pin_memory"] = False
    cfg["zero_allow_untested_optimizer"] = True  # our torch AdamW with its own parameter groups
    cfg.setdefault("steps_per_print", 10 ** 9)
    return cfg


def _walk(node, prefix=""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _walk(v, f"{prefix}{k}.")
    else:
        yield prefix.rstrip("."), node


# --------------------------------------------------------------------------------------------- optimisation
def is_no_decay(name: str, norm_names: set[str], patterns: Optional[list] = None) -> bool:
    """By default biases and normalisation weights get no weight decay (LLaVA's trainer). `patterns` replaces the
    rule: VL-T5's excludes names containing "bias" or "LayerNorm.weight", and the second never matches BART's
    norm names, so there LayerNorm weights are decayed."""
    if patterns is not None:
        return any(re.fullmatch(p, name) for p in patterns)
    return name.endswith(".bias") or name in norm_names


def parameter_groups(model: torch.nn.Module, config: TrainConfig) -> list[dict]:
    """One group per (lr rule, decay or not). A rule is {match: regex (full match on the name), lr, weight_decay}."""
    norm_types = (torch.nn.LayerNorm, torch.nn.GroupNorm)
    norm_names = {f"{m_name}.{p_name}" if m_name else p_name
                  for m_name, m in model.named_modules()
                  if isinstance(m, norm_types) or "norm" in type(m).__name__.lower()
                  for p_name, _ in m.named_parameters(recurse=False)}
    rules = []
    for i, rule in enumerate(config.lr_groups):
        if "match" not in rule:
            raise ConfigError(f"train.lr_groups[{i}] needs 'match'")
        rules.append((re.compile(rule["match"]), rule.get("lr", config.lr), rule.get("weight_decay", config.weight_decay)))
    groups: dict[tuple, dict] = {}
    matched = [0] * len(rules)
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lr, wd, tag = config.lr, config.weight_decay, "default"
        for i, (regex, rule_lr, rule_wd) in enumerate(rules):
            if regex.fullmatch(name):
                lr, wd, tag = rule_lr, rule_wd, f"lr_groups[{i}]"
                matched[i] += 1
                break
        no_decay = is_no_decay(name, norm_names, config.no_decay)
        key = (tag, no_decay)
        if key not in groups:
            groups[key] = {"params": [], "names": [], "lr": lr, "weight_decay": 0.0 if no_decay else wd}
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
    for i, n in enumerate(matched):
        if n == 0:
            raise ConfigError(f"train.lr_groups[{i}] (match={config.lr_groups[i]['match']!r}) matched no trainable "
                              f"parameter")
    if not groups:
        raise ConfigError("the model has no trainable parameters")
    return list(groups.values())


class TransformersAdamW(torch.optim.Optimizer):
    """AdamW in the form of transformers 4.x's `transformers.optimization.AdamW` (what VL-T5 and NVlabs/DoRA's
    VL-BART runs trained with; transformers 5 no longer has it). Two differences from torch's AdamW:
    - eps is added to sqrt(v) before the bias correction: the step is
      lr * sqrt(1 - beta2^t) / (1 - beta1^t) * m / (sqrt(v) + eps), where torch's is
      lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps); early steps and small gradients differ;
    - weight decay is applied after the Adam step, to the updated weight: p -= lr * weight_decay * p.
    `correct_bias=False` drops both bias corrections (BERT's TF form)."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0, correct_bias: bool = True):
        if lr < 0 or eps < 0 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"invalid AdamW settings: lr {lr}, betas {betas}, eps {eps}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      correct_bias=correct_bias))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, decay = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("TransformersAdamW does not take sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                t, m, v = state["step"], state["exp_avg"], state["exp_avg_sq"]
                m.mul_(beta1).add_(p.grad, alpha=1.0 - beta1)
                v.mul_(beta2).addcmul_(p.grad, p.grad, value=1.0 - beta2)
                scale = lr * math.sqrt(1.0 - beta2 ** t) / (1.0 - beta1 ** t) if group["correct_bias"] else lr
                p.addcdiv_(m, v.sqrt().add_(eps), value=-scale)
                if decay > 0.0:
                    p.add_(p, alpha=-lr * decay)  # the updated weight decays
        return loss


OPTIMIZERS = ("adamw", "adamw_hf", "sgd")


def make_optimizer(groups: list[dict], config: TrainConfig, cpu_offload: bool = False):
    """AdamW (DeepSpeed's CPU Adam when ZeRO offloads the optimizer to the CPU), transformers 4.x's AdamW, or plain
    SGD."""
    if config.optimizer == "adamw_hf":
        if cpu_offload:
            raise ConfigError("train.optimizer adamw_hf runs on the device: use a DeepSpeed config without "
                              "offload_optimizer (or train.optimizer adamw, DeepSpeed's CPU Adam)")
        return TransformersAdamW(groups, lr=config.lr, betas=tuple(config.adam_betas), eps=config.adam_eps,
                                 weight_decay=config.weight_decay)
    if config.optimizer == "adamw":
        if cpu_offload:
            from deepspeed.ops.adam import DeepSpeedCPUAdam
            return DeepSpeedCPUAdam(groups, lr=config.lr, betas=tuple(config.adam_betas), eps=config.adam_eps,
                                    weight_decay=config.weight_decay, adamw_mode=True)
        return torch.optim.AdamW(groups, lr=config.lr, betas=tuple(config.adam_betas), eps=config.adam_eps,
                                 weight_decay=config.weight_decay)
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, weight_decay=config.weight_decay)
    raise ConfigError(f"train.optimizer must be one of {OPTIMIZERS}, not {config.optimizer!r}")


def warmup_steps(config: TrainConfig, total_steps: int) -> int:
    if config.warmup_rounding not in ("ceil", "floor"):
        raise ConfigError(f"train.warmup_rounding must be ceil or floor, not {config.warmup_rounding!r}")
    rounding = math.ceil if config.warmup_rounding == "ceil" else math.floor
    return rounding(config.warmup_ratio * total_steps)


def make_scheduler(optimizer, config: TrainConfig, total_steps: int):
    from transformers import get_scheduler
    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}.get(config.scheduler)
    if name is None:
        raise ConfigError(f"train.scheduler must be cosine, linear or constant, not {config.scheduler!r}")
    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps(config, total_steps),
                         num_training_steps=total_steps)


# --------------------------------------------------------------------------------------------- checkpoints
def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def latest_checkpoint(output_dir: Path) -> Optional[Path]:
    pointer = output_dir / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    path = output_dir / "checkpoints" / pointer.read_text().strip()
    return path if path.is_dir() else None


@dataclass
class TrainResult:
    global_step: int
    losses: list[float]  # mean training loss of every optimizer step (all ranks averaged), resumed runs included
    skipped: Counter
    paused: bool = False  # stopped at train.pause_at_step: rerun to continue


def write_summary(out: Path, result: TrainResult, written: str, **extra) -> None:
    """output_dir/train_summary.json (steps, losses, skipped samples by reason, and `extra`) and the run's last
    line, which says where `written` the results are."""
    summary = {"steps": result.global_step, "losses": result.losses, "skipped": dict(result.skipped), **extra}
    (Path(out) / "train_summary.json").write_text(json.dumps(summary, indent=1))
    skipped = ", ".join(f"{k} {v}" for k, v in sorted(result.skipped.items())) or "none"
    print(f"done: {result.global_step} steps, final loss {result.losses[-1]:.4f}; skipped samples: {skipped}; "
          f"{written}", flush=True)


class Trainer:
    """Runs a recipe's training under DeepSpeed. `loss_fn(engine, batch)` returns (loss, tokens in batch).

    What each rank reads is a batch plan (data/sampling.py): by default one dataset shuffled (or grouped by
    modality) in micro-batches of train.micro_batch_size, accumulated to train.global_batch_size; a recipe may give
    its own as `batches(rank, world)`, e.g. the multitask round robin with a batch size per task."""

    def __init__(self, config: TrainConfig, model: torch.nn.Module, dataset, collate_fn: Callable,
                 loss_fn: Callable, lengths: Optional[Sequence[int]] = None, hidden_size: int = 1024,
                 batches: Optional[Callable[[int, int], object]] = None):
        self.config = config
        self.rank, self.world, self.device = init_distributed()
        try:
            self._setup(model, dataset, collate_fn, loss_fn, lengths, hidden_size, batches)
        except BaseException:
            # leave the process group before the error ends the process: a gloo group torn down at interpreter
            # exit can abort it ("terminate called without an active exception") and hide the error's exit code
            leave_process_group()
            raise

    def _default_batches(self, lengths, dataset):
        from data.sampling import ShuffledBatches

        config = self.config
        if config.global_batch_size % (config.micro_batch_size * self.world):
            raise ConfigError(f"train.global_batch_size {config.global_batch_size} is not a multiple of "
                              f"micro_batch_size {config.micro_batch_size} x {self.world} processes")
        accumulation = config.global_batch_size // (config.micro_batch_size * self.world)
        lengths = list(lengths) if lengths is not None else [1] * len(dataset)
        return ShuffledBatches(lengths, config.micro_batch_size, accumulation, self.rank, self.world,
                               seed=config.seed, group_by_modality=config.group_by_modality_length)

    def _setup(self, model, dataset, collate_fn, loss_fn, lengths, hidden_size, batches) -> None:
        config = self.config
        self.precision = resolve_precision(config.precision)
        self.batches = self._default_batches(lengths, dataset) if batches is None else batches(self.rank, self.world)
        self.accumulation = self.batches.accumulation
        self.output_dir = Path(config.output_dir)
        self.dataset, self.collate_fn, self.loss_fn = dataset, collate_fn, loss_fn
        self.steps_per_epoch = len(self.batches) // self.accumulation
        if self.steps_per_epoch == 0:
            raise ConfigError(f"{len(dataset)} samples make no optimizer step ({len(self.batches)} micro-batches per "
                              f"process, accumulation {self.accumulation})")
        self.total_steps = math.ceil(config.epochs * self.steps_per_epoch)
        if config.max_steps:
            self.total_steps = min(self.total_steps, config.max_steps)

        if config.tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        torch.manual_seed(config.seed)
        random.seed(config.seed)
        groups = parameter_groups(model, config)
        self.group_names = [g.pop("names") for g in groups]
        ds_config = deepspeed_config(config.deepspeed, micro=self.batches.micro_batch_size, accumulation=self.accumulation,
                                     world=self.world, max_grad_norm=config.max_grad_norm,
                                     precision=self.precision, hidden_size=hidden_size)
        zero = ds_config.get("zero_optimization", {})
        self.zero_stage = zero.get("stage", 0)
        offload = zero.get("offload_optimizer", {}).get("device") == "cpu"
        optimizer = make_optimizer(groups, config, cpu_offload=offload)
        scheduler = make_scheduler(optimizer, config, self.total_steps)
        import deepspeed
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
        self.start_epoch, self.start_micro, self.losses = 0, 0, []
        self.skipped: Counter = Counter()  # skipped samples by reason, this rank, since the start of training
        self.epoch_skipped: Counter = Counter()  # the same, in the current epoch
        self.paused = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self, epoch: int, micro_in_epoch: int) -> Path:
        """DeepSpeed's files under a temporary name, renamed when every rank has written; then `latest`."""
        step = self.engine.global_steps
        root = self.output_dir / "checkpoints"
        tag = f"step-{step:08d}"
        tmp_tag = f".tmp-{tag}"
        if self.is_main and (root / tmp_tag).exists():
            shutil.rmtree(root / tmp_tag)
        dist.barrier()
        client = {"epoch": epoch, "micro_in_epoch": micro_in_epoch, "losses": self.losses,
                  "accumulation": self.accumulation, "world": self.world}
        # frozen weights (the base model) are not written: they come from the model's own checkpoint
        self.engine.save_checkpoint(str(root), tag=tmp_tag, client_state=client, save_latest=False,
                                    exclude_frozen_parameters=True)
        # what differs between ranks: RNG states and skip counts (DeepSpeed keeps client_state of rank 0 only)
        torch.save({"rng": _rng_state(), "skipped": dict(self.skipped), "epoch_skipped": dict(self.epoch_skipped)},
                   root / tmp_tag / f"rank{self.rank}.pt")
        dist.barrier()
        if self.is_main:
            if (root / tag).exists():
                shutil.rmtree(root / tag)
            os.replace(root / tmp_tag, root / tag)
            pointer_tmp = root / ".latest.tmp"
            pointer_tmp.write_text(tag)
            os.replace(pointer_tmp, root / "latest")
            kept = sorted(p for p in root.glob("step-*") if p.is_dir())
            for old in kept[:-max(1, self.config.save_total_limit)]:
                shutil.rmtree(old)
        dist.barrier()
        return root / tag

    def load_checkpoint(self, path: Path) -> None:
        _, client = self.engine.load_checkpoint(str(path.parent), tag=path.name, load_module_strict=False)
        if client is None:
            raise ConfigError(f"{path}: not a checkpoint this trainer wrote")
        if (client["accumulation"], client["world"]) != (self.accumulation, self.world):
            raise ConfigError(f"{path} was written with {client['world']} processes x accumulation "
                              f"{client['accumulation']}; resuming needs the same (now {self.world} x "
                              f"{self.accumulation})")
        self.start_epoch, self.start_micro = client["epoch"], client["micro_in_epoch"]
        self.losses = list(client["losses"])
        rank_file = path / f"rank{self.rank}.pt"
        if not rank_file.is_file():
            raise ConfigError(f"{path}: no {rank_file.name}; was the checkpoint written by fewer processes?")
        state = torch.load(rank_file, weights_only=True)
        _set_rng_state(state["rng"])
        self.skipped = Counter(state["skipped"])
        self.epoch_skipped = Counter(state["epoch_skipped"])
        if self.is_main:
            print(f"resumed from {path} at optimizer step {self.engine.global_steps}", flush=True)

    def maybe_resume(self) -> None:
        resume = self.config.resume
        if resume == "none":
            return
        path = latest_checkpoint(self.output_dir) if resume == "auto" else Path(resume)
        if path is None:
            return
        if not path.is_dir():
            raise ConfigError(f"train.resume: {path} is not a checkpoint directory")
        self.load_checkpoint(path)

    # ------------------------------------------------------------------------------------------- loop
    def _reduce_sum(self, values: list) -> list[float]:
        """One all-reduce for all of a step's statistics, and its `.tolist()` the step's only host sync: values may
        be tensors still on the device (the summed micro-batch losses)."""
        device = self.device if self.device.type == "cuda" else torch.device("cpu")
        t = torch.stack([v.detach().to(device, torch.float64).reshape(()) if torch.is_tensor(v)
                         else torch.tensor(float(v), dtype=torch.float64, device=device) for v in values])
        dist.all_reduce(t)
        return t.tolist()

    def _check_skip_rate(self, epoch: int, skipped: int, seen: int, epoch_end: bool) -> None:
        """Every rank sees the same all-reduced counts, so every rank raises together (no rank left waiting)."""
        cfg = self.config
        if not skipped or not (epoch_end or seen >= cfg.skip_check_after) or skipped <= cfg.max_skip_rate * seen:
            return
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(self._gather_skips(self.epoch_skipped).items()))
        raise TooManySkipsError(
            f"epoch {epoch}: {skipped} of the {seen} samples read were skipped ({skipped / seen:.1%}; {reasons}), "
            f"more than train.max_skip_rate {cfg.max_skip_rate:.1%}. The first samples of each reason are logged "
            f"above with their ids: fix the data (or its image folder), or raise train.max_skip_rate.")

    def _gather_skips(self, local: Counter) -> Counter:
        gathered = [None] * self.world
        dist.all_gather_object(gathered, dict(local))
        total = Counter()
        for part in gathered:
            total.update(part)
        return total

    def train(self) -> TrainResult:
        self.maybe_resume()
        cfg = self.config
        micro_per_step = self.accumulation
        interactive = sys.stderr.isatty()
        bar = tqdm(total=self.total_steps, initial=self.engine.global_steps, disable=not self.is_main,
                   desc="train", dynamic_ncols=True, mininterval=0.5 if interactive else 30.0)
        epoch = self.start_epoch
        done = self.engine.global_steps >= self.total_steps
        while not done:
            skip = self.start_micro if epoch == self.start_epoch else 0
            micro_batches = self.batches.micro_batches(epoch)[: self.steps_per_epoch * micro_per_step]
            read = [0]  # samples this rank has read after each micro-batch of the epoch
            for b in micro_batches:
                read.append(read[-1] + len(b))
            if hasattr(self.dataset, "set_epoch"):  # datasets that draw per epoch (VQA's sampled answer)
                self.dataset.set_epoch(epoch)
            # the loader gets its own generator: creating one draws a seed from the global RNG, which would shift
            # every later dropout mask of a resumed run against an uninterrupted one
            loader = DataLoader(self.dataset, batch_sampler=micro_batches[skip:], collate_fn=self.collate_fn,
                                num_workers=cfg.num_workers, generator=torch.Generator().manual_seed(cfg.seed + epoch))
            if epoch != self.start_epoch or not skip:
                self.epoch_skipped = Counter()
            # loss summed over the micro-batches that had tokens (an all-skipped one is not a loss of 0), their count
            window_loss, window_batches, window_tokens, t0 = 0.0, 0, 0, time.perf_counter()
            micro = skip
            epoch_skips = 0  # all ranks, this epoch, as of the last optimizer step
            for batch in loader:
                self.skipped.update(batch.get("skipped", []))
                self.epoch_skipped.update(batch.get("skipped", []))
                self.engine.train()
                loss, tokens = self.loss_fn(self.engine, batch)
                self.engine.backward(loss)
                before = self.engine.global_steps
                self.engine.step()
                micro += 1
                if tokens:
                    # summed on the device: a `.item()` here would wait for every micro-batch's backward on a GPU
                    # before the next micro-batch can be queued; the step's all-reduce reads it once
                    window_loss = loss.detach().float() + window_loss
                    window_batches += 1
                window_tokens += int(tokens)
                if self.engine.global_steps == before:
                    continue
                loss_sum, batches, tokens_all, skips = self._reduce_sum(
                    [window_loss, window_batches, window_tokens, sum(self.epoch_skipped.values())])
                step_loss = loss_sum / batches if batches else float("nan")
                epoch_skips = int(skips)
                self._check_skip_rate(epoch, epoch_skips, read[micro] * self.world, False)
                self.losses.append(step_loss)
                elapsed = time.perf_counter() - t0
                if self.is_main and self.engine.global_steps % max(1, cfg.logging_steps) == 0:
                    bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{self.scheduler.get_last_lr()[0]:.2e}",
                                    tok_s=f"{tokens_all / max(elapsed, 1e-9):.0f}", refresh=False)
                bar.update(1)
                window_loss, window_batches, window_tokens, t0 = 0.0, 0, 0, time.perf_counter()
                step = self.engine.global_steps
                pause = cfg.pause_at_step is not None and step == cfg.pause_at_step and step < self.total_steps
                if step in cfg.snapshot_steps:
                    self.save_snapshot(step)
                if (cfg.save_steps and step % cfg.save_steps == 0 and step < self.total_steps) or pause:
                    self.save_checkpoint(epoch, micro)
                if pause:
                    self.paused = True
                if step >= self.total_steps or pause:
                    done = True
                    break
            self._check_skip_rate(epoch, epoch_skips, read[micro] * self.world, True)
            total_skips = self._gather_skips(self.epoch_skipped)
            if self.is_main:
                summary = ", ".join(f"{k} {v}" for k, v in sorted(total_skips.items())) or "none"
                tqdm.write(f"epoch {epoch}: skipped samples: {summary}")
            epoch += 1
        bar.close()
        return TrainResult(self.engine.global_steps, self.losses, self._gather_skips(self.skipped), self.paused)

    def run(self) -> TrainResult:
        """train() as a recipe's main() calls it: on a skip-rate stop every rank leaves the process group together
        before the error goes up; a paused run (result.paused) says so and leaves it too."""
        try:
            result = self.train()
        except TooManySkipsError:
            self.close()  # every rank raised at the same step: leave the process group together
            raise
        if result.paused:
            if self.is_main:
                print(f"paused at step {result.global_step} (train.pause_at_step); run again to continue", flush=True)
            self.close()
        return result

    def close(self) -> None:
        """Wait for every rank, then leave the process group: no rank tears down connections another still uses,
        and no gloo group is left for the interpreter's exit to tear down (which aborts the process at random)."""
        dist.barrier()
        leave_process_group()

    # ------------------------------------------------------------------------------------------- saving
    def save_snapshot(self, step: int) -> Path:
        """What training changed so far, into output_dir/snapshots/step_N/, for `python -m dora.analysis` (which
        reads it against the base model): a model adapted by `dora` writes its adapter (dora_config.json +
        dora_adapter.safetensors), one with PEFT LoRA layers a PEFT adapter (adapter_config.json +
        adapter_model.safetensors), any other model its trainable parameters as model.safetensors. No optimizer
        state: a snapshot is not a checkpoint to resume from. A collective: every rank calls it."""
        from safetensors.torch import save_file

        from dora import adapter_state_dict, dora_modules, save_adapter
        from dora.adapter import PEFT_PREFIX, PEFT_WEIGHTS_NAME

        module = self.engine.module
        path = self.output_dir / "snapshots" / f"step_{step}"
        adapted = bool(dora_modules(module))
        params = adapter_state_dict(module) if adapted else \
            {n: p for n, p in module.named_parameters() if p.requires_grad}
        state = self.full_fp32_state(params)
        if self.is_main:
            peft_config = getattr(module, "peft_config", None)
            if adapted:
                save_adapter(module, path, metadata={"step": step}, state_dict=state)
            elif peft_config:
                # PEFT's file names: the adapter name leaves the key, the base model's wrapper prefix joins it
                tensors = {PEFT_PREFIX + re.sub(r"\.(lora_[AB]|lora_magnitude_vector)\.default(?=\.|$)", r".\1", n)
                           .replace("lora_magnitude_vector.weight", "lora_magnitude_vector"): t
                           for n, t in state.items()}
                path.mkdir(parents=True, exist_ok=True)
                save_file(tensors, str(path / PEFT_WEIGHTS_NAME), metadata={"format": "pt", "step": str(step)})
                peft_config["default"].save_pretrained(str(path))
            else:
                path.mkdir(parents=True, exist_ok=True)
                save_file(state, str(path / "model.safetensors"), metadata={"format": "pt", "step": str(step)})
        dist.barrier()
        return path

    def plan(self) -> str:
        """The batch plan and precision, as the recipes print them at the start."""
        c = self.config
        return (f"{self.world} processes x micro-batch {c.micro_batch_size} x accumulation {self.accumulation} = "
                f"global batch {c.global_batch_size}; {self.total_steps} optimizer steps; precision {self.precision}; "
                f"ZeRO stage {self.zero_stage}")

    def save_dora_adapter(self, out: Path, metadata: dict) -> None:
        """The trained DoRA adapter in full fp32 (`full_fp32_state`) as out/adapter and its PEFT export as
        out/adapter_peft. A collective: every rank calls it, the main one writes."""
        from dora import adapter_state_dict, export_peft, save_adapter
        from dora.adapter import peft_export_problem
        module = self.engine.module
        state = self.full_fp32_state(adapter_state_dict(module))
        if self.is_main:
            save_adapter(module, out / "adapter", metadata=metadata, state_dict=state)
            problem = peft_export_problem(module)
            if problem:
                print(f"{out / 'adapter_peft'} not written: {problem}", flush=True)
            else:
                export_peft(module, out / "adapter_peft", state_dict=state)

    def full_fp32_state(self, params: dict[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
        """The full fp32 values of parameters, from DeepSpeed's master copies where it keeps them (bf16/fp16
        training, ZeRO partitions): saving the bf16 module copy would round magnitudes to 0.4 %. A collective:
        every rank calls it."""
        from deepspeed.utils import safe_get_full_fp32_param
        out = {}
        for name, p in params.items():
            full = safe_get_full_fp32_param(p)
            out[name] = (full if full is not None else p.detach()).float().cpu()
        return out
