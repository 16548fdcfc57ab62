"""The weight-decomposition analysis: delta_M / delta_D on hand-made weights, the (out, in) layout, the same
numbers from every checkpoint kind, the CLI's CSV and PNG, and reading one layer at a time."""
import copy
import csv
import json
import math
import os
import weakref

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

import dora.analysis as analysis
from dora import apply_dora, export_peft, save_adapter, unload_dora
from dora.analysis import analyse, decomposition_delta, dora_decomposition_delta, fit, LayerDelta


def _rotate_rows(w0: torch.Tensor, theta: float) -> torch.Tensor:
    """Each row turned by theta in the plane of itself and a unit vector orthogonal to it: same norm."""
    u = w0 / w0.norm(dim=1, keepdim=True)
    r = torch.randn_like(w0)
    r = r - (r * u).sum(1, keepdim=True) * u
    r = r / r.norm(dim=1, keepdim=True)
    return w0.norm(dim=1, keepdim=True) * (math.cos(theta) * u + math.sin(theta) * r)


def test_row_rescaling_changes_magnitude_only():
    w0 = torch.randn(6, 10, dtype=torch.float64)
    c = torch.tensor([0.5, 1.0, 1.5, 2.0, 0.9, 1.1], dtype=torch.float64)
    d = decomposition_delta(c[:, None] * w0, w0)
    assert d.direction == pytest.approx(0.0, abs=1e-14)
    assert d.magnitude == pytest.approx(((c - 1).abs() * w0.norm(dim=1)).mean().item(), rel=1e-12)


def test_row_rotation_changes_direction_only():
    w0 = torch.randn(6, 10, dtype=torch.float64)
    theta = 0.3
    d = decomposition_delta(_rotate_rows(w0, theta), w0)
    assert d.magnitude == pytest.approx(0.0, abs=1e-12)
    assert d.direction == pytest.approx(1 - math.cos(theta), rel=1e-10)


def test_layout_paper_columns_are_our_rows():
    """The paper's W (d inputs x k outputs) is nn.Linear's weight transposed: scaling one output unit (a paper
    column, our row) moves magnitude only; scaling one input moves the direction of every output."""
    lin = nn.Linear(8, 5)
    w0 = lin.weight.detach().double().clone()
    w = w0.clone()
    w[2] *= 3.0  # output 2 of y = W x
    paper_w, paper_w0 = w.t(), w0.t()  # (d, k)
    paper_dm = (paper_w.norm(dim=0) - paper_w0.norm(dim=0)).abs().mean().item()  # ||W||_c over k columns
    d = decomposition_delta(w, w0)
    assert d.magnitude == pytest.approx(paper_dm, rel=1e-12)
    assert d.direction == pytest.approx(0.0, abs=1e-14)
    w_in = w0.clone()
    w_in[:, 2] *= 3.0  # input 2: a column of nn.Linear's weight
    assert decomposition_delta(w_in, w0).direction > 1e-3


class Tiny(nn.Module):
    """Named like an attention stack, so the default --modules (query and value) selects q_proj and v_proj."""

    def __init__(self, layers=3, width=12):
        super().__init__()
        self.layers = nn.ModuleList()
        for _ in range(layers):
            block = nn.Module()
            block.q_proj, block.k_proj, block.v_proj = (nn.Linear(width, width) for _ in range(3))
            self.layers.append(block)
        self.head = nn.Linear(width, 4)


RULES = [{"match": r"layers\.\d+\.(q|v)_proj", "rank": 3, "alpha": 6}]


def _trained_dora(seed=1):
    torch.manual_seed(seed)
    base = Tiny()
    model = copy.deepcopy(base)
    apply_dora(model, RULES, verbose=False)
    with torch.no_grad():  # stand-in for training: every factor and magnitude moves
        for name, p in model.named_parameters():
            if "lora_" in name or "magnitude" in name:
                p.add_(0.1 * torch.randn_like(p))
    return base, model


def _save_weights(model, path):
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def test_every_checkpoint_kind_gives_the_same_deltas(tmp_path):
    base, model = _trained_dora()
    base_file = _save_weights(base, tmp_path / "base.safetensors")
    save_adapter(model, tmp_path / "ours", metadata={"step": 7})
    export_peft(model, tmp_path / "peft")
    from_factors = {f"{n}": dora_decomposition_delta(m) for n, m in
                    ((n, m) for n, m in model.named_modules() if type(m).__name__ == "DoRALinear")}
    merged = unload_dora(copy.deepcopy(model))
    (tmp_path / "merged").mkdir()
    _save_weights(merged, tmp_path / "merged" / "model.safetensors")

    results = {}
    for label, path in [("ours", tmp_path / "ours"), ("peft", tmp_path / "peft"),
                        ("merged", tmp_path / "merged")]:
        rows = analyse(base_file, [path])
        results[label] = {r.module: (r.delta_m, r.delta_d) for r in rows}
        assert {r.method for r in rows} == {"FT" if label == "merged" else "DoRA"}
    assert set(results["ours"]) == set(from_factors) and len(from_factors) == 6
    for name, d in from_factors.items():
        for label in results:
            dm, dd = results[label][name]
            assert dm == pytest.approx(d.magnitude, rel=1e-5, abs=1e-9), (label, name)
            assert dd == pytest.approx(d.direction, rel=1e-4, abs=1e-9), (label, name)
    assert {r.step for r in analyse(base_file, [tmp_path / "ours"])} == {7}


def test_peft_lora_adapter_matches_its_merged_weights(tmp_path):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = Tiny()
    base_file = _save_weights(base, tmp_path / "base.safetensors")
    lora = get_peft_model(copy.deepcopy(base), LoraConfig(target_modules=["q_proj", "v_proj"], r=2, lora_alpha=8))
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_" in name:
                p.add_(0.2 * torch.randn_like(p))
    lora.save_pretrained(tmp_path / "step_30")
    merged = lora.merge_and_unload()
    _save_weights(merged, tmp_path / "merged.safetensors")
    rows = analyse(base_file, [tmp_path / "step_30", ("LoRA", tmp_path / "merged.safetensors")])
    adapter = {r.module: r for r in rows if r.checkpoint.endswith("step_30")}
    full = {r.module: r for r in rows if r.checkpoint.endswith("merged.safetensors")}
    assert {r.method for r in adapter.values()} == {"LoRA"} and {r.step for r in adapter.values()} == {30}
    assert set(adapter) == set(full) and len(adapter) == 6
    for name in adapter:
        assert adapter[name].delta_m == pytest.approx(full[name].delta_m, rel=1e-5, abs=1e-9)
        assert adapter[name].delta_d == pytest.approx(full[name].delta_d, rel=1e-4, abs=1e-9)
        assert adapter[name].delta_d > 0


def test_fit_slope_and_correlation():
    rows = [LayerDelta("FT", 1, f"m{i}", 3.0 - 2.0 * x, x, "") for i, x in enumerate([0.1, 0.2, 0.4, 0.5])]
    f = fit(rows)
    assert f.slope == pytest.approx(-2.0) and f.correlation == pytest.approx(-1.0) and f.points == 4


def test_cli_writes_csv_png_and_summary(tmp_path, capsys):
    base, model = _trained_dora()
    _save_weights(base, tmp_path / "base.safetensors")
    steps = []
    for step, scale in ((10, 0.5), (20, 1.0)):
        m = copy.deepcopy(model)
        with torch.no_grad():
            for name, p in m.named_parameters():
                if "lora_B" in name:
                    p.mul_(scale)
        save_adapter(m, tmp_path / "run" / f"step_{step}")
        steps.append(str(tmp_path / "run" / f"step_{step}"))
    full = copy.deepcopy(base)
    with torch.no_grad():
        for p in full.parameters():
            p.add_(0.05 * torch.randn_like(p))
    _save_weights(full, tmp_path / "ft-step-5.safetensors")
    out = tmp_path / "out"
    assert analysis.main(["--base", str(tmp_path / "base.safetensors"), "--checkpoints", *steps,
                          str(tmp_path / "ft-step-5.safetensors"), "--out", str(out)]) == 0
    with open(out / "decomposition.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 * 3
    assert {(r["method"], r["step"]) for r in rows} == {("DoRA", "10"), ("DoRA", "20"), ("FT", "5")}
    png = (out / "decomposition.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"FT", "DoRA"} and summary["DoRA"]["points"] == 12
    printed = capsys.readouterr().out
    assert "DoRA: slope" in printed and "correlation" in printed


def test_cli_names_the_file_it_cannot_read(tmp_path, capsys):
    base, _ = _trained_dora()
    _save_weights(base, tmp_path / "base.safetensors")
    (tmp_path / "empty").mkdir()
    assert analysis.main(["--base", str(tmp_path / "base.safetensors"), "--checkpoints", str(tmp_path / "empty"),
                          "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.startswith(f"error: {tmp_path / 'empty'}: no model.safetensors")


def test_streams_one_layer_at_a_time(tmp_path, monkeypatch):
    """Every tensor comes from safe_open's get_tensor, one at a time, and is released after its layer: at most a
    layer's W0, A, B and m are alive at once, never the model's 3 x 3 + 1 weights, nor a whole file."""
    torch.manual_seed(0)
    base, model = _trained_dora()
    big = Tiny(layers=8)  # a base with more tensors than any one layer needs
    big.load_state_dict(base.state_dict(), strict=False)
    (tmp_path / "base").mkdir()
    _save_weights(big, tmp_path / "base" / "model.safetensors")
    save_adapter(model, tmp_path / "ours")
    full = copy.deepcopy(big)
    (tmp_path / "full").mkdir()
    _save_weights(full, tmp_path / "full" / "model.safetensors")

    alive, most, reads = [], [0], []
    real_open = analysis.safe_open

    class Counting:
        def __init__(self, *args, **kwargs):
            self.inner = real_open(*args, **kwargs)

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def get_tensor(self, key):
            t = self.inner.get_tensor(key)
            alive[:] = [r for r in alive if r() is not None]
            alive.append(weakref.ref(t))
            most[0] = max(most[0], len(alive))
            reads.append(key)
            return t

    monkeypatch.setattr(analysis, "safe_open", Counting)
    monkeypatch.setattr("safetensors.torch.load_file", lambda *a, **k: pytest.fail("whole file loaded"))
    rows = analyse(tmp_path / "base", [tmp_path / "ours", tmp_path / "full"], modules=r"layers\.[0-2]\.(q|v)_proj")
    assert len(rows) == 12
    assert most[0] <= 4  # W0 + A + B + m of one layer
    # only what the selected layers need: no k_proj, no head, no layers 3-7
    assert all(any(f"layers.{i}." in k for i in range(3)) and ("q_proj" in k or "v_proj" in k) for k in reads)



SNAPSHOT_SCRIPT = r'''
import sys
sys.path[:0] = [ROOT, ROOT + "/tests"]
import torch
from safetensors.torch import save_file
from recipes.trainer import TrainConfig, Trainer
from dora import apply_dora, adapter_state_dict
from test_analysis import Tiny

torch.manual_seed(0)
model = Tiny()
save_file({k: v.contiguous() for k, v in model.state_dict().items()}, f"{TMP}/base.safetensors")
apply_dora(model, [{"match": r"layers\.\d+\.(q|v)_proj", "rank": 2, "alpha": 4}], verbose=False)
data = [torch.randn(12) for _ in range(16)]
config = TrainConfig(output_dir=f"{TMP}/dora", max_steps=3, micro_batch_size=4, global_batch_size=4, lr=1e-2,
                     deepspeed="launch/zero2.json", resume="none", snapshot_steps=[1, 3])

def loss_fn(engine, batch):
    h = batch["x"]
    for block in engine.module.layers:
        h = block.q_proj(h) + block.v_proj(h) + block.k_proj(h)
    return engine.module.head(h).pow(2).mean(), 1

trainer = Trainer(config, model, data, lambda xs: {"x": torch.stack(xs)}, loss_fn, hidden_size=12)
trainer.train()
save_file({k: v.detach().contiguous() for k, v in adapter_state_dict(model).items()}, f"{TMP}/dora_final.safetensors")
trainer.close()
print("ok")
'''


def test_trainer_writes_adapter_snapshots_at_the_chosen_steps(tmp_path):
    """train.snapshot_steps, in the real loop under DeepSpeed: our adapter at steps 1 and 3, the last equal to the
    trained adapter, each read by the analysis with its step."""
    import sys
    from pathlib import Path

    import subprocesses
    from safetensors.torch import load_file

    root = Path(__file__).resolve().parents[1]
    proc = subprocesses.run([sys.executable, "-c", f"ROOT = {str(root)!r}\nTMP = {str(tmp_path)!r}\n" + SNAPSHOT_SCRIPT],
                            what="a DeepSpeed training run writing snapshots", timeout=300, cwd=root,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]
    snaps = tmp_path / "dora" / "snapshots"
    assert sorted(p.name for p in snaps.iterdir()) == ["step_1", "step_3"]
    final = load_file(tmp_path / "dora_final.safetensors")
    snap = load_file(snaps / "step_3" / "dora_adapter.safetensors")
    assert set(final) == set(snap) and all(torch.equal(final[k], snap[k]) for k in final)
    rows = analyse(tmp_path / "base.safetensors", [snaps / "step_1", snaps / "step_3"])
    assert {(r.method, r.step) for r in rows} == {("DoRA", 1), ("DoRA", 3)} and len(rows) == 12
    assert all(r.delta_d > 0 for r in rows if r.step == 3)


class _SnapshotTrainer:
    """What Trainer.save_snapshot uses of a trainer, without a process group (tested in the real loop above)."""

    def __init__(self, module, output_dir):
        from types import SimpleNamespace
        self.engine = SimpleNamespace(module=module)
        self.output_dir = output_dir
        self.is_main = True

    @staticmethod
    def full_fp32_state(params):
        return {n: p.detach().float().clone() for n, p in params.items()}


def test_snapshots_of_peft_lora_and_full_fine_tuning(tmp_path, monkeypatch):
    """A PEFT LoRA model is snapshotted as a PEFT adapter, any other model as its trainable weights; the analysis
    reads both with their steps and finds the same numbers as from the models themselves."""
    from peft import LoraConfig, inject_adapter_in_model

    from recipes import trainer as trainer_module

    monkeypatch.setattr(trainer_module.dist, "barrier", lambda: None)
    torch.manual_seed(0)
    base = Tiny()
    _save_weights(base, tmp_path / "base.safetensors")
    lora = inject_adapter_in_model(LoraConfig(target_modules=r".*\.(q|v)_proj", r=2, lora_alpha=4),
                                   copy.deepcopy(base))
    full = copy.deepcopy(base)
    with torch.no_grad():
        for n, p in lora.named_parameters():
            p.requires_grad_("lora_" in n)
            if "lora_" in n:
                p.add_(0.1 * torch.randn_like(p))
        for p in full.parameters():
            p.add_(0.01 * torch.randn_like(p))
    lora_dir = trainer_module.Trainer.save_snapshot(_SnapshotTrainer(lora, tmp_path / "lora"), 5)
    full_dir = trainer_module.Trainer.save_snapshot(_SnapshotTrainer(full, tmp_path / "full"), 7)
    assert lora_dir == tmp_path / "lora" / "snapshots" / "step_5" and (lora_dir / "adapter_config.json").is_file()
    assert (full_dir / "model.safetensors").is_file()
    rows = analyse(tmp_path / "base.safetensors", [lora_dir, full_dir])
    assert {(r.method, r.step) for r in rows} == {("LoRA", 5), ("FT", 7)} and len(rows) == 12
    for r in rows:
        model = lora if r.method == "LoRA" else full
        layer = model.get_submodule(r.module)
        if r.method == "LoRA":
            w = layer.get_base_layer().weight + layer.scaling["default"] * (
                layer.lora_B["default"].weight @ layer.lora_A["default"].weight)
        else:
            w = layer.weight
        want = decomposition_delta(w.detach(), base.get_submodule(r.module).weight.detach())
        assert r.delta_m == pytest.approx(want.magnitude, rel=1e-5) and r.delta_d == pytest.approx(want.direction,
                                                                                                    rel=1e-4)


def test_snapshot_steps_must_be_positive_integers():
    from recipes.config import ConfigError
    from recipes.trainer import TrainConfig

    assert TrainConfig(output_dir="x", snapshot_steps=[10, 20]).snapshot_steps == [10, 20]
    for bad in ([0], ["10"], [2.5]):
        with pytest.raises(ConfigError, match="snapshot_steps"):
            TrainConfig.from_dict({"output_dir": "x", "snapshot_steps": bad})


def test_sharded_base_and_prefixed_names(tmp_path):
    """A base in shards (model.safetensors.index.json) whose names carry a prefix the adapter's do not."""
    base, model = _trained_dora()
    state = {f"backbone.{k}": v.contiguous() for k, v in base.state_dict().items()}
    keys = sorted(state)
    (tmp_path / "base").mkdir()
    shards = {"model-1.safetensors": keys[: len(keys) // 2], "model-2.safetensors": keys[len(keys) // 2:]}
    for file, names in shards.items():
        save_file({k: state[k] for k in names}, str(tmp_path / "base" / file))
    index = {"metadata": {}, "weight_map": {k: f for f, names in shards.items() for k in names}}
    (tmp_path / "base" / "model.safetensors.index.json").write_text(json.dumps(index))
    save_adapter(model, tmp_path / "ours")
    rows = {r.module: r for r in analyse(tmp_path / "base", [tmp_path / "ours"])}
    for name, m in model.named_modules():
        if type(m).__name__ == "DoRALinear":
            d = dora_decomposition_delta(m)
            assert rows[name].delta_m == pytest.approx(d.magnitude, rel=1e-5)
            assert rows[name].delta_d == pytest.approx(d.direction, rel=1e-4)
    assert len(rows) == 6


def test_a_weight_is_found_under_other_wrappers_but_never_in_another_layer():
    from dora.analysis import AnalysisError, resolve_key

    llava_base = ["language_model.model.layers.0.self_attn.q_proj.weight",
                  "language_model.model.layers.1.self_attn.q_proj.weight",
                  "vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight"]
    name = "model.language_model.layers.1.self_attn.q_proj.weight"
    assert resolve_key(name, llava_base, "base") == "language_model.model.layers.1.self_attn.q_proj.weight"
    assert resolve_key("model.language_model.layers.0.self_attn.q_proj.weight", llava_base, "base") == \
        "language_model.model.layers.0.self_attn.q_proj.weight"  # the LLM's layer 0, not CLIP's
    one_shard = ["model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight"]
    with pytest.raises(AnalysisError, match="no tensor named 'model.language_model.layers.7.mlp.down_proj.weight'"):
        resolve_key("model.language_model.layers.7.mlp.down_proj.weight", one_shard, "shard 1 of 3")
