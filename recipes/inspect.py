"""What to adapt in a vision-language model: its Linear layers as patterns, its parts, and a ready `dora:` section.

    python -m recipes.inspect MODEL_DIR_OR_CONFIG_JSON [--rank 128 --alpha 256 --dropout 0.05] [--out dora.yaml]

The model is built from its config on the meta device (no weights read or allocated: a 70B config inspects on a
laptop in seconds) with transformers' AutoModelForImageTextToText, so any family transformers knows works.
Printed:
- every nn.Linear, collapsed into patterns (layer indices -> \\d+, siblings -> (q|k|v|o)_proj) with count, shapes
  (out x in) and parameters, and the part each belongs to: language model, vision tower or connector (the part is
  read from the module names, by the small table PARTS below);
- the parameters that are in no Linear, Embedding or norm layer (LLaVA-NeXT's `image_newline`, a SigLIP
  probe, ...): the family's own training may train them, so they are listed for you to decide;
- the LLaVA-style choice as a `dora:` config section: DoRA on the language model's attention and MLP
  projections (not lm_head), the connector trained fully, the vision tower frozen; applied to the meta model to
  report the trainable share exactly as training will.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from recipes.config import ConfigError
from recipes.preflight import check_model, remote_code_refused

# Part of a module, from its qualified name: first match wins (a connector can sit inside the vision tower, as
# Qwen2-VL's visual.merger does). Names as transformers' families spell them.
PARTS = (
    ("connector", r"(multi_modal_projector|connector|mm_projector|merger|deepstack_merger_list|qformer|query_tokens"
                  r"|language_projection|image_to_text_projection|vision_adapter)"),
    ("vision tower", r"(vision_tower|visual|vision_model|vision_encoder|image_encoder)"),
    ("language model", r"(language_model|text_model|lm_head)"),
)
INDEX = r"\d+"


class InspectError(ValueError):
    pass


def part_of(name: str) -> str:
    components = name.split(".")
    for part, pattern in PARTS:
        if any(re.fullmatch(pattern, c) for c in components):
            return part
    return "other"


def part_prefix(name: str, part: str) -> Optional[str]:
    """The module path up to the component that names `part` (e.g. model.visual.merger)."""
    pattern = dict(PARTS)[part]
    components = name.split(".")
    for i, c in enumerate(components):
        if re.fullmatch(pattern, c):
            return ".".join(components[: i + 1])
    return None


@dataclass
class Pattern:
    regex: str  # matches the qualified module names (re.fullmatch)
    part: str
    names: list = field(default_factory=list)
    shapes: set = field(default_factory=set)
    parameters: int = 0


def _generalise(name: str) -> str:
    return r"\.".join(INDEX if c.isdigit() else re.escape(c) for c in name.split("."))


def _alternation(leaves: list[str]) -> str:
    """q_proj k_proj v_proj -> (q|k|v)_proj; fc1 fc2 -> (fc1|fc2); one leaf -> itself."""
    if len(leaves) == 1:
        return re.escape(leaves[0])
    parts = [leaf.split("_") for leaf in leaves]
    suffix = []
    while all(len(p) > len(suffix) + 1 for p in parts) and len({p[-1 - len(suffix)] for p in parts}) == 1:
        suffix.insert(0, parts[0][-1 - len(suffix)])
    heads = ["_".join(p[: len(p) - len(suffix)]) for p in parts]
    tail = ("_" + "_".join(suffix)) if suffix else ""
    return "(" + "|".join(re.escape(h) for h in heads) + ")" + re.escape(tail)


def plain_linear(module: nn.Module) -> bool:
    """An nn.Linear that computes x W^T + b: DoRA can stand in for it (a subclass with its own forward, such as a
    MoE router returning (scores, logits), cannot)."""
    return isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward


def linear_patterns(model: nn.Module) -> list[Pattern]:
    """The model's plain nn.Linear modules grouped: indices generalised, then siblings under one parent merged."""
    by_regex: "OrderedDict[str, Pattern]" = OrderedDict()
    for name, module in model.named_modules():
        if plain_linear(module):
            regex = _generalise(name)
            p = by_regex.setdefault(regex, Pattern(regex, part_of(name)))
            p.names.append(name)
            p.shapes.add((module.out_features, module.in_features))
            p.parameters += sum(t.numel() for t in module.parameters(recurse=False))
    merged: "OrderedDict[tuple, list[tuple[str, Pattern]]]" = OrderedDict()
    for regex, p in by_regex.items():
        parent, _, leaf = regex.rpartition(r"\.")
        merged.setdefault((parent, p.part), []).append((leaf.replace("\\", ""), p))
    out = []
    for (parent, part), group in merged.items():
        leaves = [leaf for leaf, _ in group]
        if any(leaf == INDEX.replace("\\", "") or not re.fullmatch(r"\w+", leaf) for leaf in leaves):
            out.extend(p for _, p in group)  # numbered leaves (mlp.0, mlp.2): keep them apart
            continue
        regex = (parent + r"\." if parent else "") + _alternation(leaves)
        p = Pattern(regex, part)
        for _, q in group:
            p.names += q.names
            p.shapes |= q.shapes
            p.parameters += q.parameters
        out.append(p)
    return out


def free_parameters(model: nn.Module) -> list[tuple[str, tuple, str]]:
    """(name, shape, part) of parameters held by a module that also has children (not a Linear, Embedding or
    norm layer's own weight): learned tokens, probes, position tables a family may train."""
    out = []
    for module_name, module in model.named_modules():
        if plain_linear(module) or isinstance(module, nn.Embedding) or not any(True for _ in module.children()):
            continue
        for pname, p in module.named_parameters(recurse=False):
            name = f"{module_name}.{pname}" if module_name else pname
            out.append((name, tuple(p.shape), part_of(name)))
    return out


def remote_code_error(source: str) -> InspectError:
    return InspectError(f"{source} needs the code in its own repository to be built (transformers does not know "
                        f"its model type): rerun with --trust-remote-code if you trust that code")


def load_config(source: str, trust_remote_code: bool = False):
    from transformers import AutoConfig

    path = Path(source)
    if path.is_file() and not trust_remote_code:  # a config.json on its own (remote code needs its folder)
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "config.json").write_text(path.read_text(encoding="utf-8"), encoding="utf-8")
            try:
                return AutoConfig.from_pretrained(tmp)
            except ValueError as e:
                if remote_code_refused(e):
                    raise remote_code_error(source) from None
                raise
    if path.is_dir() and not (path / "config.json").is_file():
        raise InspectError(f"{path}: no config.json")
    try:
        return AutoConfig.from_pretrained(str(path.parent) if path.is_file() else source,
                                          trust_remote_code=trust_remote_code)
    except ValueError as e:
        if remote_code_refused(e):
            raise remote_code_error(source) from None
        raise


def build_on_meta(config, trust_remote_code: bool = False) -> nn.Module:
    from transformers import AutoModelForImageTextToText

    try:
        with torch.device("meta"):
            return AutoModelForImageTextToText.from_config(config, trust_remote_code=trust_remote_code)
    except ValueError as e:
        if remote_code_refused(e):
            raise remote_code_error(getattr(config, "_name_or_path", "") or config.model_type) from None
        raise InspectError(f"{type(config).__name__} ({config.model_type}) is not an image-text-to-text model "
                           f"transformers knows: {e}") from None


def propose(patterns: list[Pattern], free: list[tuple], rank: int, alpha: float, dropout: float) -> dict:
    """The LLaVA-style `dora:` section: DoRA on the language model's per-layer Linear layers, connector trained."""
    layered = [p for p in patterns if p.part == "language model" and INDEX in p.regex]
    if not layered:
        raise InspectError("no per-layer Linear layers in a part named as a language model (see PARTS)")
    stems = OrderedDict()
    for p in layered:
        stem, _, rest = p.regex.partition(r"\." + INDEX + r"\.")
        stems.setdefault(stem, []).append(rest)
    rules = []
    for stem, rests in stems.items():
        body = rests[0] if len(rests) == 1 else "(" + "|".join(rests) + ")"
        rules.append({"match": stem + r"\." + INDEX + r"\." + body, "rank": rank, "alpha": alpha, "dropout": dropout})
    connectors = OrderedDict()
    for p in patterns:
        if p.part == "connector":
            connectors[re.escape(part_prefix(p.names[0], "connector")) + r"\..*"] = None
    for name, _, part in free:
        if part == "connector":
            prefix = part_prefix(name, "connector")
            # a bare parameter (BLIP-2's query_tokens) is its own pattern; a module's parameters are under it
            connectors[re.escape(prefix) + ("" if prefix == name else r"\..*")] = None
    return {"rules": rules, "train_fully": list(connectors)}


def to_yaml(section: dict, free: list[tuple]) -> str:
    lines = ["dora:", "  rules:"]
    if not section["train_fully"]:
        lines.insert(0, "# no connector found by name (recipes/inspect.py PARTS): add the layers that join the vision "
                        "tower to the language model to train_fully")
    for r in section["rules"]:
        lines += [f"    - match: '{r['match']}'", f"      rank: {r['rank']}", f"      alpha: {r['alpha']}",
                  f"      dropout: {r['dropout']}"]
    lines.append("  train_fully:" + ("" if section["train_fully"] else " []"))
    lines += [f"    - '{p}'" for p in section["train_fully"]]
    undecided = OrderedDict()  # one line per pattern: a 48-layer MoE's experts are one line, not 96
    for name, shape, part in free:
        if part != "vision tower" and not any(re.fullmatch(p, name) for p in section["train_fully"]):
            undecided.setdefault(_generalise(name), (part, list(shape)))
    for regex, (part, shape) in undecided.items():
        lines.append(f"    # - '{regex}'    # {part}, {shape}, in no Linear: train it if the family's own recipe does")
    return "\n".join(lines) + "\n"


def inspect_model(source: str, rank: int = 128, alpha: float = 256, dropout: float = 0.05,
                  trust_remote_code: bool = False) -> dict:
    from dora import apply_dora

    config = load_config(source, trust_remote_code)
    model = build_on_meta(config, trust_remote_code)
    total = sum(p.numel() for p in model.parameters())
    patterns = linear_patterns(model)
    free = free_parameters(model)
    special = [(n, type(m).__name__) for n, m in model.named_modules() if isinstance(m, nn.Linear)
               and not plain_linear(m)]
    parts = OrderedDict()
    for name, p in model.named_parameters():
        key = part_of(name)
        parts[key] = parts.get(key, 0) + p.numel()
    section = propose(patterns, free, rank, alpha, dropout)
    # applied to the meta model: the trainable count training will report (adapter parameters included)
    report = apply_dora(model, section["rules"], section["train_fully"], verbose=False)
    return {"model": type(model).__name__, "config": config, "total": total, "patterns": patterns, "free": free,
            "special": special,
            "parts": parts, "section": section, "yaml": to_yaml(section, free), "report": report}


def _shapes(shapes: set) -> str:
    text = ", ".join(f"{o}x{i}" for o, i in sorted(shapes))
    return text if len(text) <= 28 else text[:25] + "..."


def print_inspection(result: dict, out=None) -> None:
    w = (out or sys.stdout).write
    w(f"{result['model']}: {result['total']:,} parameters (built on the meta device: no weights)\n\n")
    w(f"{'Linear layers':<72} {'part':<15} {'count':>6} {'out x in':<28} {'parameters':>15}\n")
    for p in result["patterns"]:
        regex = p.regex if len(p.regex) <= 72 else p.regex[:69] + "..."
        w(f"{regex:<72} {p.part:<15} {len(p.names):>6} {_shapes(p.shapes):<28} {p.parameters:>15,}\n")
    w("\nparts: " + ", ".join(f"{k} {v:,}" for k, v in result["parts"].items()) + "\n")
    if result["special"]:
        w("\nnn.Linear subclasses with their own forward (a DoRA layer cannot stand in for them; left out):\n")
        for name, cls in result["special"][:8]:
            w(f"  {name:<60} {cls}\n")
        if len(result["special"]) > 8:
            w(f"  ... {len(result['special']) - 8} more\n")
    if result["free"]:
        w("\nparameters in no Linear, Embedding or norm layer (the family's recipe may train them: decide):\n")
        for name, shape, part in result["free"]:
            w(f"  {name:<60} {part:<15} {list(shape)}\n")
    w("\nproposed (LLaVA-style: DoRA on the language model's attention and MLP, connector trained, tower frozen):\n\n")
    w(result["yaml"])
    report = result["report"]
    w(f"\nwith this dora: section: {report.trainable:,} trainable of {report.total:,} parameters "
      f"({report.share:.3%}; the total includes the {report.total - result['total']:,} adapter parameters the "
      f"section adds to the model's {result['total']:,})\n")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recipes.inspect", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a model folder (with config.json), a config.json, or a hub id in the cache")
    parser.add_argument("--rank", type=int, default=128, help="LLaVA-1.5 DoRA: 128")
    parser.add_argument("--alpha", type=float, default=256, help="LLaVA-1.5 DoRA: 256")
    parser.add_argument("--dropout", type=float, default=0.05, help="LLaVA-1.5 DoRA: 0.05")
    parser.add_argument("--out", type=Path, help="write the proposed dora: section to this YAML file")
    parser.add_argument("--json", action="store_true", help="print the patterns and proposal as JSON")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="build a model whose code comes with its checkpoint (Phi-3.5-vision, InternVL2): runs "
                             "that code; training it needs model.trust_remote_code: true")
    args = parser.parse_args(argv)
    try:
        check_model("model", args.model)
        result = inspect_model(args.model, args.rank, args.alpha, args.dropout, args.trust_remote_code)
    except (InspectError, ConfigError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"model": result["model"], "parameters": result["total"], "parts": result["parts"],
                          "patterns": [{"regex": p.regex, "part": p.part, "count": len(p.names),
                                        "shapes": sorted(p.shapes), "parameters": p.parameters}
                                       for p in result["patterns"]],
                          "free": [{"name": n, "shape": list(s), "part": part} for n, s, part in result["free"]],
                          "dora": result["section"], "trainable": result["report"].trainable}, indent=1))
    else:
        print_inspection(result)
    if args.out:
        args.out.write_text(result["yaml"], encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
