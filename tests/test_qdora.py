"""QDoRA: DoRA over bitsandbytes' 4-bit and 8-bit layers, through their own kernels.

Exact (fp32 compute) against the same math on the dequantized weight and against PEFT's QDoRA with the same
factors; no dense W0 formed in a training step; a tiny Llama loaded by transformers in NF4 trains, saves, exports
to PEFT, reloads and merges. The layers stay in training mode where outputs are compared: on a CPU with AVX512-BF16,
bitsandbytes repacks a 4-bit weight at its first inference forward and computes in bf16 from then on (measured:
2e-3 off fp32 on a 64-wide layer), which is bitsandbytes' rounding, not ours."""
import bitsandbytes as bnb
import pytest
import torch
import torch.nn as nn

from dora import DoRALinear, apply_dora, export_peft, import_peft, load_adapter, save_adapter, unload_dora
from dora import quantized
from dora.quantized import QuantizedDoRALinear, dequantized_weight


def linear4bit(out=48, inp=64, quant_type="nf4", double_quant=True, compute_dtype=torch.float32, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    layer = bnb.nn.Linear4bit(inp, out, bias=bias, compute_dtype=compute_dtype, quant_type=quant_type,
                              compress_statistics=double_quant)
    layer.weight = bnb.nn.Params4bit(torch.randn(out, inp, generator=g) * 0.05, requires_grad=False,
                                     quant_type=quant_type, compress_statistics=double_quant)
    if bias:
        layer.bias = nn.Parameter(torch.randn(out, generator=g) * 0.1)
    return layer.to("cpu")


def linear8bit(out=48, inp=64, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    layer = bnb.nn.Linear8bitLt(inp, out, bias=bias, has_fp16_weights=False, threshold=0.0)
    layer.weight = bnb.nn.Int8Params(torch.randn(out, inp, generator=g) * 0.05, requires_grad=False,
                                     has_fp16_weights=False)
    if bias:
        layer.bias = nn.Parameter(torch.randn(out, generator=g) * 0.1)
    return layer.to("cpu")


BASES = {"nf4+double-quant": lambda: linear4bit(), "fp4": lambda: linear4bit(quant_type="fp4", double_quant=False),
         "nf4 no bias": lambda: linear4bit(bias=False), "int8": lambda: linear8bit()}


def _perturb(module):
    """Adapters away from their start (B = 0, m = ||W0||), so every term of the output matters."""
    with torch.no_grad():
        if module.lora_B is not None:
            module.lora_B.normal_(0, 0.1, generator=torch.Generator().manual_seed(3))
        module.magnitude.mul_(torch.linspace(0.8, 1.2, module.magnitude.numel()))


def _step(module, x, seed=5):
    module.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the same dropout masks in both layers
    x = x.detach().clone().requires_grad_(True)
    y = module(x)
    (y.square().sum() + y.sum()).backward()
    params = {n: p.grad.clone() for n, p in module.named_parameters() if p.requires_grad}
    return y.detach(), x.grad, params


@pytest.mark.parametrize("base", sorted(BASES))
@pytest.mark.parametrize("options", [{}, {"dropout": 0.2}, {"dropout": 0.2, "dropout_mode": "lora-branch"},
                                     {"detach_norm": False}, {"magnitude_only": True}])
def test_equals_the_same_math_on_the_dequantized_weight(base, options):
    layer = BASES[base]()
    w0 = dequantized_weight(layer).float().clone()
    b0 = None if layer.bias is None else layer.bias.detach().float().clone()
    ours = QuantizedDoRALinear(layer, rank=4, alpha=8, **options)
    reference = DoRALinear(64, 48, rank=4, alpha=8, bias=b0 is not None, **options)
    _perturb(ours)
    with torch.no_grad():
        reference.weight.copy_(w0)
        if b0 is not None:
            reference.bias.copy_(b0)
        for name in ("lora_A", "lora_B", "magnitude"):
            if getattr(ours, name) is not None:
                getattr(reference, name).copy_(getattr(ours, name))
    x = torch.randn(3, 7, 64)
    y, gx, grads = _step(ours, x)
    y_ref, gx_ref, grads_ref = _step(reference, x)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-5, atol=2e-5)
    assert set(grads) == set(grads_ref) and grads
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-4, atol=2e-5, msg=name)
    if options.get("dropout"):  # the dropout was on: another mask gives another output
        _, _, other = _step(ours, x, seed=6)
        assert not torch.allclose(other["magnitude"], grads["magnitude"])


@pytest.mark.parametrize("kind", ["4bit", "8bit"])
def test_equals_peft_qdora_with_the_same_factors(kind):
    from peft import LoraConfig, get_peft_model

    make = (lambda: linear4bit(seed=1)) if kind == "4bit" else (lambda: linear8bit(seed=1))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = make()

        def forward(self, x):
            return self.proj(x)

    ours, theirs = Net(), Net()
    apply_dora(ours, [{"match": "proj", "rank": 4, "alpha": 8}], verbose=False)
    peft = get_peft_model(theirs, LoraConfig(r=4, lora_alpha=8, target_modules=["proj"], use_dora=True))
    layer, m = peft.base_model.model.proj, ours.proj
    assert isinstance(m, QuantizedDoRALinear)
    _perturb(m)
    with torch.no_grad():  # PEFT initialises its magnitude from the dequantized weight: ours must agree
        torch.testing.assert_close(layer.lora_magnitude_vector["default"].weight,
                                   m.magnitude / torch.linspace(0.8, 1.2, 48), rtol=1e-5, atol=1e-6)
        layer.lora_A["default"].weight.copy_(m.lora_A)
        layer.lora_B["default"].weight.copy_(m.lora_B)
        layer.lora_magnitude_vector["default"].weight.copy_(m.magnitude)
    x = torch.randn(5, 64)
    y, gx, grads = _step(ours, x)
    y_peft, gx_peft, grads_peft = _step(peft, x)
    torch.testing.assert_close(y, y_peft, rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(gx, gx_peft, rtol=1e-5, atol=2e-5)
    for ours_name, peft_name in (("proj.magnitude", "lora_magnitude_vector.default.weight"),
                                 ("proj.lora_A", "lora_A.default.weight"), ("proj.lora_B", "lora_B.default.weight")):
        theirs = next(g for n, g in grads_peft.items() if n.endswith(peft_name))
        torch.testing.assert_close(grads[ours_name], theirs, rtol=1e-4, atol=2e-5, msg=ours_name)


def test_a_training_step_forms_no_dense_weight_and_reads_it_through_the_kernel(monkeypatch):
    """After the adapter is applied (||W0||^2 once), a step never dequantizes W0 in our code: the norm's cross term
    is the base layer's own forward on the r rows of A, computed once per optimizer step."""
    layer = QuantizedDoRALinear(linear4bit(), rank=4, alpha=8)
    dequantized, base_rows = [], []
    monkeypatch.setattr(quantized, "dequantized_weight", lambda *a, **k: dequantized.append(1))
    layer.base_layer.register_forward_hook(lambda mod, args, out: base_rows.append(args[0].shape[0]))
    opt = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        for _ in range(3):  # micro-steps of gradient accumulation share the norm
            layer(torch.randn(6, 64)).square().sum().backward()
        opt.step()
        opt.zero_grad()
    assert dequantized == []
    assert base_rows == [4, 6, 6, 6] * 2  # A's 4 rows once per optimizer step, then the tokens
    assert layer.norm_computations == 2


def test_a_transformers_nf4_llama_trains_saves_exports_reloads_and_merges(tmp_path):
    from peft import PeftModel
    from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=100)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "base")
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)

    def load():
        return LlamaForCausalLM.from_pretrained(tmp_path / "base", quantization_config=quant, device_map="cpu").train()

    model = load()
    rules = [{"match": r".*\.(q|v)_proj", "rank": 4, "alpha": 8}]
    apply_dora(model, rules, verbose=False)
    assert isinstance(model.model.layers[0].self_attn.q_proj, QuantizedDoRALinear)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(4):
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    with torch.no_grad():
        reference = model(ids).logits
    save_adapter(model, tmp_path / "adapter")
    export_peft(model, tmp_path / "peft")

    again = load()
    apply_dora(again, rules, verbose=False)
    load_adapter(again, tmp_path / "adapter")
    peft = PeftModel.from_pretrained(load(), tmp_path / "peft").train()
    imported = import_peft(load(), tmp_path / "peft")  # adapted by the PEFT adapter's own config
    with torch.no_grad():
        for other in (again, peft, imported):
            torch.testing.assert_close(other(ids).logits, reference, rtol=1e-5, atol=1e-5)
    unload_dora(model)  # dequantized and merged: plain Linear layers in the compute dtype
    q_proj = model.model.layers[0].self_attn.q_proj
    assert type(q_proj) is nn.Linear and q_proj.weight.dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference, rtol=1e-5, atol=1e-5)


def test_a_quantized_layer_refuses_to_merge_in_place_and_other_linear_subclasses_stay_refused():
    layer = QuantizedDoRALinear(linear4bit(), rank=4, alpha=8)
    with pytest.raises(RuntimeError, match="use to_linear"):
        layer.merge()

    class Router(nn.Linear):
        def forward(self, x):
            return super().forward(x).softmax(-1), x

    from dora import TargetingError
    with pytest.raises(TargetingError, match="nn.Linear subclass with its own forward"):
        apply_dora(nn.Sequential(Router(4, 4)), [{"match": "0", "rank": 2}], verbose=False)


def test_outputs_keep_the_inputs_dtype_and_the_base_norm_stays_fp32():
    """As the 4-bit layer it replaces: computed in the compute dtype (fp32 here), returned in the input's (bf16), so
    an fp32 compute dtype does not promote a bf16 model's hidden states. ||W0||^2 stays fp32 whatever .half() or
    .bfloat16() does to the module (DeepSpeed casts modules so), else g - 1 would not start at 0."""
    layer = QuantizedDoRALinear(linear4bit(), rank=4, alpha=8)
    x = torch.randn(3, 64)
    assert layer(x.bfloat16()).dtype == torch.bfloat16 and layer(x).dtype == torch.float32
    before = layer.base_sq_norm.clone()
    layer.bfloat16()
    assert layer.base_sq_norm.dtype == torch.float32 and torch.equal(layer.base_sq_norm, before)
