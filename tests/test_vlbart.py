"""VL-BART: the visual encoder against the reference's input assembly, NLVR2's two images, targeting, task
sampling, generation, the T5 backbone, data files, and the recipe end to end (1 and 2 processes, resume)."""
import json
import os
import random
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml

from data.sampling import RoundRobinBatches
from data.vlbart import NLVR_ANSWERS, VLCollator, draw_answer, read_karpathy_captions, read_nlvr, read_vqa
from data.image_features import pool_grid
from recipes.vlbart.model import VisualConfig, VLSeq2Seq, extra_tokens
import subprocesses

ROOT = Path(__file__).resolve().parents[1]
FEAT = 16
QV_RULE = (r"backbone\.model\.(encoder\.layers\.\d+\.self_attn|decoder\.layers\.\d+\.(self_attn|encoder_attn))"
           r"\.(q|v)_proj")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """The demo's data and tiny BART, and random features for its images (no tower: fast)."""
    from data.features import FeatureWriter
    from data.vlbart_demo import write_vlbart_demo
    from recipes.vlbart.demo import image_texts
    from recipes.vlbart.demo_models import make_tiny_bart

    root = tmp_path_factory.mktemp("vlbart")
    files = write_vlbart_demo(root / "data", n_train_images=24, n_test_images=8, image_size=32)
    make_tiny_bart(root / "bart", image_texts(), steps=0, d_model=32, dropout=0.0)  # runs compare number for number
    g = torch.Generator().manual_seed(0)
    with FeatureWriter(root / "features", shard_size=16) as w:
        for image in sorted(files["images"].glob("*.png")):
            w.add(image.stem, torch.randn(49, FEAT, generator=g).half())
    return {"root": root, **files, "bart": root / "bart", "features": root / "features"}


@pytest.fixture(scope="module")
def tiny(assets):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(assets["bart"])
    model = VLSeq2Seq.from_backbone(str(assets["bart"]), tokenizer, VisualConfig(feat_dim=FEAT)).eval()
    return model, tokenizer


# ------------------------------------------------------------------------------------------------ the model
def test_encoder_input_is_the_references_assembly(tiny):
    """Text: token embeddings + BART positions, then layernorm_embedding; visual tokens appended after the text
    (and its padding), with neither; one attention mask over both."""
    model, tok = tiny
    enc = tok(["vqa: what colour is it?", "vqa: how many?"], padding=True, return_tensors="pt")
    feats = torch.randn(2, 1, 49, FEAT)
    seen = {}
    encoder = model.backbone.get_encoder()
    handle = encoder.layers[0].register_forward_pre_hook(lambda m, args: seen.update(x=args[0]))
    with torch.no_grad():
        out, mask = model.encode(enc.input_ids, enc.attention_mask, feats)
    handle.remove()
    T = enc.input_ids.shape[1]
    with torch.no_grad():
        text = encoder.embed_tokens(enc.input_ids) + encoder.embed_positions(enc.input_ids)
        text = encoder.layernorm_embedding(text)
        visual = model.visual_tokens(feats)
    assert visual.shape == (2, 36, model.config.d_model)  # 7 x 7 pooled to 6 x 6
    torch.testing.assert_close(seen["x"][:, :T], text)
    torch.testing.assert_close(seen["x"][:, T:], visual)
    assert out.last_hidden_state.shape == (2, T + 36, model.config.d_model)
    assert mask[:, :T].tolist() == enc.attention_mask.tolist() and bool(mask[:, T:].all())


def test_visual_embedding_sums_its_parts_and_ties_object_order_to_vis_extra_ids(tiny):
    model, tok = tiny
    feats = torch.randn(1, 2, 49, FEAT)
    emb = model.visual_embedding
    with torch.no_grad():
        got = model.visual_tokens(feats)
        pooled = pool_grid(feats, (6, 6)).flatten(1, 2)
        words = model.backbone.get_input_embeddings().weight
        obj = torch.stack([words[tok.convert_tokens_to_ids(f"<vis_extra_id_{k}>")] for k in range(36)] * 2)
        img = emb.img_order_embedding.weight[torch.tensor([0] * 36 + [1] * 36)]
        box = emb.absolute_vis_pos_embedding(torch.zeros(1, 72, 5))
        want = emb.feat_embedding(pooled) + box + img + obj
    torch.testing.assert_close(got, want)
    assert len(tok) == model.backbone.get_input_embeddings().num_embeddings
    assert extra_tokens()[-1] == "<vis_extra_id_0>" and tok.convert_tokens_to_ids("<vis_extra_id_0>") == len(tok) - 1


def test_grid_pooling_is_per_image_adaptive_max_pooling():
    feats = torch.randn(3, 2, 49, 5)
    want = torch.nn.AdaptiveMaxPool2d((6, 6))(feats.view(6, 7, 7, 5).permute(0, 3, 1, 2))
    got = pool_grid(feats, (6, 6))
    torch.testing.assert_close(got, want.permute(0, 2, 3, 1).reshape(3, 2, 36, 5))
    # image 1's values never reach image 0's tokens
    bumped = feats.clone()
    bumped[:, 1] += 100
    torch.testing.assert_close(pool_grid(bumped, (6, 6))[:, 0], got[:, 0])


def test_nlvr2_two_images_are_told_apart_by_image_order(tiny):
    model, tok = tiny
    enc = tok(["nlvr: both are red."], return_tensors="pt")
    a, b = torch.randn(1, 1, 49, FEAT), torch.randn(1, 1, 49, FEAT)
    with torch.no_grad():
        ab = model.encode(enc.input_ids, enc.attention_mask, torch.cat([a, b], 1))[0].last_hidden_state
        ba = model.encode(enc.input_ids, enc.attention_mask, torch.cat([b, a], 1))[0].last_hidden_state
    assert ab.shape[1] == enc.input_ids.shape[1] + 72
    assert not torch.allclose(ab, ba, atol=1e-4)  # swapping the images changes what the encoder sees
    candidates = tok(list(NLVR_ANSWERS), padding=True, return_tensors="pt").input_ids
    choice = model.choose(enc.input_ids, enc.attention_mask, torch.cat([a, b], 1), candidates)
    assert choice.shape == (1,) and int(choice) in (0, 1)


def test_choose_compares_the_first_answer_token_after_the_decoder_start(tiny):
    model, tok = tiny
    enc = tok(["nlvr: a", "nlvr: b"], padding=True, return_tensors="pt")
    feats = torch.randn(2, 2, 49, FEAT)
    candidates = tok(["true", "false"], padding=True, return_tensors="pt").input_ids  # <s> X </s>
    with torch.no_grad():
        start = torch.tensor([[model.config.decoder_start_token_id, tok.bos_token_id]] * 2)
        logits = model(enc.input_ids, enc.attention_mask, feats, decoder_input_ids=start)[:, 1]
    want = logits[:, candidates[:, 1]].argmax(-1)
    assert model.choose(enc.input_ids, enc.attention_mask, feats, candidates).tolist() == want.tolist()


def test_greedy_generate_is_step_by_step_argmax_and_beam_search_runs(tiny):
    model, tok = tiny
    enc = tok(["caption: ", "vqa: what?"], padding=True, return_tensors="pt")
    feats = torch.randn(2, 1, 49, FEAT)
    out = model.generate(enc.input_ids, enc.attention_mask, feats, num_beams=1, do_sample=False, max_new_tokens=6,
                         min_new_tokens=6, forced_bos_token_id=None, forced_eos_token_id=None)
    seq = torch.full((2, 1), model.config.decoder_start_token_id)
    with torch.no_grad():
        for _ in range(6):
            nxt = model(enc.input_ids, enc.attention_mask, feats, decoder_input_ids=seq)[:, -1]
            nxt[:, model.config.eos_token_id] = -float("inf")  # min_new_tokens: no end token yet
            seq = torch.cat([seq, nxt.argmax(-1, keepdim=True)], 1)
    assert out.tolist() == seq.tolist()
    beams = model.generate(enc.input_ids, enc.attention_mask, feats, num_beams=3, num_return_sequences=3,
                           max_new_tokens=6, output_scores=True, return_dict_in_generate=True)
    assert beams.sequences.shape[0] == 6
    scores = beams.sequences_scores.view(2, 3)
    assert (scores[:, :-1] >= scores[:, 1:]).all()  # best beam first


def test_save_and_load_round_trip(tiny, tmp_path):
    model, tok = tiny
    model.save_pretrained(tmp_path / "m")
    again = VLSeq2Seq.from_pretrained(tmp_path / "m").eval()
    enc = tok(["vqa: what?"], return_tensors="pt")
    feats = torch.randn(1, 1, 49, FEAT)
    labels = tok(["red"], return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(again(enc.input_ids, enc.attention_mask, feats, labels=labels),
                                   model(enc.input_ids, enc.attention_mask, feats, labels=labels))


def test_t5_backbone_is_a_config_change(tmp_path):
    """VL-T5: the same visual encoder on T5 (relative positions, no embedding norm: the joint sequence as is)."""
    from transformers import T5Config, T5ForConditionalGeneration

    from dora import apply_dora
    from recipes.vlbart.demo_models import train_tokenizer
    bart_tok = train_tokenizer(["what colour is the circle", "true false red"] * 5, tmp_path / "tok", vocab_size=300)
    T5ForConditionalGeneration(T5Config(vocab_size=len(bart_tok), d_model=32, d_ff=64, d_kv=8, num_layers=2,
                                        num_heads=4, pad_token_id=1, eos_token_id=2, decoder_start_token_id=1)
                               ).save_pretrained(tmp_path / "t5")
    model = VLSeq2Seq.from_backbone(str(tmp_path / "t5"), bart_tok, VisualConfig(feat_dim=FEAT)).eval()
    assert getattr(model.backbone.get_encoder(), "layernorm_embedding", None) is None
    enc = bart_tok(["vqa: what colour?"], return_tensors="pt")
    feats = torch.randn(1, 1, 49, FEAT)
    seen = {}
    handle = model.backbone.get_encoder().block[0].register_forward_pre_hook(
        lambda m, args, kwargs: seen.update(x=args[0] if args else kwargs["hidden_states"]), with_kwargs=True)
    with torch.no_grad():
        model.encode(enc.input_ids, enc.attention_mask, feats)
        want = torch.cat([model.backbone.get_encoder().embed_tokens(enc.input_ids), model.visual_tokens(feats)], 1)
    handle.remove()
    torch.testing.assert_close(seen["x"], want)
    report = apply_dora(model, [{"match": r"backbone\.(encoder|decoder)\.block\.\d+\.layer\.\d+\.(SelfAttention|"
                                          r"EncDecAttention)\.(q|v)", "rank": 4, "alpha": 4}],
                        ["visual_embedding\\..*"], verbose=False)
    assert len(report.rows[0].matched) == 2 * 2 + 2 * 2 * 2  # encoder self, decoder self and cross: q and v
    assert model.generate(enc.input_ids, enc.attention_mask, feats, max_new_tokens=3).shape[0] == 1


@pytest.mark.parametrize("config_name,feat_dim,share", [
    ("vlbart_image_dora", 2048, 5.96), ("vlbart_video_dora", 512, 5.19),
    ("vlbart_image_lora", 2048, 5.93), ("vlbart_video_lora", 512, 5.17)])
def test_paper_configs_train_the_papers_share_on_bart_base_shapes(config_name, feat_dim, share):
    """Each config on bart-base's architecture (random weights): 36 q/v modules adapted, and the share of
    parameters the paper reports (DoRA: 5.96 % image, 5.19 % video; LoRA: 5.93 %, 5.17 %)."""
    from transformers import BartConfig, BartForConditionalGeneration

    from recipes.config import load_config
    from recipes.vlbart.train import adapt
    config = load_config(ROOT / f"recipes/vlbart/configs/{config_name}.yaml")
    base = dict(d_model=768, encoder_layers=6, decoder_layers=6, encoder_attention_heads=12,  # facebook/bart-base
                decoder_attention_heads=12, encoder_ffn_dim=3072, decoder_ffn_dim=3072)
    bart = BartForConditionalGeneration(BartConfig(vocab_size=50265 + 200, **base))  # + VL-T5's 200 tokens
    model = VLSeq2Seq(bart, VisualConfig(feat_dim=feat_dim))
    adapt(model, config)
    adapted = [n for n, m in model.named_modules() if n.endswith(("q_proj", "v_proj")) and
               any(p.requires_grad for k, p in m.named_parameters() if "lora" in k or "magnitude" in k)]
    assert len(adapted) == 36
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    assert round(100 * trainable / total, 2) == share
    layer_norms = [n for n, p in model.named_parameters() if p.requires_grad and "layer_norm.weight" in n]
    assert bool(layer_norms) == (config_name == "vlbart_image_dora")  # only the image DoRA run trains LayerNorms


# ------------------------------------------------------------------------------------------------ data
def test_task_files_read_as_the_reference_reads_them(assets):
    vqa = read_vqa(assets["vqa_train"])
    assert vqa[0].images == (vqa[0].images[0],) and vqa[0].answers and vqa[0].id.isdigit()
    nlvr = read_nlvr(assets["nlvr_train"])
    assert len(nlvr[0].images) == 2 and set(nlvr[0].answers) <= set(NLVR_ANSWERS)
    train = read_karpathy_captions(assets["coco"], ["train", "restval"], per_caption=True)
    test = read_karpathy_captions(assets["coco"], ["test"], per_caption=False)
    assert len(train) == 5 * 24 and len(test) == 8 and test[0].answers is None  # one example per caption / image


def test_vqa_target_is_drawn_by_score_and_weights_the_loss():
    rng = random.Random(0)
    draws = Counter(draw_answer({"net": 1.0, "mesh": 0.3, "no": 0.0}, rng)[0] for _ in range(4000))
    assert set(draws) == {"net", "mesh"} and abs(draws["mesh"] / 4000 - 0.3 / 1.3) < 0.03
    assert draw_answer({"net": 1.0, "mesh": 0.3}, random.Random(1))[1] in (1.0, 0.3)
    assert draw_answer({}, rng) == ("", 0.0)
    from recipes.vlbart.tasks import TaskConfig, task_loss
    logits = torch.randn(2, 3, 11)
    labels = torch.tensor([[1, 2, -100], [3, 4, 5]])
    plain = task_loss(logits, labels, None, TaskConfig.from_dict("gqa", {}))
    weighted = task_loss(logits, labels, torch.tensor([1.0, 0.0]), TaskConfig.from_dict("vqa", {"score_weighted": True}))
    per_example = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none",
                                                    ignore_index=-100)
    torch.testing.assert_close(plain, torch.stack([per_example[0, :2].mean(), per_example[1].mean()]).mean())
    torch.testing.assert_close(weighted, per_example[0, :2].mean() / 2)
    token = task_loss(logits, labels, None, TaskConfig.from_dict("caption", {"loss": "token"}))
    torch.testing.assert_close(token, per_example[labels != -100].mean())


def test_missing_features_are_a_counted_skip(assets, tiny):
    from recipes.vlbart.tasks import TaskConfig, task_dataset
    _, tok = tiny
    task = TaskConfig.from_dict("vqa", {"train": [str(assets["vqa_train"])], "features": [str(assets["features"])]})
    ds = task_dataset(task, tok, "train")
    ds.features.stores = []  # no store holds anything
    sample = ds[0]
    assert sample["skip"] == "missing features"
    assert VLCollator(tok.pad_token_id)([sample, sample]) == {"empty": True, "skipped": ["missing features"] * 2,
                                                              "task": "vqa"}


def test_round_robin_reads_every_task_once_per_epoch_in_proportion():
    sizes = {"vqa": 30, "gqa": 50, "nlvr": 9}
    per_rank = {"vqa": 3, "gqa": 5, "nlvr": 2}
    plans = [RoundRobinBatches(sizes, per_rank, rank, 2, seed=1) for rank in range(2)]
    epoch0 = [p.micro_batches(0) for p in plans]
    assert len(epoch0[0]) == len(epoch0[1]) == len(plans[0]) == 5 + 5 + 3
    tasks = [[plans[0].task_of(b[0]) for b in mbs] for mbs in epoch0]
    assert tasks[0] == tasks[1]  # every rank runs the same task at every step
    assert Counter(tasks[0]) == {"vqa": 5, "gqa": 5, "nlvr": 3}
    for mbs in epoch0:
        assert all(len({plans[0].task_of(i) for i in b}) == 1 for b in mbs)  # one task per micro-batch
    seen = Counter(i for mbs in epoch0 for b in mbs for i in b)
    assert set(seen) == set(range(89)) and max(seen.values()) == 2 and sum(seen.values()) == 30 + 50 + 10  # nlvr padded
    epoch1 = plans[0].micro_batches(1)
    assert epoch1 != epoch0[0] and plans[0].micro_batches(1) == epoch1  # new order per epoch, reproducible


# ------------------------------------------------------------------------------------------------ recipe
def write_config(assets, out: Path, **train) -> Path:
    config = yaml.safe_load((ROOT / "recipes/vlbart/configs/demo_image.yaml").read_text())
    text = json.dumps(config).replace("runs/vlbart_demo/data", str(assets["root"] / "data"))
    text = text.replace("runs/vlbart_demo/features", str(assets["features"]))
    config = json.loads(text.replace("runs/vlbart_demo/bart", str(assets["bart"])))
    config["model"]["feat_dim"] = FEAT
    config["model"]["dtype"] = "fp32"
    for task, size in (("vqa", 8), ("gqa", 8), ("nlvr", 4), ("caption", 8)):
        config["tasks"][task]["batch_size"] = size
        config["tasks"][task]["score"]["meteor"] = False
    config["train"].update(output_dir=str(out), epochs=1, max_steps=8, optimizer="sgd", lr=0.1, warmup_ratio=0.0,
                           save_steps=0, **train)
    path = out.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(config))
    return path


def train(config: Path, processes: int = 1) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT))
    script = str(ROOT / "recipes/vlbart/train.py")
    port = None
    if processes == 1:
        cmd = [sys.executable, script, str(config)]
    else:
        from test_llava_training import free_port
        port = free_port()
        cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(processes), "--master_port",
               str(port), script, str(config)]
    proc = subprocesses.run(cmd, what="VL-BART training", timeout=600, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    out = Path(yaml.safe_load(config.read_text())["train"]["output_dir"])
    summary = out / "train_summary.json"
    return {"log": proc.stdout + proc.stderr, "summary": json.loads(summary.read_text()) if summary.is_file() else None,
            "port": port}


@pytest.fixture(scope="module")
def single_run(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("vlruns") / "single"
    return out, train(write_config(assets, out))


def test_recipe_trains_all_four_tasks_and_writes_the_adapter(single_run):
    out, result = single_run
    assert result["summary"]["steps"] == 8 and len(result["summary"]["losses"]) == 8
    assert "12" in result["summary"]["trainable"] and "dora" in result["summary"]["trainable"]
    for path in ("adapter/dora_config.json", "adapter_peft/adapter_config.json", "tokenizer/tokenizer_config.json",
                 "config.yaml"):
        assert (out / path).is_file(), path


@pytest.mark.parametrize("stage", [2, 3])
def test_two_processes_give_the_losses_of_one(assets, single_run, tmp_path, stage):
    _, reference = single_run  # ZeRO-2: every parameter on every rank; ZeRO-3: partitioned, gathered per module
    two = train(write_config(assets, tmp_path / "two", deepspeed=f"launch/zero{stage}.json"), processes=2)
    assert two["summary"]["losses"] == pytest.approx(reference["summary"]["losses"], rel=1e-4)
    # DeepSpeed's CPU all-reduce buffers (69 MB of /dev/shm per rank) are gone with the run
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{two['port']}_*"))


def test_resume_continues_exactly(assets, single_run, tmp_path):
    _, reference = single_run
    config = write_config(assets, tmp_path / "resumed", pause_at_step=3)
    first = train(config)
    assert "paused at step 3" in first["log"]
    second = train(config)
    assert "resumed from" in second["log"]
    assert second["summary"]["losses"] == pytest.approx(reference["summary"]["losses"], rel=1e-6)


def test_evaluate_scores_every_task_with_the_official_scorers(single_run):
    out, _ = single_run
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocesses.run([sys.executable, "-m", "recipes.vlbart.evaluate", str(out), "--batch-size", "4"],
                            what="recipes.vlbart.evaluate", timeout=600, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    scores = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(scores) == {"vqa", "gqa", "nlvr", "caption"}
    details = json.loads((out / "eval" / "scores.json").read_text())["details"]
    assert details["nlvr"]["coverage"]["predicted"] == details["nlvr"]["coverage"]["expected"] == 8 * 3
    lines = (out / "eval" / "predictions_nlvr.jsonl").read_text().splitlines()
    assert {json.loads(line)["text"] for line in lines} <= set(NLVR_ANSWERS)
    first = {p.name: p.read_text() for p in (out / "eval").glob("predictions_*.jsonl")}
    again = subprocesses.run([sys.executable, "-m", "recipes.vlbart.evaluate", str(out), "--batch-size", "4"],
                             what="recipes.vlbart.evaluate, second time", timeout=600, cwd=ROOT, env=env)
    assert again.returncode == 0 and json.loads(again.stdout.strip().splitlines()[-1]) == scores
    assert {p.name: p.read_text() for p in (out / "eval").glob("predictions_*.jsonl")} == first


def test_evaluation_rebuilds_the_trained_model_whatever_the_random_state(single_run):
    """The added tokens' rows are drawn at random when the model is built from its backbone; <vis_extra_id_k> are
    every visual token's object-order embedding. Evaluation must use the training run's rows (it drew new ones,
    and answers changed between evaluations of one run)."""
    from safetensors.torch import load_file

    from recipes.vlbart.evaluate import load_run
    from recipes.vlbart.model import ADDED_TOKENS

    out, _ = single_run
    rows = load_file(out / ADDED_TOKENS)["rows"]
    models = []
    for seed in (123, 456):
        torch.manual_seed(seed)
        models.append(load_run(out, device="cpu")[0].state_dict())
    assert models[0].keys() == models[1].keys()
    assert all(torch.equal(models[0][k], models[1][k]) for k in models[0])
    shared = models[0]["backbone.model.shared.weight"]
    assert rows.shape == (200, shared.shape[1]) and torch.equal(shared[-200:].float(), rows)


# ------------------------------------------------------------------------------------------------ bad inputs
def _config_with(assets, tmp_path, edit) -> Path:
    path = write_config(assets, tmp_path / "bad")
    config = yaml.safe_load(path.read_text())
    edit(config)
    path.write_text(yaml.safe_dump(config))
    return path


def _one_line_error(proc) -> str:
    """The run's single `error:` line: exit 2, no traceback, one report whatever the number of ranks."""
    errors = [line for line in proc.stderr.splitlines() if "error: " in line and "exits with return code" not in line]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and len(errors) == 1, subprocesses.output(proc)
    return errors[0]


def _copy_store(src: Path, dst: Path) -> Path:
    import shutil
    shutil.copytree(src, dst)
    return dst


def test_a_feature_store_of_another_width_is_refused_before_the_model_is_built(assets, tmp_path):
    from recipes.vlbart.train import main

    path = _config_with(assets, tmp_path, lambda c: c["model"].update(feat_dim=2 * FEAT))
    with pytest.raises(Exception, match=rf"tasks.\w+.features: {assets['features']} holds {FEAT}-wide features, but "
                                        rf"the model takes {2 * FEAT} \(model.feat_dim\)") as e:
        main([str(path)])
    assert type(e.value).__name__ == "ConfigError"
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT))
    proc = subprocesses.run([sys.executable, str(ROOT / "recipes/vlbart/train.py"), str(path)], env=env, cwd=ROOT,
                            what="VL-BART training with features of another width", timeout=300)
    assert "holds 16-wide features, but the model takes 32" in _one_line_error(proc)


def test_a_damaged_shard_is_named_at_start_up(assets, tmp_path):
    from recipes.vlbart.train import main

    store = _copy_store(assets["features"], tmp_path / "features")
    shard = sorted(store.glob("part-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # a copy cut short
    path = _config_with(assets, tmp_path, lambda c: c["tasks"]["gqa"].update(features=[str(store)]))
    with pytest.raises(Exception, match=rf"tasks.gqa.features: shard {shard} cannot be read") as e:
        main([str(path)])
    assert type(e.value).__name__ == "TaskDataError"


def test_an_empty_task_file_is_named_once_by_two_processes(assets, tmp_path):
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    path = _config_with(assets, tmp_path, lambda c: c["tasks"]["nlvr"].update(train=[str(empty)]))
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT))
    from test_llava_training import free_port
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
           str(ROOT / "recipes/vlbart/train.py"), str(path)]
    proc = subprocesses.run(cmd, what="2-process VL-BART training with an empty task file", timeout=300, env=env,
                            cwd=ROOT)
    assert _one_line_error(proc).endswith(f"error: tasks.nlvr: the train file {empty} holds no examples")


def test_too_few_examples_for_the_processes_name_the_task_and_file(assets, tmp_path):
    from data.vlbart import TaskDataError
    from recipes.vlbart import train as recipe

    one = tmp_path / "one.json"
    one.write_text(json.dumps(json.loads(Path(assets["root"] / "data/nlvr/train.json").read_text())[:1]))
    path = _config_with(assets, tmp_path, lambda c: c["tasks"]["nlvr"].update(train=[str(one)]))
    captured = {}

    class Stop(Exception):
        pass

    class Recorder:  # the trainer asks the recipe for its batch plan with the world size
        def __init__(self, config, model, dataset, collate, loss, hidden_size, batches):
            captured["batches"] = batches
            raise Stop

    original = recipe.Trainer
    recipe.Trainer = Recorder
    try:
        with pytest.raises(Stop):
            recipe.main([str(path)])
    finally:
        recipe.Trainer = original
    with pytest.raises(TaskDataError, match=rf"tasks.nlvr: 1 training example in {one} cannot be shared by 2 "
                                            rf"processes"):
        captured["batches"](0, 2)


def test_malformed_labels_say_what_is_wrong(tmp_path):
    from data.vlbart import TaskDataError

    vqa = tmp_path / "vqa.json"
    vqa.write_text(json.dumps([{"img_id": "i", "sent": "q?", "question_id": 7, "label": {"two": 1.0}},
                               {"img_id": "i", "sent": "q?", "question_id": 8, "label": ["two", "2"]}]))
    with pytest.raises(TaskDataError, match=r"vqa.json: entry 1 \(question_id 8\): label \['two', '2'\] is not "
                                            r"\{answer: score\}"):
        read_vqa(str(vqa))
    vqa.write_text(json.dumps([{"img_id": "i", "sent": "q?", "question_id": 8, "label": {"two": "1"}}]))
    with pytest.raises(TaskDataError, match="numeric scores"):
        read_vqa(str(vqa))
    nlvr = tmp_path / "nlvr.json"
    nlvr.write_text(json.dumps([{"identifier": "dev-1-0-0", "img0": "a", "img1": "b", "sent": "s", "label": 1},
                                {"identifier": "dev-1-0-1", "img0": "a", "img1": "b", "sent": "s", "label": "True"}]))
    with pytest.raises(TaskDataError, match=r"nlvr.json: entry 1 \(dev-1-0-1\): label 'True' \(str\) must be the "
                                            r"integer 0 \(false\) or 1 \(true\)"):
        read_nlvr(str(nlvr))
    nlvr.write_text(json.dumps([{"identifier": "dev-1-0-0", "img0": "a", "img1": "b", "sent": "s", "label": 1},
                                {"identifier": "dev-1-0-1", "img0": "a", "img1": "b", "sent": "s"}]))
    assert [e.answers for e in read_nlvr(str(nlvr))] == [{"true": 1.0}, None]  # evaluation files have no label


def test_evaluate_offers_allow_partial_when_examples_have_no_features(single_run, assets, tmp_path):
    import shutil

    from data.features import FeatureStore, FeatureWriter

    out, _ = single_run
    run = tmp_path / "run"
    shutil.copytree(out, run, ignore=shutil.ignore_patterns("eval*", "checkpoints"))
    full = FeatureStore(assets["features"])
    dropped = json.loads(Path(assets["root"] / "data/nlvr/test.json").read_text())[0]["img0"]
    with FeatureWriter(tmp_path / "partial", shard_size=16) as w:
        for key in full.ids():
            if key != dropped:
                w.add(key, full.get(key))
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["tasks"]["nlvr"]["features"] = [str(tmp_path / "partial")]
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "recipes.vlbart.evaluate", str(run), "--tasks", "nlvr", "--batch-size", "8"]
    refused = subprocesses.run(command, what="recipes.vlbart.evaluate, features missing", timeout=300, cwd=ROOT,
                               env=env)
    assert "pass --allow-partial" in _one_line_error(refused)
    scored = subprocesses.run(command + ["--allow-partial"], what="recipes.vlbart.evaluate --allow-partial",
                              timeout=300, cwd=ROOT, env=env)
    assert scored.returncode == 0, subprocesses.output(scored)
    coverage = json.loads((run / "eval" / "scores.json").read_text())["details"]["nlvr"]["coverage"]
    assert coverage["expected"] - coverage["predicted"] >= 1


def test_analysis_reads_the_runs_adapters_against_the_bart_it_started_from(assets, single_run):
    """Module names backbone.model.encoder.layers... against BART's own model.encoder.layers... (with the decoder's
    layers.0.self_attn.q_proj beside them)."""
    from dora import load_adapter
    from dora_helpers import assert_analysis_reads_the_run
    from recipes.vlbart.evaluate import load_run

    out, _ = single_run
    model = load_run(out, with_adapter=False, device="cpu")[0]
    load_adapter(model, out / "adapter")
    assert_analysis_reads_the_run(assets["bart"], out, model)


def test_evaluate_reports_vl_t5_s_vqa_number_beside_gt_vision_and_the_settings_that_ran(single_run, tmp_path, capsys):
    """A run whose VQA task is scored as the paper configs score it (protocol vlt5) and decodes with their pinned
    greedy settings: evaluate prints what generate ran with, and VL-T5's number (eval's, on the same predictions)
    with GT-Vision's beside it."""
    import shutil

    from eval.tasks import TaskOptions, score
    from recipes.vlbart.evaluate import main

    out, _ = single_run
    run = tmp_path / "run"
    shutil.copytree(out, run, ignore=shutil.ignore_patterns("eval*", "checkpoints"))
    config = yaml.safe_load((run / "config.yaml").read_text())
    paper = yaml.safe_load((ROOT / "recipes/vlbart/configs/vlbart_image_dora.yaml").read_text())["tasks"]["vqa"]
    config["tasks"]["vqa"]["predict"] = paper["predict"]
    config["tasks"]["vqa"]["score"]["protocol"] = paper["score"]["protocol"]
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    assert main([str(run), "--tasks", "vqa", "--batch-size", "8"]) == 0
    printed = capsys.readouterr().out
    assert ("predict vqa: generate: do_sample=False, num_beams=1, max_length=20, min_length=0, no_repeat_ngram_size=3, "
            "early_stopping=None (from the model), length_penalty=None (from the model), forced_bos_token_id=None, "
            "forced_eos_token_id=None; strip=False") in printed  # early_stopping / length_penalty: beam search only
    vlt5 = score("vqav2", run / "eval/predictions_vqa.jsonl", Path(config["tasks"]["vqa"]["score"]["gt"]),
                 TaskOptions(protocol="vlt5"))
    assert json.loads(printed.strip().splitlines()[-1]) == {"vqa": round(vlt5["score"], 2)}
    assert "VQA accuracy (VL-T5 evaluate_raw)" in printed
    beside = 100 * vlt5["scores"]["gt_vision_accuracy"]  # as the score section asks: EvalAI-processed predictions
    assert f"(GT-Vision vqaEval.py after EvalAI processing: {beside:.2f})" in printed


def test_dvora_image_config_is_the_dora_config_with_veras_update():
    """vlbart_image_dvora.yaml: the DoRA image config but for the rule's variant / rank / VeRA options, the rate and
    the output folder; on a small BART its rule adapts the same 36-module pattern with b, d and m."""
    from transformers import BartConfig, BartForConditionalGeneration

    from recipes.config import load_config
    from recipes.vlbart.train import adapt
    dora_cfg = load_config(ROOT / "recipes/vlbart/configs/vlbart_image_dora.yaml")
    dvora_cfg = load_config(ROOT / "recipes/vlbart/configs/vlbart_image_dvora.yaml")
    rule = dvora_cfg["dora"]["rules"][0]
    assert rule["match"] == dora_cfg["dora"]["rules"][0]["match"] and (rule["variant"], rule["rank"]) == ("vera", 768)
    bart = BartForConditionalGeneration(BartConfig(vocab_size=64, d_model=16, encoder_layers=1, decoder_layers=1,
                                                   encoder_attention_heads=2, decoder_attention_heads=2,
                                                   encoder_ffn_dim=32, decoder_ffn_dim=32))
    model = VLSeq2Seq(bart, VisualConfig(feat_dim=8))
    table = adapt(model, dvora_cfg)
    print(table)
    assert "dvora" in table and " 6 " in table  # q, v of encoder self, decoder self and cross attention: 1 layer each
    for cfg in (dora_cfg, dvora_cfg):
        cfg["dora"]["rules"] = None
        cfg["train"].pop("lr"), cfg["train"].pop("output_dir")
    assert dora_cfg == dvora_cfg
