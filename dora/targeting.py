"""Declarative targeting: which modules get DoRA, which parameters train fully, everything else frozen.

A rule is plain data, as a YAML config holds it:

    rules:
      - match: 'model\\.language_model\\.layers\\.\\d+\\..*_proj'   # regex, full match on the module name
        rank: 128
        alpha: 256
        dropout: 0.05
    train_fully:
      - 'model\\.multi_modal_projector\\..*'                     # regex, full match on the parameter name

The first rule whose pattern matches a module's qualified name wins. A rule that matches nothing, or that
matches a module that is not an nn.Linear or belongs to a PEFT adapter layer (a get_peft_model() model: DoRA
would stack a second adapter there), is an error naming the rule; so is a `train_fully` pattern that
matches no parameter, or that matches an adapted module's frozen weight or its adapter parameters (lora_A,
lora_B, magnitude: the rules train those). New DoRA layers take the training / eval mode of the Linear layers
they replace.

`variant: vera` gives a rule VeRA's update (dora/vera.py): DVoRA, or plain VeRA with `magnitude: false` (the
baseline). Its options: `d_initial` (0.1), `projection_seed` (0), `save_projection` (true: adapter files carry the
projections; false: they are regenerated from the seed on load and checked against a recorded digest). Every VeRA
layer with the same rank and seed shares one pair of projections, sized to the largest in / out among them.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence, Union

import torch.nn as nn

from .layer import DROPOUT_MODES, DoRALinear, _validated_alpha, _validated_rank
from .quantized import QuantizedDoRALinear, is_quantized_linear
from .vera import VeRALinear, VeRAProjections, _validated_d_initial, _validated_seed

VARIANTS = ("lora", "vera")  # the update in the direction: LoRA's s*B@A, or VeRA's diag(b) B diag(d) A
_VERA_ONLY = ("d_initial", "projection_seed", "save_projection")


class TargetingError(ValueError):
    """A targeting rule or train_fully pattern that cannot be applied as written."""


@dataclass(frozen=True)
class DoRARule:
    match: str
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    dropout_mode: str = "exact"
    magnitude_only: bool = False
    detach_norm: bool = True
    rslora: bool = False
    inplace_safe: bool = False
    variant: str = "lora"
    magnitude: bool = True  # false: no magnitude, W' = W0 + delta W (plain VeRA, the baseline; variant vera only)
    d_initial: float = 0.1
    projection_seed: int = 0
    save_projection: bool = True

    def __post_init__(self):
        try:
            re.compile(self.match)
        except re.error as e:
            raise TargetingError(f"rule {self.match!r}: invalid regular expression ({e})") from None
        if self.dropout_mode not in DROPOUT_MODES:
            raise TargetingError(f"rule {self.match!r}: dropout_mode must be one of {DROPOUT_MODES}")
        if not self.magnitude_only:  # rank and alpha as DoRALinear takes them, the error naming the rule
            try:
                _validated_rank(self.rank)
                _validated_alpha(self.alpha)
            except (TypeError, ValueError) as e:
                raise TargetingError(f"rule {self.match!r}: {e}") from None
        if not 0.0 <= self.dropout < 1.0:
            raise TargetingError(f"rule {self.match!r}: dropout must be in [0, 1)")
        if self.variant not in VARIANTS:
            raise TargetingError(f"rule {self.match!r}: variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.variant == "vera":
            if self.magnitude_only:
                raise TargetingError(f"rule {self.match!r}: variant vera has a direction update; magnitude_only "
                                     f"rules take no variant")
            if self.rslora:
                raise TargetingError(f"rule {self.match!r}: rslora scales LoRA's B A; VeRA has no scale (d is "
                                     f"trained)")
            try:
                _validated_d_initial(self.d_initial)
                _validated_seed(self.projection_seed)
            except (TypeError, ValueError) as e:
                raise TargetingError(f"rule {self.match!r}: {e}") from None
        else:
            if not self.magnitude:
                raise TargetingError(f"rule {self.match!r}: magnitude: false (no decomposition) is for variant "
                                     f"vera, plain VeRA; plain LoRA is the recipes' method: lora (PEFT)")
            changed = [k for k in _VERA_ONLY if getattr(self, k) != DoRARule.__dataclass_fields__[k].default]
            if changed:
                raise TargetingError(f"rule {self.match!r}: {changed} apply to variant vera only")

    @classmethod
    def from_dict(cls, data: Mapping) -> "DoRARule":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            close = {k: difflib.get_close_matches(k, sorted(known), n=1) for k in sorted(unknown)}
            names = ", ".join(repr(k) + (f" (did you mean {c[0]!r}?)" if c else "") for k, c in close.items())
            raise TargetingError(f"rule {dict(data)}: unknown keys {names}; known keys: {sorted(known)}")
        if "match" not in data:
            raise TargetingError(f"rule {dict(data)}: missing 'match'")
        return cls(**data)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def layer_options(self) -> dict:
        options = {k: v for k, v in self.to_dict().items() if k not in ("match", "rank", "alpha", "variant")}
        if self.variant == "vera":
            for key in ("magnitude_only", "rslora"):
                options.pop(key)
        else:
            for key in ("magnitude",) + _VERA_ONLY:
                options.pop(key)
        return options

    @property
    def kind(self) -> str:
        if self.variant == "vera":
            return "dvora" if self.magnitude else "vera"
        return "magnitude-only" if self.magnitude_only else "dora"

    def adapter_parts(self) -> tuple:
        """The names of the trained tensors of a module this rule adapts."""
        if self.variant == "vera":
            return ("vera_lambda_b", "vera_lambda_d") + (("magnitude",) if self.magnitude else ())
        return ("magnitude",) if self.magnitude_only else ("lora_A", "lora_B", "magnitude")


RuleLike = Union[DoRARule, Mapping]


@dataclass
class RuleReport:
    pattern: str
    kind: str  # "dora", "magnitude-only", "dvora", "vera" or "train fully"
    matched: list[str] = field(default_factory=list)
    trainable: int = 0


@dataclass
class DoRAReport:
    """What apply_dora did: per rule the matched names and trainable parameters, and the totals."""

    rows: list[RuleReport]
    trainable: int
    total: int

    @property
    def share(self) -> float:
        return self.trainable / self.total if self.total else 0.0

    def table(self) -> str:
        lines = [f"{'pattern':<60} {'kind':<15} {'matched':>8} {'trainable':>14} {'share':>8}"]
        for r in self.rows:
            pattern = r.pattern if len(r.pattern) <= 60 else r.pattern[:57] + "..."
            share = r.trainable / self.total if self.total else 0.0
            lines.append(f"{pattern:<60} {r.kind:<15} {len(r.matched):>8} {r.trainable:>14,} {share:>8.3%}")
        lines.append(f"{'total':<60} {'':<15} {'':>8} {self.trainable:>14,} {self.share:>8.3%}"
                     f"   (of {self.total:,} parameters)")
        return "\n".join(lines)


@dataclass(frozen=True)
class DoRASpec:
    """The rules and train_fully patterns a model was adapted with (kept on the model for saving)."""

    rules: tuple[DoRARule, ...]
    train_fully: tuple[str, ...]

    def to_dict(self) -> dict:
        return {"rules": [r.to_dict() for r in self.rules], "train_fully": list(self.train_fully)}

    @classmethod
    def from_dict(cls, data: Mapping) -> "DoRASpec":
        return cls(tuple(_as_rule(r) for r in data.get("rules", [])), tuple(data.get("train_fully", [])))


SPEC_ATTRIBUTE = "dora_spec"


def _as_rule(rule: RuleLike) -> DoRARule:
    return rule if isinstance(rule, DoRARule) else DoRARule.from_dict(rule)


def _numel(p) -> int:
    # DeepSpeed ZeRO-3 partitions parameters: the full size is in ds_numel.
    return getattr(p, "ds_numel", p.numel())


def dora_modules(model: nn.Module) -> dict[str, DoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, DoRALinear)}


def apply_dora(
    model: nn.Module,
    rules: Sequence[RuleLike],
    train_fully: Iterable[str] = (),
    *,
    verbose: bool = True,
) -> DoRAReport:
    """Replace the nn.Linear modules the rules select by DoRALinear, in place, and set what trains.

    Everything not selected by a rule (adapter parameters) or by a `train_fully` pattern is frozen.
    Returns a DoRAReport (printed when `verbose`).
    """
    rules = [_as_rule(r) for r in rules]
    train_fully = [str(p) for p in train_fully]
    if not rules and not train_fully:
        raise TargetingError("apply_dora needs at least one rule or train_fully pattern")
    if dora_modules(model):
        raise TargetingError("the model already has DoRA modules; apply_dora was called twice")
    compiled = [re.compile(r.match) for r in rules]
    for pattern in train_fully:
        try:
            re.compile(pattern)
        except re.error as e:
            raise TargetingError(f"train_fully pattern {pattern!r}: invalid regular expression ({e})") from None

    # 1. Decide, before changing anything, so that an error leaves the model untouched.
    chosen: list[tuple[str, nn.Linear, int]] = []
    modules = dict(model.named_modules())
    for name, module in modules.items():
        if not name:
            continue  # the model itself
        for i, regex in enumerate(compiled):
            if regex.fullmatch(name):
                peft_layer = _peft_layer_of(modules, name)
                if peft_layer is not None:
                    where = (f"a PEFT adapter layer ({type(module).__name__})" if peft_layer == name else
                             f"part of PEFT's adapter layer {peft_layer!r}")
                    raise TargetingError(
                        f"rule {i} (match={rules[i].match!r}) matches {name!r}, {where}: DoRA there would stack a "
                        f"second adapter on PEFT's; apply DoRA to the base model, not to a get_peft_model() one "
                        f"(or fold PEFT's adapter in first: merge_and_unload())")
                if not isinstance(module, nn.Linear):
                    raise TargetingError(
                        f"rule {i} (match={rules[i].match!r}) matches {name!r}, a {type(module).__name__}; "
                        f"DoRA rules must select nn.Linear modules only")
                # a Linear subclass with its own forward: a MoE router returning (scores, logits) is refused; a
                # quantized Linear (bitsandbytes) is wrapped through its own forward (dora/quantized.py)
                if type(module).forward is not nn.Linear.forward and not is_quantized_linear(module):
                    raise TargetingError(
                        f"rule {i} (match={rules[i].match!r}) matches {name!r}, a {type(module).__name__}: an "
                        f"nn.Linear subclass with its own forward, which a DoRA layer would replace by a plain "
                        f"linear map; leave it out of the rule")
                if isinstance(_parent(model, name)[0], nn.MultiheadAttention):
                    raise TargetingError(
                        f"rule {i} (match={rules[i].match!r}) matches {name!r}, the output projection of an "
                        f"nn.MultiheadAttention, which reads its weight directly and would ignore the adapter")
                chosen.append((name, module, i))
                break
    rows = [RuleReport(r.match, r.kind) for r in rules]
    for name, _, i in chosen:
        rows[i].matched.append(name)
    empty = [f"rule {i} (match={r.match!r})" for i, r in enumerate(rules) if not rows[i].matched]
    if empty:
        raise TargetingError(f"{', '.join(empty)} matched no module of {type(model).__name__}")

    # The parameter names the model will have; train_fully patterns are checked against them up front.
    chosen_names = {name for name, _, _ in chosen}
    adapter_names = {f"{n}.{part}" for n, _, i in chosen for part in rules[i].adapter_parts()}
    future = [n for n, _ in model.named_parameters()] + sorted(adapter_names)
    fully: dict[str, list[str]] = {}
    for pattern in train_fully:
        regex = re.compile(pattern)
        names = [n for n in future if regex.fullmatch(n)]
        if not names:
            raise TargetingError(f"train_fully pattern {pattern!r} matched no parameter of {type(model).__name__}")
        clash = [n for n in names if n.endswith(".weight") and n[: -len(".weight")] in chosen_names]
        if clash:
            raise TargetingError(f"train_fully pattern {pattern!r} matches the frozen base weight of DoRA "
                                 f"module(s) {clash[:3]}; a module is either adapted or trained fully")
        adapter = [n for n in names if n in adapter_names]
        if adapter:
            raise TargetingError(f"train_fully pattern {pattern!r} matches DoRA adapter parameter(s) "
                                 f"{adapter[:3]}; the rules train those already")
        fully[pattern] = names

    projections = _shared_projections(rules, chosen)  # (may refuse a rule: still before any change)

    # 2. Freeze everything, then swap in DoRA layers (they take over the Linear's weight and bias, and its
    #    training / eval mode; their adapter parameters are new, so they require grad).
    for p in model.parameters():
        p.requires_grad_(False)
    for name, linear, i in chosen:
        rule = rules[i]
        options = rule.layer_options()
        if rule.variant == "vera":
            kind = VeRALinear
            options["projections"] = projections[rule.rank, rule.projection_seed]
        else:
            kind = QuantizedDoRALinear if is_quantized_linear(linear) else DoRALinear
        layer = kind.from_linear(linear, rule.rank, rule.alpha, **options)
        setattr(*_parent(model, name), layer)
    for row in rows:
        row.trainable = sum(_numel(p) for n in row.matched for p in _adapter_parameters(model.get_submodule(n)))

    # 3. Parameters trained fully.
    params = dict(model.named_parameters())
    counted: set[str] = set()
    for pattern, names in fully.items():
        fresh = [n for n in names if n not in counted]
        counted.update(names)
        rows.append(RuleReport(pattern, "train fully", names, sum(_numel(params[n]) for n in fresh)))
        for n in names:
            params[n].requires_grad_(True)

    setattr(model, SPEC_ATTRIBUTE, DoRASpec(tuple(rules), tuple(train_fully)))
    report = DoRAReport(rows, trainable=sum(_numel(p) for p in model.parameters() if p.requires_grad),
                        total=sum(_numel(p) for p in model.parameters()))
    if verbose:
        print(report.table())
    return report


# What a PEFT tuner layer holds (its wrapped layer, its adapters' modules): a module on such a path belongs to it.
_PEFT_PARTS = {"base_layer", "lora_A", "lora_B", "lora_magnitude_vector", "lora_embedding_A", "lora_embedding_B"}


def _peft_layer_of(modules: Mapping[str, nn.Module], name: str):
    """The name of the PEFT tuner layer (LoraLayer and its kin, told by their BaseTunerLayer base: peft itself is
    not imported) that is `name` or holds it, or the path before a PEFT part name such as base_layer; else None."""
    parts = name.split(".")
    for end in range(1, len(parts) + 1):
        prefix = ".".join(parts[:end])
        if any(c.__name__ == "BaseTunerLayer" for c in type(modules.get(prefix)).__mro__):
            return prefix
        if end < len(parts) and parts[end] in _PEFT_PARTS:
            return prefix
    return None


def _shared_projections(rules, chosen) -> dict:
    """One VeRAProjections per (rank, projection_seed) of the VeRA rules, sized to the largest in / out of the
    modules they adapt, on the device of the first of them."""
    sizes, devices = {}, {}
    for _, linear, i in chosen:
        rule = rules[i]
        if rule.variant != "vera":
            continue
        key = (rule.rank, rule.projection_seed)
        if is_quantized_linear(linear):
            raise TargetingError(f"rule {i} (match={rule.match!r}): variant vera on a quantized Linear is not "
                                 f"supported; use a LoRA-variant rule (QDoRA) there")
        in_f, out_f = sizes.get(key, (0, 0))
        sizes[key] = (max(in_f, linear.in_features), max(out_f, linear.out_features))
        devices.setdefault(key, linear.weight.device)
    return {key: VeRAProjections(key[0], in_f, out_f, key[1], device=devices[key])
            for key, (in_f, out_f) in sizes.items()}


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The module that holds the submodule `name`, and its attribute name there."""
    parent, _, child = name.rpartition(".")
    return (model.get_submodule(parent) if parent else model), child


def _adapter_parameters(module: DoRALinear) -> list[nn.Parameter]:
    return list(module.adapter_parameters().values())


def get_spec(model: nn.Module) -> DoRASpec:
    spec = getattr(model, SPEC_ATTRIBUTE, None)
    if spec is None:
        raise TargetingError(f"{type(model).__name__} has no DoRA spec: call apply_dora (or load_adapter) first")
    return spec


def train_fully_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters the model's train_fully patterns select, by name."""
    patterns = [re.compile(p) for p in get_spec(model).train_fully]
    return {n: p for n, p in model.named_parameters() if any(r.fullmatch(n) for r in patterns)}


def merge_dora(model: nn.Module) -> nn.Module:
    """Merge every DoRA layer: W <- g * (W0 + sBA). Outputs are unchanged; unmerge_dora undoes it."""
    for module in dora_modules(model).values():
        module.merge()
    return model


def unmerge_dora(model: nn.Module) -> nn.Module:
    for module in dora_modules(model).values():
        module.unmerge()
    return model


def invalidate_norm_caches(model: nn.Module) -> nn.Module:
    """Forget the cached norms of every DoRA layer. Needed only after writing weights, lora_A, lora_B or
    magnitudes through `.data` outside an optimizer step (see DoRALinear)."""
    for module in dora_modules(model).values():
        module.invalidate_norm_cache()
    return model


def unload_dora(model: nn.Module) -> nn.Module:
    """Merge and replace every DoRALinear by a plain nn.Linear: a model that no longer needs this library.

    The new Linear layers are as nn.Linear makes them: their weight and bias require grad. They keep the
    training / eval mode of the layers they replace; the rest of the model keeps its requires_grad flags.
    """
    for name, module in dora_modules(model).items():
        linear = module.to_linear()
        for p in linear.parameters():
            p.requires_grad_(True)
        setattr(*_parent(model, name), linear)
    if hasattr(model, SPEC_ATTRIBUTE):
        delattr(model, SPEC_ATTRIBUTE)
    return model
