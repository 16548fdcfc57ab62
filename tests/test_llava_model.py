"""LLaVA model assembly from parts, projector file mapping, and the recipe's targeting rule."""
import pytest
import torch

from dora import apply_dora, dora_modules
from recipes.config import load_config
from recipes.llava.model import LlavaModelConfig, ModelConfigError, build_llava, map_projector_state

RECIPE_RULES = load_config("recipes/llava/configs/llava_v1_5_7b_dora.yaml")["dora"]


def test_projector_keys_map_to_transformers_names():
    state = {f"model.mm_projector.{i}.{p}": torch.full((2,), float(i)) for i in (0, 2) for p in ("weight", "bias")}
    mapped = map_projector_state(state)
    assert sorted(mapped) == ["linear_1.bias", "linear_1.weight", "linear_2.bias", "linear_2.weight"]
    assert mapped["linear_2.weight"][0] == 2.0
    unprefixed = map_projector_state({k[len("model."):]: v for k, v in state.items()})
    assert sorted(unprefixed) == sorted(mapped)
    with pytest.raises(ModelConfigError, match="unexpected projector key"):
        map_projector_state({**state, "model.mm_projector.4.weight": torch.zeros(1)})
    with pytest.raises(ModelConfigError, match="lacks"):
        map_projector_state({k: v for k, v in state.items() if "2.bias" not in k})


@pytest.fixture(scope="module")
def assembled(llava_assets):
    cfg = LlavaModelConfig(llm=str(llava_assets["llm"]), vision_tower=str(llava_assets["vision"]),
                           projector=str(llava_assets["projector"]), dtype="fp32")
    return build_llava(cfg)


def test_assembly_from_parts_keeps_every_weight(llava_assets, assembled):
    from transformers import CLIPVisionModel, LlamaForCausalLM
    model, tokenizer, _ = assembled
    assert model.config.image_seq_length == (48 // 8) ** 2
    assert model.config.image_token_id == tokenizer.convert_tokens_to_ids("<image>")
    llm = LlamaForCausalLM.from_pretrained(llava_assets["llm"])
    tower = CLIPVisionModel.from_pretrained(llava_assets["vision"])
    projector = torch.load(llava_assets["projector"], weights_only=True)
    lm = model.model.language_model
    assert torch.equal(lm.layers[1].mlp.down_proj.weight, llm.model.layers[1].mlp.down_proj.weight)
    assert torch.equal(model.lm_head.weight, llm.lm_head.weight)
    assert torch.equal(model.model.vision_tower.embeddings.patch_embedding.weight,
                       tower.embeddings.patch_embedding.weight)
    assert torch.equal(model.model.multi_modal_projector.linear_2.weight, projector["model.mm_projector.2.weight"])


def test_recipe_rule_adapts_the_language_model_only(assembled):
    import copy
    model = copy.deepcopy(assembled[0])
    report = apply_dora(model, RECIPE_RULES["rules"], RECIPE_RULES["train_fully"], verbose=False)
    names = sorted(dora_modules(model))
    n_layers = model.config.text_config.num_hidden_layers
    assert len(names) == 7 * n_layers and all(n.startswith("model.language_model.layers.") for n in names)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(n.startswith("model.vision_tower") for n in trainable)  # CLIP untouched and frozen
    assert not any("embed_tokens" in n or n.startswith("lm_head") for n in trainable)
    assert {n for n in trainable if "projector" in n} == {
        f"model.multi_modal_projector.linear_{i}.{p}" for i in (1, 2) for p in ("weight", "bias")}
    assert report.rows[0].trainable == sum(p.numel() for n, p in model.named_parameters()
                                           if p.requires_grad and "projector" not in n)
    # why the rule names the language model: a bare q_proj pattern also reaches CLIP's attention
    naive = copy.deepcopy(assembled[0])
    apply_dora(naive, [{"match": r".*q_proj", "rank": 2}], verbose=False)
    assert any(n.startswith("model.vision_tower") for n in dora_modules(naive))


def test_model_section_must_name_a_model():
    with pytest.raises(ModelConfigError, match="needs model.llava"):
        build_llava(LlavaModelConfig(llm="somewhere"))
    with pytest.raises(ModelConfigError, match="either model.llava"):
        build_llava(LlavaModelConfig(llava="a", llm="b"))


def test_gradient_checkpointing_recomputes_layers_and_reuses_the_norm(llava_assets):
    cfg = LlavaModelConfig(llm=str(llava_assets["llm"]), vision_tower=str(llava_assets["vision"]),
                           projector=str(llava_assets["projector"]), dtype="fp32", gradient_checkpointing=True)
    model, _, _ = build_llava(cfg)
    apply_dora(model, RECIPE_RULES["rules"], RECIPE_RULES["train_fully"], verbose=False)
    model.train()
    layer = dora_modules(model)["model.language_model.layers.0.self_attn.q_proj"]
    calls = []
    layer.register_forward_hook(lambda *args: calls.append(1))
    ids = torch.tensor([[1, 5, 6, 7, 8]])
    model(input_ids=ids, labels=ids).loss.backward()
    assert len(calls) == 2  # forward, and its recomputation in backward
    assert layer.norm_computations == 1  # which reused the cached norm
    assert layer.lora_B.grad is not None


def test_paper_config_is_the_official_run():
    """NVlabs/DoRA visual_instruction_tuning/Dora_7b.sh (7e2f10a) and LLaVA's scripts/zero3.json (c121f04)."""
    from recipes.trainer import TrainConfig, deepspeed_config

    config = load_config("recipes/llava/configs/llava_v1_5_7b_dora.yaml")
    rule = config["dora"]["rules"][0]
    assert (rule["rank"], rule["alpha"], rule["dropout"], rule["dropout_mode"]) == (128, 256, 0.05, "exact")
    train = TrainConfig.from_dict(config["train"])
    assert (train.lr, train.lr_groups[0]["lr"], train.epochs, train.global_batch_size) == (2e-4, 2e-5, 1, 128)
    assert (train.weight_decay, train.warmup_ratio, train.scheduler, train.precision) == (0.0, 0.03, "cosine", "bf16")
    assert train.tf32 and train.group_by_modality_length and config["data"]["model_max_length"] == 2048
    # transformers 4.31's TrainingArguments: optim "adamw_hf" (transformers' AdamW), adam_epsilon 1e-8, betas default
    assert (train.optimizer, train.adam_eps, tuple(train.adam_betas)) == ("adamw_hf", 1e-8, (0.9, 0.999))
    ds = deepspeed_config(train.deepspeed, micro=4, accumulation=4, world=8, max_grad_norm=train.max_grad_norm,
                          precision="bf16", hidden_size=4096)
    assert ds["gradient_clipping"] == 0 and ds["zero_optimization"]["stage"] == 3  # the official run never clipped
    assert ds["train_batch_size"] == 128 and ds["bf16"]["enabled"]


def test_dvora_recipe_is_the_dora_recipe_with_veras_update(assembled):
    """llava_v1_5_7b_dvora.yaml: the DoRA recipe but for the rule's variant / rank / VeRA options, the rate and the
    output folder; its rule adapts the same modules, training b, d and m (out + rank + out per module)."""
    import copy
    dora_cfg = load_config("recipes/llava/configs/llava_v1_5_7b_dora.yaml")
    dvora_cfg = load_config("recipes/llava/configs/llava_v1_5_7b_dvora.yaml")
    rule = dvora_cfg["dora"]["rules"][0]
    assert rule["match"] == dora_cfg["dora"]["rules"][0]["match"]
    assert (rule["variant"], rule["rank"], rule["d_initial"]) == ("vera", 1024, 0.1)
    for cfg in (dora_cfg, dvora_cfg):
        cfg["dora"]["rules"] = None
        cfg["train"].pop("lr"), cfg["train"].pop("output_dir")
    assert dora_cfg == dvora_cfg
    model = copy.deepcopy(assembled[0])
    report = apply_dora(model, [rule], load_config("recipes/llava/configs/llava_v1_5_7b_dvora.yaml")["dora"]
                        ["train_fully"], verbose=False)
    modules = dora_modules(model)
    assert len(modules) == 7 * model.config.text_config.num_hidden_layers
    assert report.rows[0].kind == "dvora"
    assert report.rows[0].trainable == sum(2 * m.out_features + 1024 for m in modules.values())
    print(report.table())
