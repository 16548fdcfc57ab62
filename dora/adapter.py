"""Saving and loading DoRA adapters: our own format (nothing lost) and PEFT's (for interop).

Our format, a directory with
    dora_config.json          the rules and train_fully patterns, every adapted module's settings
    dora_adapter.safetensors  {module}.lora_A / .lora_B / .magnitude, and every train_fully parameter
Both files are written in full under temporary names and then renamed, and both carry the same save id
(format_version 2): a crash never leaves a half-written file, and a crash between the two renames (new
tensors, old config) is refused on load instead of mixing two saves. Adapters of format_version 1 (no save id)
still load.

PEFT's format (`export_peft` / `import_peft`): adapter_config.json + adapter_model.safetensors, readable by
`peft.PeftModel.from_pretrained(base, dir)` with use_dora. Magnitude-only modules are exported as rank-1 DoRA
modules with A = B = 0, which PEFT evaluates to exactly (m / ||W0||) W0 x.

VeRA-variant modules (dora/vera.py) save vera_lambda_b, vera_lambda_d (and the magnitude, DVoRA); their shared
projections are written once per group as `vera_projections.r{rank}.seed{seed}.A` / `.B` (save_projection), and
the config records each group's seed, shapes and the sha256 of what the seed draws. On load the projections are
regenerated from the seed and checked against the file's, or against the recorded digest where the file has none:
an adapter is never applied with other projections than it was trained with. Plain VeRA (magnitude: false)
exports to PEFT's VeraConfig format; DVoRA has no PEFT format (PEFT has no DVoRA).
"""
from __future__ import annotations

import json
import os
import re
import tempfile
import uuid
import warnings
from collections import Counter
from pathlib import Path
from typing import Mapping, Optional, Union

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .layer import DoRALinear
from .targeting import DoRARule, DoRASpec, apply_dora, dora_modules, get_spec, train_fully_parameters
from .vera import VeRALinear, draw_projections, projection_digest, vera_projection_groups

CONFIG_NAME = "dora_config.json"
WEIGHTS_NAME = "dora_adapter.safetensors"
FORMAT = "dora-vl-adapter"
FORMAT_VERSION = 2  # 2: the two files carry the same save id
PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
SAVE_ID_KEY = "dora_save_id"  # in the tensor file's safetensors metadata

PathLike = Union[str, os.PathLike]


class AdapterError(ValueError):
    """An adapter directory that does not fit the model, or is not an adapter of the expected kind."""


def _write_temp(path: Path, write) -> str:
    """Write a file under a temporary name beside `path`; returns that name (removed again on failure)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
    except BaseException:
        os.unlink(tmp)
        raise
    return tmp


def _write_files(files: Mapping[Path, object]) -> None:
    """Write every file under a temporary name first, then rename them in order: a crash while writing leaves
    the old files as they were, and the renames themselves take no time to speak of."""
    written: dict[Path, str] = {}
    try:
        for path, write in files.items():
            written[path] = _write_temp(path, write)
        for path in files:
            os.replace(written[path], path)
            del written[path]
    finally:
        for tmp in written.values():
            os.unlink(tmp)


def _json_writer(data):
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2, sort_keys=False)
            f.write("\n")
    return write


def _tensors_writer(tensors: Mapping[str, torch.Tensor], metadata: Optional[dict] = None):
    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    return lambda tmp: save_file(tensors, tmp, metadata={"format": "pt", **(metadata or {})})


def _module_settings(module: DoRALinear) -> dict:
    return {
        "in_features": module.in_features, "out_features": module.out_features, "rank": module.rank,
        "alpha": module.alpha, "scaling": module.scaling, "rslora": module.rslora,
        "magnitude_only": module.magnitude_only, "dropout": module.dropout,
        "dropout_mode": module.dropout_mode, "detach_norm": module.detach_norm, "inplace_safe": module.inplace_safe,
        "variant": getattr(module, "variant", "lora"),
        **({"magnitude": module.has_magnitude, "d_initial": module.d_initial, "projections": module.vera_projections.key,
            "save_projection": module.save_projection} if isinstance(module, VeRALinear) else {}),
    }


def _projection_records(model: nn.Module) -> tuple[dict, dict]:
    """(config records, tensors) of the model's VeRA projection groups: seed, shapes, the digest of what the seed
    draws, and the projections themselves where a module of the group saves them."""
    records, tensors = {}, {}
    saving = {m.vera_projections.key for m in dora_modules(model).values()
              if isinstance(m, VeRALinear) and m.save_projection}
    for key, group in vera_projection_groups(model).items():
        A, B = draw_projections(group.rank, group.A.shape[1], group.B.shape[0], group.seed)
        records[key] = {"rank": group.rank, "seed": group.seed, "A_shape": list(group.A.shape),
                        "B_shape": list(group.B.shape), "dtype": str(group.A.dtype).replace("torch.", ""),
                        "sha256_A": projection_digest(A), "sha256_B": projection_digest(B), "saved": key in saving}
        if key in saving:
            tensors[f"{key}.A"], tensors[f"{key}.B"] = group.A.float(), group.B.float()
    return records, tensors


def _coarser(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    return a if torch.finfo(a).eps >= torch.finfo(b).eps else b


def _check_projections(model: nn.Module, records: Mapping[str, dict], tensors: dict, source: str) -> None:
    """The model's projection groups are the ones the adapter was trained with: the file's where it has them, else
    what the seed draws (its recorded digest). Compared in the coarser of the dtype training held them in and the
    one the model holds them in now (a model cast to bf16 after apply_dora holds rounded ones), then set to the
    training's values in the model's dtype, so that the loaded model computes what the trained one did. Pops the
    projection tensors out of `tensors`."""
    groups = vera_projection_groups(model)
    if set(groups) != set(records):
        raise AdapterError(f"{source}: VeRA projection groups differ: the model has {sorted(groups)}, the adapter "
                           f"{sorted(records)}")
    for key, rec in records.items():
        group = groups[key]
        shapes = (list(group.A.shape), list(group.B.shape))
        if shapes != (rec["A_shape"], rec["B_shape"]):
            raise AdapterError(f"{source}: projections {key} are A {shapes[0]}, B {shapes[1]} in the model but "
                               f"A {rec['A_shape']}, B {rec['B_shape']} in the adapter (the largest in / out of the "
                               f"adapted modules differ)")
        held = getattr(torch, rec.get("dtype", "float32"))
        drawn = dict(zip("AB", draw_projections(rec["rank"], rec["A_shape"][1], rec["B_shape"][0], rec["seed"])))
        if rec.get("saved"):
            trained = {}
            for part in ("A", "B"):
                saved = tensors.pop(f"{key}.{part}", None)
                if saved is None:
                    raise AdapterError(f"{source}: the config says projections {key} were saved, but the file has no "
                                       f"{key}.{part}")
                if not torch.equal(saved.to(held), drawn[part].to(held)):
                    raise AdapterError(
                        f"{source}: projection {key}.{part} in the checkpoint does not match the one projection_seed "
                        f"{rec['seed']} draws (rank {rec['rank']}): the file was edited, or the adapter was trained "
                        f"with other projections than its config's seed; the adapter cannot be applied as saved")
                trained[part] = saved.to(held)
        else:
            if (projection_digest(drawn["A"]), projection_digest(drawn["B"])) != (rec["sha256_A"], rec["sha256_B"]):
                raise AdapterError(
                    f"{source}: projections {key} regenerated from projection_seed {rec['seed']} differ from the ones "
                    f"the adapter was trained with (sha256 recorded at save); this torch draws other numbers from the "
                    f"seed: save the adapter with save_projection: true")
            trained = {part: t.to(held) for part, t in drawn.items()}
        for part in ("A", "B"):
            mine = getattr(group, part)
            common = _coarser(held, mine.dtype)
            if not torch.equal(drawn[part].to(common), mine.detach().to("cpu", common)):
                raise AdapterError(f"{source}: the model's projections {key}.{part} are not what projection_seed "
                                   f"{rec['seed']} draws: they were changed after apply_dora")
            with torch.no_grad():
                mine.copy_(trained[part].to(mine.device, mine.dtype))


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor an adapter holds: A, B and m of each DoRA module, and every train_fully parameter."""
    state = {}
    for name, module in dora_modules(model).items():
        for part, p in module.adapter_parameters().items():
            state[f"{name}.{part}"] = p
    state.update(train_fully_parameters(model))
    return state


def save_adapter(model: nn.Module, path: PathLike, metadata: Optional[dict] = None,
                 state_dict: Optional[Mapping[str, torch.Tensor]] = None) -> Path:
    """Write the adapter of a model adapted by apply_dora. `state_dict` overrides the tensors (for example
    gathered from DeepSpeed ZeRO-3 partitions); by default they are read from the model."""
    path = Path(path)
    modules = dora_modules(model)
    state = dict(adapter_state_dict(model) if state_dict is None else state_dict)
    projections, projection_tensors = _projection_records(model)  # buffers: the same on every rank, never partitioned
    state.update(projection_tensors)
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "spec": get_spec(model).to_dict(),
        "modules": {name: _module_settings(m) for name, m in modules.items()},
        "train_fully_parameters": sorted(train_fully_parameters(model)),
        **({"projections": projections} if projections else {}),
        "metadata": metadata or {},
    }
    save_id = uuid.uuid4().hex
    config["save_id"] = save_id
    # The tensors are renamed into place first and the config last; the shared save id tells a pair apart.
    _write_files({path / WEIGHTS_NAME: _tensors_writer(state, {SAVE_ID_KEY: save_id}),
                  path / CONFIG_NAME: _json_writer(config)})
    return path


def read_adapter_config(path: PathLike) -> dict:
    file = Path(path) / CONFIG_NAME
    if not file.is_file():
        hint = " (it holds a PEFT adapter: use import_peft)" if (Path(path) / PEFT_CONFIG_NAME).is_file() else ""
        raise AdapterError(f"{file} not found{hint}")
    with open(file) as f:
        config = json.load(f)
    if config.get("format") != FORMAT:
        raise AdapterError(f"{file}: format is {config.get('format')!r}, expected {FORMAT!r}")
    if config.get("format_version", 0) > FORMAT_VERSION:
        raise AdapterError(f"{file}: format_version {config['format_version']} is newer than this library's "
                           f"{FORMAT_VERSION}")
    return config


def _check_same_save(path: Path, config: dict) -> None:
    save_id = config.get("save_id")
    if save_id is None:  # format_version 1
        return
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        raise AdapterError(f"{weights} not found")
    with safe_open(str(weights), framework="pt") as f:
        found = (f.metadata() or {}).get(SAVE_ID_KEY)
    if found is None:
        raise AdapterError(f"{weights} carries no save id (rewritten by another tool?) but {CONFIG_NAME} expects "
                           f"{save_id}: keep the file's metadata when rewriting it, or save the adapter again")
    if found != save_id:
        raise AdapterError(f"{path}: {CONFIG_NAME} and {WEIGHTS_NAME} come from different saves (save id "
                           f"{save_id} and {found}); a save was probably interrupted: save the adapter again")


def load_adapter(model: nn.Module, path: PathLike, *, verbose: bool = False) -> nn.Module:
    """Load an adapter written by save_adapter into `model`.

    A model without DoRA modules is adapted first with the saved rules (the new layers take the mode, training
    or eval, of the layers they replace); a model that already has them must have the same modules with the
    same ranks and scales. Every tensor in the file must find its parameter (same name, same shape) and every
    adapter parameter of the model must be in the file.
    """
    path = Path(path)
    config = read_adapter_config(path)
    _check_same_save(path, config)
    spec = DoRASpec.from_dict(config["spec"])
    if not dora_modules(model):
        apply_dora(model, spec.rules, spec.train_fully, verbose=verbose)
    modules = dora_modules(model)
    saved = config["modules"]
    if set(modules) != set(saved):
        only_model = sorted(set(modules) - set(saved))[:5]
        only_file = sorted(set(saved) - set(modules))[:5]
        raise AdapterError(f"{path}: DoRA modules differ from the model's (only in the model: {only_model}; "
                           f"only in the adapter: {only_file})")
    for name, module in modules.items():
        want = saved[name]
        if (module.rank, module.magnitude_only, module.in_features, module.out_features,
                getattr(module, "variant", "lora"), getattr(module, "has_magnitude", True)) != (
                want["rank"], want["magnitude_only"], want["in_features"], want["out_features"],
                want.get("variant", "lora"), want.get("magnitude", True)):
            raise AdapterError(f"{path}: module {name!r} is {_module_settings(module)} in the model but "
                               f"{want} in the adapter")
        if module.merged:
            raise AdapterError(f"module {name!r} is merged; unmerge the model before loading an adapter")
        if module.scaling != want["scaling"]:
            raise AdapterError(f"{path}: module {name!r} has scaling {module.scaling} in the model but "
                               f"{want['scaling']} in the adapter")
    tensors = load_file(str(path / WEIGHTS_NAME))
    _check_projections(model, config.get("projections", {}), tensors, str(path / WEIGHTS_NAME))
    expected = adapter_state_dict(model)
    _copy_into(expected, tensors, source=str(path / WEIGHTS_NAME))
    for module in modules.values():
        module.invalidate_norm_cache()
    return model


def _copy_into(params: Mapping[str, torch.Tensor], tensors: Mapping[str, torch.Tensor], source: str) -> None:
    missing = sorted(set(params) - set(tensors))
    unexpected = sorted(set(tensors) - set(params))
    if missing or unexpected:
        raise AdapterError(f"{source}: missing tensors {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                           f"unexpected tensors {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    with torch.no_grad():
        for name, param in params.items():
            t = tensors[name]
            if tuple(t.shape) != tuple(param.shape):
                raise AdapterError(f"{source}: tensor {name!r} has shape {tuple(t.shape)}, "
                                   f"the model's parameter has {tuple(param.shape)}")
            param.copy_(t)


# ------------------------------------------------------------------------------------------------- PEFT
# How PEFT (0.21) reads a config, and what export_peft writes so that each entry selects exactly one module:
# - target_modules: a list entry matches a module whose name equals it or ends with "." + entry (so "0" also
#   selects "1.0"); a string is a regex that must match the whole name. We write one full-match regex.
# - rank_pattern / alpha_pattern: key k applies to name n when re.match(rf"(.*\.)?({k})$", n). We write
#   "^" + re.escape(name): the "^" leaves the optional prefix nothing to match.
# - modules_to_save: entry t wraps every module whose name ends with t (no dot boundary), and keeps every
#   module matching (^|.*\.)t($|\..*) (t taken as a regex) from being adapted. Neither can be escaped, so we
#   list a module only where both rules select it alone.


def _exact_peft_pattern_key(name: str) -> str:
    return "^" + re.escape(name)


def _full_match_regex(names) -> str:
    return "(?:" + "|".join(re.escape(n) for n in sorted(names)) + ")"


def _peft_modules_to_save_selects_only(name: str, module_names, adapted) -> bool:
    if any(other != name and other.endswith(name) for other in module_names):
        return False
    try:
        excludes = re.compile(rf"(^|.*\.){name}($|\..*)")
    except re.error:
        return False
    return not any(excludes.match(a) for a in adapted)


def export_peft(model: nn.Module, path: PathLike, base_model_name_or_path: Optional[str] = None,
                state_dict: Optional[Mapping[str, torch.Tensor]] = None) -> Path:
    """Write the adapter in PEFT's LoRA format with use_dora=True.

    Every module is named exactly: `target_modules` is one regex that PEFT matches against whole module names,
    and per-module ranks and scales go into rank_pattern / alpha_pattern under keys that match one module each
    (alpha written as scaling * rank, so rsLoRA modules load with the right scale). Fully trained modules become
    modules_to_save where PEFT's suffix rule selects them alone; their parameters, and other fully trained
    parameters (biases of frozen layers), are written under their base-model names, which PEFT loads into the
    base model. PEFT has one lora_dropout for all modules: differing dropouts are written as the most common one,
    with a warning. Training-only settings (detach_norm, dropout_mode) have no PEFT equivalent; PEFT always
    detaches the norm and uses the exact dropout form. `state_dict` (names as adapter_state_dict gives them)
    overrides the tensors read from the model.
    """
    path = Path(path)
    modules = dora_modules(model)
    values = dict(adapter_state_dict(model) if state_dict is None else state_dict)
    if not modules:
        raise AdapterError("the model has no DoRA modules to export")
    vera = [n for n, m in modules.items() if isinstance(m, VeRALinear)]
    if vera:
        return _export_peft_vera(model, path, modules, values, base_model_name_or_path)
    tensors: dict[str, torch.Tensor] = {}
    ranks, alphas = {}, {}
    for name, m in modules.items():
        if m.merged:
            raise AdapterError(f"module {name!r} is merged; unmerge before exporting")
        key = PEFT_PREFIX + name
        magnitude = values[f"{name}.magnitude"]
        if m.magnitude_only:
            dtype, device = magnitude.dtype, magnitude.device
            tensors[f"{key}.lora_A.weight"] = torch.zeros(1, m.in_features, dtype=dtype, device=device)
            tensors[f"{key}.lora_B.weight"] = torch.zeros(m.out_features, 1, dtype=dtype, device=device)
            ranks[name], alphas[name] = 1, 1.0
        else:
            tensors[f"{key}.lora_A.weight"] = values[f"{name}.lora_A"]
            tensors[f"{key}.lora_B.weight"] = values[f"{name}.lora_B"]
            ranks[name], alphas[name] = m.rank, m.scaling * m.rank
        tensors[f"{key}.lora_magnitude_vector"] = magnitude

    modules_to_save = _export_fully_trained(model, modules, values, tensors)

    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    dropouts = Counter(m.dropout for m in modules.values())
    dropout = dropouts.most_common(1)[0][0]
    if len(dropouts) > 1:
        warnings.warn(f"export_peft: PEFT has one lora_dropout for all modules; writing {dropout}, while "
                      f"{sum(n for d, n in dropouts.items() if d != dropout)} module(s) train with another "
                      f"dropout ({sorted(d for d in dropouts if d != dropout)})", stacklevel=2)
    config = {
        "peft_type": "LORA",
        "use_dora": True,
        "r": r,
        "lora_alpha": alpha,
        "rank_pattern": {_exact_peft_pattern_key(n): v for n, v in ranks.items() if v != r},
        "alpha_pattern": {_exact_peft_pattern_key(n): v for n, v in alphas.items() if v != alpha},
        "use_rslora": False,
        "target_modules": _full_match_regex(modules),
        "modules_to_save": modules_to_save or None,
        "lora_dropout": dropout,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
    }
    _write_files({path / PEFT_WEIGHTS_NAME: _tensors_writer(tensors), path / PEFT_CONFIG_NAME: _json_writer(config)})
    return path


def _export_fully_trained(model: nn.Module, modules, values, tensors: dict) -> list:
    """Fully trained parameters into `tensors` under the names PEFT loads them by; returns modules_to_save."""
    fully = train_fully_parameters(model)
    module_names = [n for n, _ in model.named_modules() if n]
    modules_to_save = []
    for mod_name, mod in model.named_modules():
        if not mod_name or isinstance(mod, DoRALinear) or dora_modules(mod):
            continue
        names = [f"{mod_name}.{n}" for n, _ in mod.named_parameters()]
        if (names and all(n in fully for n in names)
                and not any(mod_name.startswith(s + ".") for s in modules_to_save)
                and _peft_modules_to_save_selects_only(mod_name, module_names, modules)):
            modules_to_save.append(mod_name)
    for name in fully:
        owner, _, leaf = name.rpartition(".")
        peft_name = f"{owner}.base_layer.{leaf}" if owner in modules else name
        tensors[PEFT_PREFIX + peft_name] = values[name]
    return modules_to_save


def peft_export_problem(model: nn.Module) -> Optional[str]:
    """Why export_peft cannot write this model's adapter (DVoRA modules, or VeRA beside DoRA), or None."""
    modules = dora_modules(model)
    vera = [m for m in modules.values() if isinstance(m, VeRALinear)]
    if any(m.has_magnitude for m in vera):
        return "PEFT has no DVoRA (VeRA with DoRA's magnitude): the adapter is in this library's format only"
    if vera and len(vera) != len(modules):
        return "PEFT holds one adapter type per adapter: VeRA and DoRA modules together have no PEFT format"
    return None


def _export_peft_vera(model: nn.Module, path: Path, modules, values, base_model_name_or_path) -> Path:
    """Plain VeRA modules as a PEFT VeraConfig adapter: one rank, seed, d_initial and dropout (PEFT has one of each
    per adapter), the projections saved (save_projection), so that PEFT evaluates the same update."""
    dvora = sorted(n for n, m in modules.items() if getattr(m, "has_magnitude", True))
    if dvora:
        kinds = "DVoRA (VeRA with DoRA's magnitude)" if all(isinstance(modules[n], VeRALinear) for n in dvora) \
            else "DoRA modules beside VeRA ones"
        raise AdapterError(f"export_peft: modules {dvora[:3]} are {kinds}, which PEFT has no format for (its VeRA "
                           f"has no magnitude, and one adapter holds one type); save them with save_adapter")
    groups = vera_projection_groups(model)
    if len(groups) != 1:
        raise AdapterError(f"export_peft: PEFT's VeRA shares one pair of projections per adapter; this model has "
                           f"{len(groups)} groups ({sorted(groups)}): use one rank and one projection_seed")
    group = next(iter(groups.values()))
    for what in ("d_initial", "dropout"):
        found = {getattr(m, what) for m in modules.values()}
        if len(found) > 1:
            raise AdapterError(f"export_peft: PEFT's VeraConfig has one {what}; the modules have {sorted(found)}")
    first = next(iter(modules.values()))
    tensors: dict[str, torch.Tensor] = {}
    for name, m in modules.items():
        if m.merged:
            raise AdapterError(f"module {name!r} is merged; unmerge before exporting")
        for part in ("vera_lambda_b", "vera_lambda_d"):
            tensors[f"{PEFT_PREFIX}{name}.{part}"] = values[f"{name}.{part}"]
    tensors["base_model.vera_A"], tensors["base_model.vera_B"] = group.A.float(), group.B.float()
    modules_to_save = _export_fully_trained(model, modules, values, tensors)
    config = {
        "peft_type": "VERA",
        "r": group.rank,
        "target_modules": _full_match_regex(modules),
        "projection_prng_key": group.seed,
        "save_projection": True,
        "vera_dropout": first.dropout,
        "d_initial": first.d_initial,
        "fan_in_fan_out": False,
        "bias": "none",
        "modules_to_save": modules_to_save or None,
        "init_weights": True,
        "inference_mode": True,
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
    }
    _write_files({path / PEFT_WEIGHTS_NAME: _tensors_writer(tensors), path / PEFT_CONFIG_NAME: _json_writer(config)})
    return path


def _import_peft_vera(model: nn.Module, config: dict, raw: dict, weights: Path, verbose: bool) -> nn.Module:
    """A PEFT VeraConfig adapter as plain-VeRA rules (variant vera, magnitude false); its saved projections must be
    the ones its projection_prng_key draws here (else an error), and without them the seed's are used."""
    if config.get("fan_in_fan_out"):
        raise AdapterError(f"{weights}: fan_in_fan_out (Conv1D) adapters are not supported")
    lambdas: dict[str, dict[str, torch.Tensor]] = {}
    others: dict[str, torch.Tensor] = {}
    projections = {k: raw.pop(k) for k in ("base_model.vera_A", "base_model.vera_B") if k in raw}
    for key, t in raw.items():
        if not key.startswith(PEFT_PREFIX):
            raise AdapterError(f"{weights}: unexpected key {key!r} (expected the {PEFT_PREFIX!r} prefix)")
        name = key[len(PEFT_PREFIX):]
        m = re.fullmatch(r"(.+)\.(vera_lambda_[bd])", name)
        if m:
            lambdas.setdefault(m.group(1), {})[m.group(2)] = t
        else:
            owner, _, leaf = name.rpartition(".")
            if owner.endswith(".base_layer"):
                name = f"{owner[: -len('.base_layer')]}.{leaf}"
            others[name] = t
    incomplete = [n for n, parts in lambdas.items() if set(parts) != {"vera_lambda_b", "vera_lambda_d"}]
    if incomplete or not lambdas:
        raise AdapterError(f"{weights}: modules {incomplete[:5]} lack vera_lambda_b or vera_lambda_d"
                           if incomplete else f"{weights}: no vera_lambda_b / vera_lambda_d tensors")
    unknown = sorted(set(others) - {n for n, _ in model.named_parameters()})
    if unknown:
        raise AdapterError(f"{weights}: tensors {unknown[:5]} are neither adapter tensors nor parameters of "
                           f"{type(model).__name__}")
    rule = DoRARule(match="|".join(re.escape(n) for n in sorted(lambdas)), rank=int(config["r"]), variant="vera",
                    magnitude=False, d_initial=float(config.get("d_initial", 0.1)),
                    projection_seed=int(config.get("projection_prng_key", 0)),
                    dropout=float(config.get("vera_dropout") or 0.0),
                    save_projection=bool(config.get("save_projection", True)))
    apply_dora(model, [rule], [re.escape(n) for n in sorted(others)], verbose=verbose)
    (group,) = vera_projection_groups(model).values()
    for part, key in (("A", "base_model.vera_A"), ("B", "base_model.vera_B")):
        if key in projections and not torch.equal(projections[key].to(group.A.dtype), getattr(group, part)):
            raise AdapterError(f"{weights}: {key} does not match the projection that projection_prng_key "
                               f"{rule.projection_seed} draws (shape {tuple(projections[key].shape)} vs "
                               f"{tuple(getattr(group, part).shape)}): the adapter was trained with other projections "
                               f"or on other target modules")
    params = dict(model.named_parameters())
    targets = {f"{n}.{part}": getattr(module, part) for n, module in dora_modules(model).items()
               for part in ("vera_lambda_b", "vera_lambda_d")}
    targets.update({n: params[n] for n in others})
    tensors = {f"{n}.{part}": t for n, parts in lambdas.items() for part, t in parts.items()}
    tensors.update(others)
    _copy_into(targets, tensors, source=str(weights))
    for module in dora_modules(model).values():
        module.invalidate_norm_cache()
    return model


def _peft_pattern_value(patterns: Mapping[str, float], name: str, default):
    # PEFT's rule (peft.utils.other.get_pattern_key): the first key k with re.match(rf"(.*\.)?({k})$", name).
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", name):
            return value
    return default


def _read_peft_weights(path: Path) -> dict:
    if (path / PEFT_WEIGHTS_NAME).is_file():
        return load_file(str(path / PEFT_WEIGHTS_NAME))
    if (path / "adapter_model.bin").is_file():
        return torch.load(path / "adapter_model.bin", map_location="cpu", weights_only=True)
    raise AdapterError(f"{path}: no {PEFT_WEIGHTS_NAME} or adapter_model.bin")


def import_peft(model: nn.Module, path: PathLike, *, verbose: bool = False) -> nn.Module:
    """Adapt `model` (without DoRA modules) with a PEFT DoRA adapter directory and load its tensors.

    Modules, ranks, scales (lora_alpha / alpha_pattern, use_rslora) and lora_dropout are read as PEFT reads
    them; the new layers take the mode (training or eval) of the layers they replace. Other tensors in the file
    (modules_to_save, biases) are trained fully; `{module}.base_layer.{name}` of an adapted module is its own
    parameter `{module}.{name}`.
    """
    path = Path(path)
    config_file = path / PEFT_CONFIG_NAME
    if not config_file.is_file():
        raise AdapterError(f"{config_file} not found")
    with open(config_file) as f:
        config = json.load(f)
    if config.get("peft_type") == "VERA":
        return _import_peft_vera(model, config, _read_peft_weights(path), path / PEFT_WEIGHTS_NAME, verbose)
    if config.get("peft_type") != "LORA" or not config.get("use_dora"):
        raise AdapterError(f"{config_file}: not a DoRA adapter (nor a VeRA one) (peft_type={config.get('peft_type')!r}, "
                           f"use_dora={config.get('use_dora')!r})")
    if config.get("fan_in_fan_out"):
        raise AdapterError(f"{config_file}: fan_in_fan_out (Conv1D) adapters are not supported")
    weights = path / PEFT_WEIGHTS_NAME
    raw = _read_peft_weights(path)

    # Split PEFT keys into adapter tensors per module and fully trained base-model parameters.
    adapter: dict[str, dict[str, torch.Tensor]] = {}
    rest: dict[str, torch.Tensor] = {}
    for key, t in raw.items():
        if not key.startswith(PEFT_PREFIX):
            raise AdapterError(f"{weights}: unexpected key {key!r} (expected the {PEFT_PREFIX!r} prefix)")
        name = key[len(PEFT_PREFIX):]
        m = re.fullmatch(r"(.+)\.(lora_A\.weight|lora_B\.weight|lora_magnitude_vector(?:\.weight)?)", name)
        if m:
            part = {"lora_A.weight": "lora_A", "lora_B.weight": "lora_B"}.get(m.group(2), "magnitude")
            adapter.setdefault(m.group(1), {})[part] = t
        else:
            rest[name] = t
    incomplete = [n for n, parts in adapter.items() if set(parts) != {"lora_A", "lora_B", "magnitude"}]
    if incomplete:
        raise AdapterError(f"{weights}: modules {incomplete[:5]} lack one of lora_A, lora_B, lora_magnitude_vector")
    others: dict[str, torch.Tensor] = {}
    for name, t in rest.items():
        owner, _, leaf = name.rpartition(".")
        if owner.endswith(".base_layer") and owner[: -len(".base_layer")] in adapter:
            name = f"{owner[: -len('.base_layer')]}.{leaf}"  # PEFT's name for the adapted layer's own parameter
        others[name] = t
    known = {n for n, _ in model.named_parameters()}
    unknown = sorted(set(others) - known)
    if unknown:
        raise AdapterError(f"{weights}: tensors {unknown[:5]} are neither adapter tensors nor parameters of "
                           f"{type(model).__name__}")

    rslora = bool(config.get("use_rslora"))
    groups: dict[tuple, list[str]] = {}
    for name, parts in adapter.items():
        rank = parts["lora_A"].shape[0]
        alpha = _peft_pattern_value(config.get("alpha_pattern") or {}, name, config["lora_alpha"])
        groups.setdefault((rank, float(alpha)), []).append(name)
    dropout = float(config.get("lora_dropout") or 0.0)
    rules = [DoRARule(match="|".join(re.escape(n) for n in sorted(names)), rank=rank, alpha=alpha,
                      dropout=dropout, rslora=rslora)
             for (rank, alpha), names in groups.items()]
    train_fully = [re.escape(n) for n in sorted(others)]
    apply_dora(model, rules, train_fully, verbose=verbose)
    params = dict(model.named_parameters())
    targets = {f"{n}.{part}": getattr(module, part) for n, module in dora_modules(model).items()
               for part in ("lora_A", "lora_B", "magnitude")}
    targets.update({n: params[n] for n in others})
    tensors = {f"{n}.{part}": t for n, parts in adapter.items() for part, t in parts.items()}
    tensors.update(others)
    _copy_into(targets, tensors, source=str(weights))
    for module in dora_modules(model).values():
        module.invalidate_norm_cache()
    return model
