"""Weight-decomposition analysis (paper section 2.2): how much fine-tuning changed magnitude and direction.

For a weight W (PyTorch layout, one row per output) and its pre-trained W0:
    delta_M = mean_i | ||W_i|| - ||W0_i|| |            delta_D = mean_i (1 - cos(W_i, W0_i))
The paper plots delta_D against delta_M per layer and training step: full fine-tuning and DoRA show a
negative slope, LoRA a positive one.

Layout. The paper writes W in R^{d x k} with d inputs and k outputs (y = x W, "column" layout), its magnitude
m = ||W||_c in R^{1 x k} the norm of each column, and averages over the k columns. nn.Linear stores W^T, shape
(out, in) = (k, d): the paper's column j is our row j, ||W||_c is our row norm, and its mean over k columns is
our mean over rows. Conv1D layers (GPT-2, PEFT's fan_in_fan_out) store (in, out) and are refused.

Command line (streams safetensors one tensor at a time; never a whole model in memory):
    python -m dora.analysis --base BASE --checkpoints CKPT [CKPT ...] [--modules REGEX] --out DIR
BASE is the pre-trained model (model.safetensors, a sharded index, or a directory with either). A CKPT is our
adapter directory, a PEFT LoRA/DoRA adapter, or weights: a full fine-tune, a merged LoRA/DoRA model, or the
trainer's snapshot (`train.snapshot_steps`). Prefix METHOD= to name its panel (a merged DoRA model is
otherwise taken for full fine-tuning). Writes decomposition.csv (method, step, module, delta_m, delta_d),
decomposition.png (one panel per method, coloured by step, with the fitted slope and correlation) and
summary.json.
"""
from __future__ import annotations

import csv
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn as nn
from safetensors import safe_open

from .adapter import (CONFIG_NAME, PEFT_CONFIG_NAME, PEFT_PREFIX, PEFT_WEIGHTS_NAME, WEIGHTS_NAME, AdapterError,
                      _peft_pattern_value, read_adapter_config)
from .layer import _CHUNK_ELEMENTS, DoRALinear

PathLike = Union[str, os.PathLike]


@dataclass(frozen=True)
class DecompositionDelta:
    magnitude: float  # delta_M
    direction: float  # delta_D


def decomposition_delta(weight: torch.Tensor, base_weight: torch.Tensor) -> DecompositionDelta:
    """delta_M and delta_D between a (fine-tuned) weight and the pre-trained one, both (out, in)."""
    w, w0 = weight.double(), base_weight.double()
    norm, norm0 = w.norm(dim=1), w0.norm(dim=1)
    cos = (w * w0).sum(dim=1) / (norm * norm0).clamp_min(torch.finfo(torch.float64).tiny)
    return DecompositionDelta((norm - norm0).abs().mean().item(), (1 - cos).mean().item())


@torch.no_grad()
def dora_decomposition_delta(module: DoRALinear) -> DecompositionDelta:
    """delta_M and delta_D of an unmerged DoRA layer against its frozen W0, from factors (no out x in matrix).

    The adapted weight's row magnitude is m; its direction is that of W0_i + D_i with D_i = s B_i A. With
    c = W0_i.D_i and q = ||D_i||^2 (both from factors):
        1 - cos = (||W0_i||^2 q - c^2) / (n0 n (n0 n + dot)),  dot = ||W0_i||^2 + c,  n = ||W0_i + D_i||,
    which equals 1 - dot / (n0 n) without its cancellation, so that small updates keep their digits. Everything
    is computed in float64, W0 upcast in bounded row chunks, whatever the layer's dtype.
    """
    if module.merged:
        raise ValueError("unmerge the module first: the analysis needs W0")
    w = module.dense_weight()
    rows = max(1, _CHUNK_ELEMENTS // w.shape[1])
    f64 = torch.float64
    w2, cross = [], []
    lora_A, lora_B, s = module._low_rank()
    for chunk in w.split(rows):
        chunk = chunk.to(f64)
        w2.append(torch.linalg.vecdot(chunk, chunk))
        if lora_A is not None:
            cross.append(chunk @ lora_A.to(f64).t())  # (rows, r)
    w2 = torch.cat(w2)
    if lora_A is None:
        c = q = torch.zeros_like(w2)
    else:
        B, A = lora_B.to(f64), lora_A.to(f64)
        c = s * torch.linalg.vecdot(B, torch.cat(cross))
        q = s * s * torch.linalg.vecdot(B, B @ (A @ A.t()))
    n0 = w2.sqrt()
    n = (w2 + 2 * c + q).clamp_min(0).sqrt()
    dot = w2 + c
    tiny = torch.finfo(f64).tiny
    direct = 1 - dot / (n0 * n).clamp_min(tiny)
    stable = (w2 * q - c * c).clamp_min(0) / (n0 * n * (n0 * n + dot)).clamp_min(tiny)
    one_minus_cos = torch.where(dot > 0, stable, direct)
    magnitude = n if module.magnitude is None else module.magnitude.to(f64)  # plain VeRA: W's own row norm
    return DecompositionDelta((magnitude - n0).abs().mean().item(), one_minus_cos.mean().item())


def model_decomposition_deltas(model: nn.Module) -> dict[str, DecompositionDelta]:
    """delta_M and delta_D of every DoRA layer of a model, by module name."""
    return {name: dora_decomposition_delta(m) for name, m in model.named_modules() if isinstance(m, DoRALinear)}


# ------------------------------------------------------------------------------------------------ checkpoints
# The CLI compares checkpoints with the pre-trained weights one layer at a time: every tensor is read on its own
# from safetensors (safe_open maps the file and copies out only the tensor asked for), so at most one layer's W0,
# its adapter factors and its W are resident, whatever the size of the model.

STEP_PATTERN = re.compile(r"(?:step|checkpoint|ckpt)[-_]?(\d+)", re.IGNORECASE)
DEFAULT_MODULES = r".*(q_proj|v_proj|query|value)"  # the paper analyses the query and value projections
METHOD_ORDER = ("FT", "LoRA", "DoRA", "VeRA", "DVoRA")


class AnalysisError(ValueError):
    """A checkpoint or base model the analysis cannot read; the message names the file."""


class TensorFile:
    """Reads single tensors by name from a safetensors file, a sharded model (model.safetensors.index.json) or
    a directory holding either. Nothing is read until `get` is called; each call returns one tensor."""

    def __init__(self, path: PathLike):
        path = Path(path)
        self.path = path
        if path.is_dir():
            if (path / "model.safetensors").is_file():
                files = {None: path / "model.safetensors"}
            elif (path / "model.safetensors.index.json").is_file():
                files = self._index(path / "model.safetensors.index.json")
            else:
                raise AnalysisError(f"{path}: no model.safetensors or model.safetensors.index.json")
        elif path.suffix == ".json" and path.is_file():
            files = self._index(path)
        elif path.is_file():
            files = {None: path}
        else:
            raise AnalysisError(f"{path} not found")
        self._handles = {}
        self._where: dict[str, Path] = {}
        for key, file in files.items():
            if not file.is_file():
                raise AnalysisError(f"{file} not found (listed by {path})")
        if None in files:
            self._where = {k: files[None] for k in self._open(files[None]).keys()}
        else:
            self._where = dict(files)

    @staticmethod
    def _index(index: Path) -> dict:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as e:
            raise AnalysisError(f"{index}: not a safetensors index ({e})") from None
        return {key: index.parent / shard for key, shard in weight_map.items()}

    def _open(self, file: Path):
        if file not in self._handles:
            try:
                self._handles[file] = safe_open(str(file), framework="pt")
            except Exception as e:  # safetensors raises its own error types for a damaged header
                raise AnalysisError(f"{file}: cannot read as safetensors ({e})") from None
        return self._handles[file]

    def keys(self) -> list[str]:
        return list(self._where)

    def metadata(self) -> dict:
        files = sorted(set(self._where.values()))
        return dict(self._open(files[0]).metadata() or {}) if files else {}

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def get(self, key: str) -> torch.Tensor:
        if key not in self._where:
            raise AnalysisError(f"{self.path}: no tensor {key!r}")
        return self._open(self._where[key]).get_tensor(key)

    def shape(self, key: str) -> tuple:
        return tuple(self._open(self._where[key]).get_slice(key).get_shape())


def resolve_key(name: str, keys, source) -> str:
    """The key for `name` in `keys`. One rule for every recipe: the same name, else, among the keys with the same
    numeric components (layer indices) in the same order, the key sharing the longest run of trailing components
    with it (at least 3, e.g. `self_attn.q_proj.weight`), ties broken by how many of the other components the two
    share. A model and its checkpoints name one weight with other wrappers
    (`model.language_model.layers.0...` in a LLaVA model; `model.layers.0...` in its LLM's checkpoint;
    `language_model.model.layers.0...` in an older LLaVA checkpoint; `backbone.model.encoder...` for VL-BART's
    BART), and the wrapper names say which tower a weight belongs to (the LLM's layers.0, not CLIP's)."""
    keys = keys if isinstance(keys, (set, dict)) else set(keys)
    if name in keys:
        return name
    parts = name.split(".")
    need = min(3, len(parts))
    indices = [p for p in parts if p.isdigit()]  # layers.7 is never layers.0 (a base missing layer 7: an error)
    keys = [k for k in keys if [p for p in k.split(".") if p.isdigit()] == indices]

    def closeness(key: str) -> tuple[int, int]:
        other = key.split(".")
        n = 0
        while n < min(len(parts), len(other)) and parts[-1 - n] == other[-1 - n]:
            n += 1
        return n, len(set(parts[: len(parts) - n]) & set(other[: len(other) - n]))

    scored = sorted(((closeness(k), k) for k in keys), reverse=True)
    best = [k for c, k in scored if c == scored[0][0]] if scored else []
    if not scored or scored[0][0][0] < need:
        raise AnalysisError(f"{source}: no tensor named {name!r} (nor one ending with "
                            f"{'.'.join(parts[-need:])!r} under other wrapper names)")
    if len(best) > 1:
        raise AnalysisError(f"{source}: {name!r} could be any of {sorted(best)[:5]}")
    return best[0]


def _direction_delta(direction: torch.Tensor, magnitude: torch.Tensor, base: torch.Tensor) -> DecompositionDelta:
    """delta_M and delta_D of W = m * V / ||V|| (row-wise) against W0, without forming W."""
    v, w0, m = direction.double(), base.double(), magnitude.double().reshape(-1)
    n, n0 = v.norm(dim=1), w0.norm(dim=1)
    cos = (v * w0).sum(dim=1) / (n * n0).clamp_min(torch.finfo(torch.float64).tiny)
    return DecompositionDelta((m - n0).abs().mean().item(), (1 - cos).mean().item())


def _lora_update(A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    return scaling * (B.double() @ A.double())


@dataclass
class Checkpoint:
    """One checkpoint to compare with the base: its kind, how to name it, and how to rebuild a layer's weight."""
    path: Path
    kind: str  # "dora-adapter" (ours) | "peft" | "weights" (a full fine-tune or a merged model)
    method: str
    step: int
    modules: list  # module names whose weights the checkpoint changes (all 2-D weights, for "weights")
    tensors: TensorFile
    settings: dict = field(default_factory=dict)  # per module: scaling, magnitude_only / use_dora

    def delta(self, name: str, base: TensorFile, base_key: str) -> DecompositionDelta:
        w0 = base.get(base_key)
        if w0.dim() != 2:
            raise AnalysisError(f"{base.path}: {base_key} has shape {tuple(w0.shape)}, not a 2-D weight")
        if self.kind == "weights":
            key = resolve_key(name + ".weight", self.tensors.keys(), self.path)
            w = self.tensors.get(key)
            if w.shape != w0.shape:
                raise AnalysisError(f"{self.path}: {key} has shape {tuple(w.shape)}, the base's {base_key} "
                                    f"{tuple(w0.shape)}")
            return decomposition_delta(w, w0)
        s = self.settings[name]
        if self.kind == "dora-adapter" and s.get("variant") == "vera":
            return self._vera_delta(name, s, base, base_key, w0)
        if self.kind == "dora-adapter":
            prefix = f"{name}."
            m = self.tensors.get(prefix + "magnitude")
            _check_shape(self.path, name, m.numel(), None, base, base_key, w0)
            v = w0.double()
            if not s.get("magnitude_only"):
                A, B = self.tensors.get(prefix + "lora_A"), self.tensors.get(prefix + "lora_B")
                _check_shape(self.path, name, B.shape[0], A.shape[1], base, base_key, w0)
                v = v + _lora_update(A, B, s["scaling"])
            return _direction_delta(v, m, w0)
        prefix = f"{PEFT_PREFIX}{name}."
        A, B = self.tensors.get(prefix + "lora_A.weight"), self.tensors.get(prefix + "lora_B.weight")
        _check_shape(self.path, name, B.shape[0], A.shape[1], base, base_key, w0)
        v = w0.double() + _lora_update(A, B, s["scaling"])
        if s["use_dora"]:
            key = prefix + "lora_magnitude_vector"
            if key not in self.tensors:
                key += ".weight"
            return _direction_delta(v, self.tensors.get(key), w0)
        return decomposition_delta(v, w0)


    def _vera_delta(self, name: str, s: dict, base, base_key: str, w0: torch.Tensor) -> DecompositionDelta:
        """A VeRA-variant module: W0 + diag(b) B diag(d) A, with the magnitude (DVoRA) or without (plain VeRA); the
        projections from the file, else drawn from their recorded seed (the digest checked)."""
        from .vera import draw_projections, projection_digest
        prefix = f"{name}."
        b, d = self.tensors.get(prefix + "vera_lambda_b").double(), self.tensors.get(prefix + "vera_lambda_d").double()
        _check_shape(self.path, name, b.numel(), None, base, base_key, w0)
        rec = s["projection_record"]
        if rec.get("saved"):
            A, B = self.tensors.get(s["projections"] + ".A"), self.tensors.get(s["projections"] + ".B")
        else:
            A, B = draw_projections(rec["rank"], rec["A_shape"][1], rec["B_shape"][0], rec["seed"])
            if (projection_digest(A), projection_digest(B)) != (rec["sha256_A"], rec["sha256_B"]):
                raise AnalysisError(f"{self.path}: projections {s['projections']} drawn from seed {rec['seed']} differ "
                                    f"from the recorded ones")
        A, B = A[:, : w0.shape[1]].double(), B[: w0.shape[0]].double()
        v = w0.double() + (b[:, None] * B * d) @ A
        if s.get("magnitude", True):
            return _direction_delta(v, self.tensors.get(prefix + "magnitude"), w0)
        return decomposition_delta(v, w0)


def _check_shape(path, name: str, out: int, inp: Optional[int], base, base_key: str, w0: torch.Tensor) -> None:
    """The base weight a module's name resolved to has the adapter's shape (else the names were matched wrongly)."""
    if out != w0.shape[0] or (inp is not None and inp != w0.shape[1]):
        raise AnalysisError(f"{path}: {name} adapts a ({out}, {inp if inp is not None else '?'}) weight, but the "
                            f"base's {base_key} (in {base.path}) is {tuple(w0.shape)}")


def _step_from_path(path: Path) -> Optional[int]:
    found = STEP_PATTERN.findall(str(path))
    return int(found[-1]) if found else None


def open_checkpoint(path: PathLike, method: Optional[str] = None, index: int = 0) -> Checkpoint:
    """Recognise a checkpoint: our adapter directory (dora_config.json), a PEFT LoRA/DoRA adapter
    (adapter_config.json), or weights (a safetensors file, a directory with model.safetensors or a sharded index:
    a full fine-tune, a merged model, or the trainer's snapshot of the trained parameters). The step is the one
    recorded in the checkpoint's metadata, else the last `step-N` / `checkpoint-N` in its path, else its position
    in the list."""
    path = Path(path)
    step = None
    if (path / CONFIG_NAME).is_file():
        config = read_adapter_config(path)
        tensors = TensorFile(path / WEIGHTS_NAME)
        meta = config.get("metadata") or {}
        step = meta.get("step", meta.get("steps"))
        records = config.get("projections", {})
        settings = {n: {"scaling": s["scaling"], "magnitude_only": s["magnitude_only"],
                        "variant": s.get("variant", "lora"), "magnitude": s.get("magnitude", True),
                        "projections": s.get("projections"), "projection_record": records.get(s.get("projections"))}
                    for n, s in config["modules"].items()}
        ckpt = Checkpoint(path, "dora-adapter", method or "DoRA", 0, sorted(settings), tensors, settings)
    elif (path / PEFT_CONFIG_NAME).is_file():
        file = path / PEFT_CONFIG_NAME
        config = json.loads(file.read_text())
        if config.get("peft_type") != "LORA":
            raise AnalysisError(f"{file}: peft_type {config.get('peft_type')!r}; only LoRA / DoRA adapters")
        if config.get("fan_in_fan_out"):
            raise AnalysisError(f"{file}: fan_in_fan_out (Conv1D, (in, out) layout) adapters are not supported")
        if not (path / PEFT_WEIGHTS_NAME).is_file():
            raise AnalysisError(f"{path}: no {PEFT_WEIGHTS_NAME}")
        tensors = TensorFile(path / PEFT_WEIGHTS_NAME)
        use_dora = bool(config.get("use_dora"))
        settings = {}
        for key in tensors.keys():
            m = re.fullmatch(re.escape(PEFT_PREFIX) + r"(.+)\.lora_A\.weight", key)
            if not m:
                continue
            name = m.group(1)
            rank = tensors.shape(key)[0]
            alpha = _peft_pattern_value(config.get("alpha_pattern") or {}, name, config["lora_alpha"])
            scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
            settings[name] = {"scaling": scaling, "use_dora": use_dora}
        if not settings:
            raise AnalysisError(f"{path / PEFT_WEIGHTS_NAME}: no {PEFT_PREFIX}*.lora_A.weight tensors")
        ckpt = Checkpoint(path, "peft", method or ("DoRA" if use_dora else "LoRA"), 0, sorted(settings), tensors,
                          settings)
    else:
        tensors = TensorFile(path)
        step = tensors.metadata().get("step")
        names = [k[: -len(".weight")] for k in tensors.keys() if k.endswith(".weight")]
        ckpt = Checkpoint(path, "weights", method or "FT", 0, sorted(names), tensors)
    if step is None:
        step = _step_from_path(path)
    ckpt.step = int(step) if step is not None else index
    return ckpt


@dataclass(frozen=True)
class LayerDelta:
    method: str
    step: int
    module: str
    delta_m: float
    delta_d: float
    checkpoint: str


def analyse(base: PathLike, checkpoints, modules: str = DEFAULT_MODULES) -> list[LayerDelta]:
    """delta_M and delta_D of every module matching `modules` (full match on the module name) in every checkpoint.
    `checkpoints`: paths, or (method, path) pairs. One layer at a time: nothing model-sized is ever loaded."""
    base_file = TensorFile(base)
    base_keys = set(base_file.keys())
    pattern = re.compile(modules)
    rows = []
    for i, item in enumerate(checkpoints):
        method, path = item if isinstance(item, tuple) else (None, item)
        ckpt = open_checkpoint(path, method, index=i)
        names = [n for n in ckpt.modules if pattern.fullmatch(n)]
        if ckpt.kind == "weights":  # only 2-D weights the base also has (not embeddings of another vocabulary)
            names = [n for n in names if len(ckpt.tensors.shape(n + ".weight")) == 2]
        if not names:
            raise AnalysisError(f"{ckpt.path}: no module matches --modules {modules!r} (its modules: "
                                f"{ckpt.modules[:5]}{'...' if len(ckpt.modules) > 5 else ''})")
        for name in names:
            key = resolve_key(name + ".weight", base_keys, base_file.path)
            d = ckpt.delta(name, base_file, key)
            rows.append(LayerDelta(ckpt.method, ckpt.step, name, d.magnitude, d.direction, str(ckpt.path)))
    return rows


def write_csv(rows, path: PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["method", "step", "module", "delta_m", "delta_d", "checkpoint"])
        for r in rows:
            out.writerow([r.method, r.step, r.module, repr(r.delta_m), repr(r.delta_d), r.checkpoint])
    return path


def read_csv(path: PathLike) -> list[LayerDelta]:
    with open(path, newline="") as f:
        return [LayerDelta(r["method"], int(r["step"]), r["module"], float(r["delta_m"]), float(r["delta_d"]),
                           r["checkpoint"]) for r in csv.DictReader(f)]


@dataclass(frozen=True)
class Fit:
    slope: float  # of delta_M fitted on delta_D by least squares
    correlation: float  # Pearson's r between delta_D and delta_M
    points: int


def fit(rows) -> Fit:
    """Least-squares slope of delta_M on delta_D and their correlation (nan where there is no spread)."""
    x = torch.tensor([r.delta_d for r in rows], dtype=torch.float64)
    y = torch.tensor([r.delta_m for r in rows], dtype=torch.float64)
    if len(rows) < 2:
        return Fit(math.nan, math.nan, len(rows))
    dx, dy = x - x.mean(), y - y.mean()
    sxx, syy, sxy = (dx * dx).sum().item(), (dy * dy).sum().item(), (dx * dy).sum().item()
    slope = sxy / sxx if sxx > 0 else math.nan
    corr = sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else math.nan
    return Fit(slope, corr, len(rows))


def by_method(rows) -> dict[str, list]:
    groups: dict[str, list] = {}
    for r in rows:
        groups.setdefault(r.method, []).append(r)
    order = {m: i for i, m in enumerate(METHOD_ORDER)}
    return dict(sorted(groups.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0])))


def plot(rows, path: PathLike, title: Optional[str] = None) -> Path:
    """One panel per method: delta_D (x) against delta_M (y), a point per layer and step, coloured by step, with
    the fitted line, its slope and the correlation, as in the paper's figure 2."""
    import matplotlib
    matplotlib.use("Agg")  # files only: no display on training machines
    import matplotlib.pyplot as plt

    groups = by_method(rows)
    steps = sorted({r.step for r in rows})
    cmap = plt.get_cmap("viridis")
    colour = {s: cmap(i / max(1, len(steps) - 1)) for i, s in enumerate(steps)}
    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 3.8), squeeze=False)
    for ax, (method, group) in zip(axes[0], groups.items()):
        for s in steps:
            pts = [r for r in group if r.step == s]
            if pts:
                ax.scatter([r.delta_d for r in pts], [r.delta_m for r in pts], color=colour[s], s=18,
                           label=f"step {s}", edgecolors="none")
        f = fit(group)
        if math.isfinite(f.slope):
            xs = [min(r.delta_d for r in group), max(r.delta_d for r in group)]
            mean_x = sum(r.delta_d for r in group) / len(group)
            mean_y = sum(r.delta_m for r in group) / len(group)
            ax.plot(xs, [mean_y + f.slope * (x - mean_x) for x in xs], color="crimson", lw=1)
        ax.set_title(f"{method}: slope {f.slope:.3g}, r = {f.correlation:.2f}", fontsize=10)
        ax.set_xlabel("ΔD (mean 1 − cos)")
        ax.set_ylabel("ΔM (mean |Δ‖W‖|)")
        ax.ticklabel_format(style="sci", scilimits=(-2, 3))
        ax.legend(fontsize=7, loc="best")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _parse_checkpoint_arg(arg: str):
    """METHOD=PATH names the panel (a merged DoRA model would otherwise count as full fine-tuning)."""
    label, sep, rest = arg.partition("=")
    if sep and label and "/" not in label and not Path(arg).exists():
        return label, rest
    return arg


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m dora.analysis",
        description="Weight-decomposition analysis (DoRA paper, section 2.2): delta_M and delta_D of each layer "
                    "and checkpoint against the pre-trained weights, as a CSV and a scatter plot per method.")
    parser.add_argument("--base", required=True, help="pre-trained weights: a safetensors file, a sharded index, "
                        "or a directory with model.safetensors(.index.json)")
    parser.add_argument("--checkpoints", nargs="+", required=True, metavar="[METHOD=]CKPT",
                        help="our adapter directories, PEFT LoRA/DoRA adapters, or weights (full fine-tune, merged "
                             "model, trainer snapshot); METHOD= names the panel (default: DoRA, LoRA or FT by kind)")
    parser.add_argument("--modules", default=DEFAULT_MODULES,
                        help=f"regex, full match on module names (default {DEFAULT_MODULES!r}: query and value)")
    parser.add_argument("--out", required=True, help="directory for decomposition.csv, decomposition.png, "
                        "summary.json")
    parser.add_argument("--title", default=None)
    args = parser.parse_args(argv)
    try:
        rows = analyse(args.base, [_parse_checkpoint_arg(c) for c in args.checkpoints], args.modules)
    except (AdapterError, AnalysisError) as e:  # the project's one style: one line, exit status 2
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    write_csv(rows, out / "decomposition.csv")
    plot(rows, out / "decomposition.png", args.title)
    summary = {}
    for method, group in by_method(rows).items():
        f = fit(group)
        steps = sorted({r.step for r in group})
        # across steps both deltas grow with training; within one step the layers alone set the slope
        per_step = {s: fit([r for r in group if r.step == s]) for s in steps}
        summary[method] = {"slope": f.slope, "correlation": f.correlation, "points": f.points, "steps": steps,
                           "modules": len({r.module for r in group}),
                           "per_step": {str(s): {"slope": p.slope, "correlation": p.correlation}
                                        for s, p in per_step.items()}}
        print(f"{method:>6}: slope {f.slope:.4g}  correlation {f.correlation:.3f}  ({f.points} points: "
              f"{summary[method]['modules']} modules x {len(steps)} steps); within each step: "
              + ", ".join(f"{s}: {p.slope:.3g} (r {p.correlation:.2f})" for s, p in per_step.items()))
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"wrote {out / 'decomposition.csv'}, {out / 'decomposition.png'}, {out / 'summary.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
