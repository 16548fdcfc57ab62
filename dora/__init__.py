"""DoRA (Weight-Decomposed Low-Rank Adaptation) for any torch model, applied by declarative rules.

    from dora import apply_dora, save_adapter, load_adapter, merge_dora

    report = apply_dora(model, rules=[{"match": r".*\.(q|v)_proj", "rank": 16, "alpha": 32}],
                        train_fully=[r".*\.bias"])
"""
from .adapter import (
    AdapterError,
    adapter_state_dict,
    export_peft,
    import_peft,
    load_adapter,
    read_adapter_config,
    save_adapter,
)
from .layer import DoRALinear, factored_row_norm, squared_row_norm
from .targeting import (
    DoRAReport,
    DoRARule,
    DoRASpec,
    TargetingError,
    apply_dora,
    dora_modules,
    get_spec,
    invalidate_norm_caches,
    merge_dora,
    train_fully_parameters,
    unload_dora,
    unmerge_dora,
)

# The analysis is imported on first use: `python -m dora.analysis` runs that module as __main__, and importing it
# here first would give two copies of it (runpy warns).
_ANALYSIS = ("DecompositionDelta", "decomposition_delta", "dora_decomposition_delta", "model_decomposition_deltas")


def __getattr__(name):
    if name in _ANALYSIS:
        from . import analysis
        return getattr(analysis, name)
    raise AttributeError(f"module 'dora' has no attribute {name!r}")


__all__ = [
    "AdapterError", "DecompositionDelta", "DoRALinear", "DoRAReport", "DoRARule", "DoRASpec", "TargetingError",
    "adapter_state_dict", "apply_dora", "decomposition_delta", "dora_decomposition_delta", "dora_modules",
    "export_peft", "factored_row_norm", "get_spec", "import_peft", "invalidate_norm_caches", "load_adapter",
    "merge_dora", "model_decomposition_deltas", "read_adapter_config", "save_adapter", "squared_row_norm",
    "train_fully_parameters", "unload_dora", "unmerge_dora",
]
