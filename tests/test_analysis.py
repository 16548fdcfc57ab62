"""The weight-decomposition analysis: delta_M / delta_D on hand-made weights, the (out, in) layout, the same
numbers from every checkpoint kind, the CLI's CSV and PNG, and reading one layer at a time."""
import copy
import csv
import json
import math
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


def test_cli_names_the_file_it_cannot_read(tmp_path):
    base, _ = _trained_dora()
    _save_weights(base, tmp_path / "base.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="empty: no model.safetensors"):
        analysis.main(["--base", str(tmp_path / "base.safetensors"), "--checkpoints", str(tmp_path / "empty"),
                       "--out", str(tmp_path / "out")])


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
