"""`python -m recipes.inspect`: patterns, parts, free parameters and the proposed dora: section, on tiny configs of
four families (LLaVA-NeXT, Qwen2-VL, Idefics3, PaliGemma) and a 70B-sized config built on the meta device."""
import json
import re
import sys
from pathlib import Path

import pytest
import torch
import yaml

from recipes.inspect import inspect_model, main
import subprocesses

ROOT = Path(__file__).resolve().parents[1]
TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=1000)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
              patch_size=8)


def family_config(family: str):
    from transformers import Idefics3Config, LlavaNextConfig, PaliGemmaConfig, Qwen2VLConfig

    if family == "llava_next":
        return LlavaNextConfig(text_config={"model_type": "llama", **TEXT},
                               vision_config={"model_type": "clip_vision_model", **VISION})
    if family == "qwen2_vl":
        return Qwen2VLConfig(text_config={**TEXT, "rope_scaling": {"type": "mrope", "mrope_section": [2, 2, 4]}},
                             vision_config={"depth": 2, "embed_dim": 32, "hidden_size": 64, "num_heads": 2,
                                            "patch_size": 14})
    if family == "idefics3":
        return Idefics3Config(text_config={"model_type": "llama", **TEXT}, vision_config=VISION)
    return PaliGemmaConfig(text_config={"model_type": "gemma", **TEXT}, vision_config=VISION)


# (language model prefix, connector prefix) as each family names them
EXPECTED = {"llava_next": ("model.language_model", "model.multi_modal_projector"),
            "qwen2_vl": ("model.language_model", "model.visual.merger"),
            "idefics3": ("model.text_model", "model.connector"),
            "paligemma": ("model.language_model", "model.multi_modal_projector")}


@pytest.mark.parametrize("family", sorted(EXPECTED))
def test_the_proposal_adapts_the_language_model_and_trains_the_connector(family, tmp_path):
    from transformers import AutoModelForImageTextToText

    from dora import apply_dora

    family_config(family).save_pretrained(tmp_path)
    result = inspect_model(str(tmp_path), rank=4, alpha=8, dropout=0.0)
    lm, connector = EXPECTED[family]
    section = yaml.safe_load(result["yaml"])["dora"]
    assert section["train_fully"] == [re.escape(connector) + r"\..*"]
    assert [r["rank"] for r in section["rules"]] == [4]

    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(family_config(family))  # real weights, on the CPU
    linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    want = {n for n in linear if n.startswith(lm + ".layers.") and re.search(r"\.(self_attn|mlp)\.", n)}
    rule = re.compile(section["rules"][0]["match"])
    assert {n for n in linear if rule.fullmatch(n)} == want and len(want) == 2 * 7  # q k v o gate up down, 2 layers
    report = apply_dora(model, section["rules"], section["train_fully"], verbose=False)
    assert report.trainable == result["report"].trainable  # the meta model's count is the real one
    trained = {n.rsplit(".", 1)[0] for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.startswith(connector) for n in trained)
    assert not any(re.search(r"(vision_tower|vision_model|visual\.blocks)", n) for n in trained)
    assert not any(n.startswith("lm_head") for n in trained)
    parts = {p.part for p in result["patterns"]}
    assert parts == {"language model", "vision tower", "connector"}


def test_parameters_in_no_linear_are_listed_for_the_user(tmp_path):
    family_config("llava_next").save_pretrained(tmp_path)
    result = inspect_model(str(tmp_path), rank=4, alpha=8)
    free = {name: part for name, _, part in result["free"]}
    assert "model.image_newline" in free  # LLaVA-NeXT trains it; not in a Linear
    assert "#    - 'model\\.image_newline'" not in result["yaml"]
    assert "    # - 'model\\.image_newline'" in result["yaml"]  # offered, commented out: the user decides
    assert not any("layernorm" in n or "norm.weight" in n for n in free)  # norms are not "free"


def test_patterns_collapse_indices_and_siblings(tmp_path):
    family_config("qwen2_vl").save_pretrained(tmp_path)
    patterns = {p.regex: p for p in inspect_model(str(tmp_path), rank=4, alpha=8)["patterns"]}
    attn = patterns[r"model\.language_model\.layers\.\d+\.self_attn\.(q|k|v|o)_proj"]
    assert len(attn.names) == 8 and attn.part == "language model"
    assert patterns[r"model\.visual\.merger\.mlp\.\d+"].part == "connector"  # inside visual, still the connector
    assert patterns[r"model\.visual\.blocks\.\d+\.attn\.(qkv|proj)"].part == "vision tower"
    assert patterns["lm_head"].parameters == 1000 * 64


def test_cli_writes_the_section_and_refuses_a_model_that_is_not_a_vlm(tmp_path, capsys):
    from transformers import BertConfig

    family_config("idefics3").save_pretrained(tmp_path / "idefics3")
    assert main([str(tmp_path / "idefics3"), "--rank", "16", "--alpha", "32", "--out", str(tmp_path / "d.yaml")]) == 0
    printed = capsys.readouterr().out
    assert "model\\.text_model\\.layers\\.\\d+\\.self_attn\\.(q|k|v|o)_proj" in printed and "trainable of" in printed and "adapter parameters the section adds" in printed
    assert yaml.safe_load((tmp_path / "d.yaml").read_text())["dora"]["rules"][0]["rank"] == 16
    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(
        tmp_path / "bert")
    assert main([str(tmp_path / "bert")]) == 2
    assert "not an image-text-to-text model" in capsys.readouterr().err
    assert main([str(tmp_path / "missing")]) == 2


def test_a_70b_config_is_inspected_without_its_weights(tmp_path):
    from transformers import LlavaConfig

    LlavaConfig(text_config={"model_type": "llama", "hidden_size": 8192, "intermediate_size": 28672,
                             "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8,
                             "vocab_size": 32064},
                vision_config={"model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096,
                               "num_hidden_layers": 24, "num_attention_heads": 16, "image_size": 336,
                               "patch_size": 14}).to_json_file(tmp_path / "config.json")
    code = ("import json, resource, sys; from recipes.inspect import main; main(sys.argv[1:]);"
            "print(json.dumps({'rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))")
    proc = subprocesses.run([sys.executable, "-c", code, str(tmp_path / "config.json"), "--json"],
                            what="recipes.inspect on a 70B config", timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    result, rss = json.loads("\n".join(lines[:-1])), json.loads(lines[-1])["rss_mb"]
    assert 69e9 < result["parameters"] < 70e9
    assert rss < 2000  # 70B parameters in bf16 would be 138 GB
    assert result["dora"]["rules"][0]["match"].startswith(r"model\.language_model\.layers\.\d+\.")


def test_the_qwen2_vl_example_config_is_what_the_inspector_proposes(tmp_path):
    """recipes/vlm/configs/qwen2_vl_2b_dora.yaml says its dora: section is the inspector's: Qwen2-VL-2B's sizes."""
    from transformers import Qwen2VLConfig

    Qwen2VLConfig(text_config={"hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
                               "num_attention_heads": 12, "num_key_value_heads": 2, "vocab_size": 151936,
                               "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
                               "tie_word_embeddings": True},
                  vision_config={"depth": 32, "embed_dim": 1280, "hidden_size": 1536, "num_heads": 16,
                                 "mlp_ratio": 4, "patch_size": 14, "spatial_merge_size": 2},
                  tie_word_embeddings=True).save_pretrained(tmp_path)
    result = inspect_model(str(tmp_path))
    config = yaml.safe_load((ROOT / "recipes/vlm/configs/qwen2_vl_2b_dora.yaml").read_text())
    assert [r["match"] for r in config["dora"]["rules"]] == [r["match"] for r in result["section"]["rules"]]
    assert config["dora"]["train_fully"] == result["section"]["train_fully"]
    assert 2.2e9 < result["total"] < 2.22e9 and f"{result['report'].share:.3%}" == "7.740%"


def test_routers_are_left_out_and_blip2s_query_tokens_are_trained(tmp_path):
    """Llama 4's MoE router subclasses nn.Linear with its own forward: never proposed (applying the proposal on
    the meta model would raise); BLIP-2's connector is the Q-Former, its projection and the bare query_tokens."""
    from transformers import Blip2Config, Llama4Config

    Llama4Config(text_config={"hidden_size": 64, "intermediate_size": 128, "intermediate_size_mlp": 128,
                              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                              "vocab_size": 1000, "num_local_experts": 2, "head_dim": 16},
                 vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                "num_attention_heads": 2, "image_size": 32, "patch_size": 8, "vision_output_dim": 32,
                                "projector_input_dim": 32, "projector_output_dim": 32}).save_pretrained(tmp_path / "l4")
    result = inspect_model(str(tmp_path / "l4"), rank=4, alpha=8)
    assert [cls for _, cls in result["special"]] == ["Llama4Router", "Llama4Router"]
    assert "router" not in result["section"]["rules"][0]["match"] and "shared_expert" in result["section"]["rules"][0]["match"]
    assert result["yaml"].count("experts\\.gate_up_proj") == 1  # the experts, once for all layers, commented
    Blip2Config(vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                               "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
                qformer_config={"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                                "intermediate_size": 64, "encoder_hidden_size": 32},
                text_config={"model_type": "opt", "hidden_size": 64, "ffn_dim": 128, "num_hidden_layers": 2,
                             "num_attention_heads": 4, "vocab_size": 1000, "word_embed_proj_dim": 64},
                num_query_tokens=4).save_pretrained(tmp_path / "blip2")
    blip2 = inspect_model(str(tmp_path / "blip2"), rank=4, alpha=8)
    assert blip2["section"]["train_fully"] == [r"qformer\..*", r"language_projection\..*", "query_tokens"]
    assert "no connector found" not in blip2["yaml"]
