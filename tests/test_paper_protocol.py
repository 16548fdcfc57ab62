"""The VL-BART paper configs run the official protocol (NVlabs/DoRA 7e2f10a image_video_text_understanding, and
ylsung/VL_adapter 545fcbb for the LoRA and full fine-tuning rows, both on transformers 4.2.1): each official value
below is a fact read from that code, and a config that drifts from it fails here. Also the rules that carry it:
transformers 4.x's AdamW, greedy decoding without forced tokens, `label: {}` with weight 0, VALUE's answer parsing."""
import json
import math
import os
import random
import sys
from pathlib import Path

import pytest
import torch

import subprocesses
from recipes.trainer import TrainConfig, TransformersAdamW

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------ the optimizer
def reference_adamw_4x(params, grads_per_step, lrs, betas=(0.9, 0.999), eps=1e-6, decays=(0.0,)):
    """transformers 4.2.1 optimization.py AdamW.step, element by element in Python floats: m, v moving averages;
    step size lr * sqrt(1 - b2^t) / (1 - b1^t); p -= step * m / (sqrt(v) + eps); then p -= lr * wd * p."""
    b1, b2 = betas
    ps = [list(p) for p in params]
    ms = [[0.0] * len(p) for p in params]
    vs = [[0.0] * len(p) for p in params]
    for t, (grads, lr) in enumerate(zip(grads_per_step, lrs), start=1):
        step = lr * math.sqrt(1 - b2 ** t) / (1 - b1 ** t)
        for i, g in enumerate(grads):
            for j, gj in enumerate(g):
                ms[i][j] = b1 * ms[i][j] + (1 - b1) * gj
                vs[i][j] = b2 * vs[i][j] + (1 - b2) * gj * gj
                ps[i][j] -= step * ms[i][j] / (math.sqrt(vs[i][j]) + eps)
                ps[i][j] -= lr * decays[i] * ps[i][j]
    return ps


def run_optimizer(make, params, grads_per_step, lrs):
    tensors = [torch.tensor(p, dtype=torch.float64, requires_grad=True) for p in params]
    optimizer = make(tensors)
    for grads, lr in zip(grads_per_step, lrs):
        for group in optimizer.param_groups:
            group["lr"] = lr  # a schedule
        for t, g in zip(tensors, grads):
            t.grad = torch.tensor(g, dtype=torch.float64)
        optimizer.step()
    return [t.detach().tolist() for t in tensors]


def test_adamw_hf_is_transformers_4x_adamw_over_several_steps():
    rng = random.Random(0)
    params = [[rng.uniform(-1, 1) for _ in range(7)], [rng.uniform(-1, 1) for _ in range(4)]]
    steps = 8
    # gradient scales 1e-2 .. 1e-7: where eps against the un-corrected sqrt(v) matters
    grads = [[[rng.gauss(0, 1) * 10.0 ** -(2 + s % 6) for _ in p] for p in params] for s in range(steps)]
    lrs = [1e-3 * (s + 1) / steps for s in range(steps)]
    decays = (0.01, 0.0)  # a decayed group and a no-decay group

    def ours(tensors):
        return TransformersAdamW([{"params": [tensors[0]], "weight_decay": decays[0]},
                                  {"params": [tensors[1]], "weight_decay": decays[1]}], lr=lrs[0], eps=1e-6)
    got = run_optimizer(ours, params, grads, lrs)
    want = reference_adamw_4x(params, grads, lrs, decays=decays)
    for g, w in zip(got, want):
        assert g == pytest.approx(w, rel=1e-12, abs=1e-15)

    def torch_adamw(tensors):
        return torch.optim.AdamW([{"params": [tensors[0]], "weight_decay": decays[0]},
                                  {"params": [tensors[1]], "weight_decay": decays[1]}], lr=lrs[0], eps=1e-6)
    # torch's form (eps after the bias correction, decay before the step) moves these weights differently
    other = run_optimizer(torch_adamw, params, grads, lrs)
    moved = [abs(o - p0) for o_, p_ in zip(other, params) for o, p0 in zip(o_, p_)]
    ours_moved = [abs(g - p0) for g_, p_ in zip(got, params) for g, p0 in zip(g_, p_)]
    assert max(abs(a / b - 1) for a, b in zip(moved, ours_moved)) > 0.02


def test_adamw_hf_through_deepspeed_zero2_takes_the_same_steps(tmp_path):
    """The trainer hands the optimizer to DeepSpeed as a client optimizer; under ZeRO-2 (1 process) it updates its
    flattened partition: the weights after 5 steps equal the plain run's."""
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT))
    out = {}
    for kind in ("deepspeed", "plain"):
        out[kind] = tmp_path / f"{kind}.json"
        cmd = [sys.executable, str(ROOT / "tests/ds_adamw_hf.py"), "--out", str(out[kind])]
        proc = subprocesses.run(cmd + (["--plain"] if kind == "plain" else []), what=f"adamw_hf, {kind}",
                                timeout=300, cwd=ROOT, env=env)
        assert proc.returncode == 0, subprocesses.output(proc)
    ds, plain = (json.loads(out[k].read_text()) for k in ("deepspeed", "plain"))
    assert ds.keys() == plain.keys()
    for name in ds:
        assert ds[name] == pytest.approx(plain[name], rel=1e-6, abs=1e-9), name


def test_warmup_steps_round_as_configured():
    from recipes.trainer import make_scheduler, warmup_steps
    assert warmup_steps(TrainConfig(output_dir="x", warmup_ratio=0.1), 1234) == 124  # HF Trainer: ceil
    assert warmup_steps(TrainConfig(output_dir="x", warmup_ratio=0.1, warmup_rounding="floor"), 1234) == 123  # int()
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = make_scheduler(optimizer, TrainConfig(output_dir="x", scheduler="linear", warmup_ratio=0.1,
                                                      warmup_rounding="floor"), 1234)
    lrs = []
    for _ in range(125):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert lrs[123] == 1.0 and lrs[122] == pytest.approx(122 / 123)  # the peak at step 123, as int(123.4)


def test_adamw_hf_with_optimizer_offload_is_a_config_error():
    from recipes.config import ConfigError
    from recipes.trainer import make_optimizer
    with pytest.raises(ConfigError, match="adamw_hf runs on the device"):
        make_optimizer([{"params": [torch.nn.Parameter(torch.zeros(2))]}],
                       TrainConfig(output_dir="x", optimizer="adamw_hf"), cpu_offload=True)


# ------------------------------------------------------------------------------------------------ decoding
# transformers 4.2.1 generate as the reference called it: facebook/bart-base's config.json (no_repeat_ngram_size 3,
# early_stopping true, num_beams 4, forced_bos_token_id 0 and forced_eos_token_id 2 that 4.2.1 does not read) with
# every command-line argument set on it (trainer_base.py create_config: setattr(config, k, v)), so num_beams is the
# scripts' --num_beams 5. vqa_predict / gqa_predict pass num_beams=1; caption_predict passes num_beams and
# max_length=args.gen_max_length (20: caption_args' 40 is not the trainer's args); the video qa_predict passes
# nothing. max_length defaults to 20 (PretrainedConfig), min_length 0, length_penalty 1.0; 4.2.1's BART forces EOS at
# the last step in beam search only (adjust_logits_during_generation); the decoded text is not stripped.
GREEDY = {"mode": "generate", "do_sample": False, "num_beams": 1, "max_length": 20, "min_length": 0,
          "no_repeat_ngram_size": 3, "forced_bos_token_id": None, "forced_eos_token_id": None, "strip": False}
BEAM = {"mode": "generate", "do_sample": False, "num_beams": 5, "max_length": 20, "min_length": 0,
        "no_repeat_ngram_size": 3, "early_stopping": True, "length_penalty": 1.0, "forced_bos_token_id": None,
        "forced_eos_token_id": 2, "strip": False}


def tiny_bart():
    """A random BART whose generation config has facebook/bart-base's fields (as from_pretrained gives them)."""
    from transformers import BartConfig, BartForConditionalGeneration, GenerationConfig
    torch.manual_seed(0)
    model = BartForConditionalGeneration(BartConfig(
        vocab_size=40, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=64, dropout=0.0,
        bos_token_id=0, pad_token_id=1, eos_token_id=2, decoder_start_token_id=2)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.5)
        model.final_logits_bias[0, 2] = 2.5  # answers of several lengths
    model.generation_config = GenerationConfig(bos_token_id=0, eos_token_id=2, pad_token_id=1,
                                               decoder_start_token_id=2, early_stopping=True, num_beams=4,
                                               no_repeat_ngram_size=3, forced_bos_token_id=0, forced_eos_token_id=2)
    return model


def reference_greedy_4x(model, input_ids, max_length=20, no_repeat=3):
    """transformers 4.2.1 greedy_search with BART's config: argmax after the no-repeat-ngram ban, no forced token,
    until EOS or max_length tokens (the decoder start token counted)."""
    seq = [model.config.decoder_start_token_id]
    with torch.no_grad():
        while len(seq) < max_length:
            logits = model(input_ids=input_ids, decoder_input_ids=torch.tensor([seq])).logits[0, -1]
            if len(seq) + 1 >= no_repeat:
                prefix = tuple(seq[-(no_repeat - 1):])
                for i in range(len(seq) - no_repeat + 1):
                    if tuple(seq[i:i + no_repeat - 1]) == prefix:
                        logits[seq[i + no_repeat - 1]] = -float("inf")
            seq.append(int(logits.argmax()))
            if seq[-1] == model.config.eos_token_id:
                break
    return seq


def test_pinned_greedy_decoding_is_the_references_without_forced_tokens():
    """The paper configs' VQA / GQA settings on a model with bart-base's generation fields: what 4.2.1's greedy
    search returns (no forced BOS at the first step, no forced EOS at the last); left to the model's generation
    config, transformers 5 forces both."""
    from recipes.vlbart.tasks import TaskConfig, generate_options
    model = tiny_bart()
    options = generate_options(TaskConfig.from_dict("vqa", {"predict": GREEDY}))
    assert "strip" not in options and "mode" not in options
    g = torch.Generator().manual_seed(3)
    unpinned_differs = 0
    for _ in range(12):
        x = torch.cat([torch.tensor([0]), torch.randint(3, 40, (6,), generator=g), torch.tensor([2])])[None]
        want = reference_greedy_4x(model, x)
        got = model.generate(x, **options)[0].tolist()
        assert [t for t in got if t != 1] == want
        unpinned_differs += model.generate(x, num_beams=1, max_length=20)[0].tolist() != got
    assert unpinned_differs == 12  # forced BOS: the first token is always <s> there


class RecordingModel:
    """Stands in for VLSeq2Seq: records what generate receives; decodes to a text with spaces around it."""

    def __init__(self):
        from transformers import GenerationConfig
        self.calls = []
        self.backbone = type("B", (), {"generation_config": GenerationConfig(num_beams=4, no_repeat_ngram_size=3)})()

    def parameters(self):
        return iter([torch.zeros(1)])

    def generate(self, *args, **kwargs):
        self.calls.append(kwargs)
        return torch.zeros(1, 2, dtype=torch.long)


def test_predict_passes_the_pinned_settings_and_evaluate_prints_them():
    from recipes.vlbart.tasks import TaskConfig, generation_settings, predict_batch
    tokenizer = type("T", (), {"batch_decode": lambda self, out, skip_special_tokens: [" a3 "]})()
    batch = {"input_ids": torch.ones(1, 3, dtype=torch.long), "attention_mask": torch.ones(1, 3, dtype=torch.long),
             "vis_feats": torch.zeros(1, 1, 2, 4)}
    model = RecordingModel()
    task = TaskConfig.from_dict("tvqa", {"predict": BEAM})
    assert predict_batch(model, tokenizer, batch, task, "cpu") == [" a3 "]  # as decoded, as the reference
    assert model.calls[-1] == {k: v for k, v in BEAM.items() if k not in ("mode", "strip")}
    assert predict_batch(model, tokenizer, batch, TaskConfig.from_dict("tvqa", {}), "cpu") == ["a3"]  # ours strips
    line = generation_settings(model, task)
    for key, value in BEAM.items():
        if key != "mode":
            assert f"{key}={value!r}" in line, key
    assert "(from the model)" not in line  # every setting pinned
    unpinned = generation_settings(model, TaskConfig.from_dict("tvqa", {"predict": {"num_beams": 5}}))
    assert "no_repeat_ngram_size=3 (from the model)" in unpinned and "num_beams=5," in unpinned


# ------------------------------------------------------------------------------------------------ label: {}
@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from recipes.vlbart.demo_models import train_tokenizer
    return train_tokenizer(["vqa: what is it? two yes no net mesh"] * 20, tmp_path_factory.mktemp("tok"),
                           vocab_size=300)


def vqa_dataset(tok, answers_list, empty_labels):
    from data.vlbart import Example, FeatureLookup, TaskDataset

    class Store:
        def __contains__(self, key):
            return True

        def get(self, key):
            return torch.zeros(49, 4)
    examples = [Example(str(i), "what is it?", ("img",), a) for i, a in enumerate(answers_list)]
    return TaskDataset("vqa", examples, FeatureLookup([Store()]), tok, prompt="vqa: ", max_target_length=10,
                       empty_labels=empty_labels)


def test_label_without_answer_trains_with_weight_0_as_the_reference(tok):
    """vqa_clip_data.py: scores summing to 0 give the answer '' (target <s></s>) with score 0; the example stays in
    its batch (the batch mean counts it). `drop` leaves such examples out, `refuse` stops naming them."""
    from data.vlbart import TaskDataError
    from recipes.vlbart.tasks import TaskConfig, task_loss

    labels = [{"two": 1.0}, {}, {"net": 0.0}, {"yes": 0.3, "no": 0.0}]
    ds = vqa_dataset(tok, labels, "zero_weight")
    assert len(ds) == 4 and ds.empty_label_count == 2
    for i, want_score in enumerate([1.0, 0.0, 0.0, 0.3]):
        sample = ds[i]
        assert sample["score"] == want_score
        if want_score == 0.0:
            assert sample["labels"] == tok("")["input_ids"] == [tok.bos_token_id, tok.eos_token_id]
    logits = torch.randn(2, 2, 50)
    labels_t = torch.tensor([[0, 2], [0, 2]])
    task = TaskConfig.from_dict("vqa", {"score_weighted": True})
    one = task_loss(logits[:1], labels_t[:1], torch.tensor([1.0]), task)
    assert task_loss(logits, labels_t, torch.tensor([1.0, 0.0]), task) == pytest.approx(one / 2)  # counted in the mean
    dropped = vqa_dataset(tok, labels, "drop")
    assert len(dropped) == 2 and dropped.empty_label_count == 2
    with pytest.raises(TaskDataError, match=r"2 training examples have no answer with a positive score \(first: "
                                            r"\['1', '2'\]\)"):
        vqa_dataset(tok, labels, "refuse")
    with pytest.raises(TaskDataError, match="1 training examples have no label"):
        vqa_dataset(tok, [{"two": 1.0}, None], "zero_weight")  # a missing label is still an error


def test_read_vqa_keeps_empty_labels_and_still_refuses_malformed_ones(tmp_path):
    from data.vlbart import TaskDataError, read_vqa
    path = tmp_path / "karpathy_train.json"
    path.write_text(json.dumps([{"img_id": "i", "sent": "q?", "question_id": 1, "label": {}},
                                {"img_id": "i", "sent": "q?", "question_id": 2, "label": {"two": 1}}]))
    assert [e.answers for e in read_vqa(str(path))] == [{}, {"two": 1.0}]
    path.write_text(json.dumps([{"img_id": "i", "sent": "q?", "question_id": 1, "label": []}]))
    with pytest.raises(TaskDataError, match="is not {answer: score}"):
        read_vqa(str(path))


def test_empty_labels_is_checked_in_the_config():
    from recipes.config import ConfigError
    from recipes.vlbart.tasks import TaskConfig
    with pytest.raises(ConfigError, match=r"tasks.vqa.empty_labels must be one of \('zero_weight', 'drop', "
                                          r"'refuse'\), not 'skip'"):
        TaskConfig.from_dict("vqa", {"empty_labels": "skip"})


def test_start_up_reports_the_empty_labels_once(tok):
    from recipes.vlbart.train import empty_label_lines
    datasets = {"vqa": vqa_dataset(tok, [{"two": 1.0}, {}, {}], "zero_weight"),
                "gqa": vqa_dataset(tok, [{"two": 1.0}], "zero_weight")}
    assert empty_label_lines(datasets) == [
        "tasks.vqa: 2 training examples have no answer with a positive score (label {}): trained with the empty "
        "answer and weight 0, as the reference (tasks.vqa.empty_labels: zero_weight)"]


def test_the_configs_answer_parsing_reaches_the_value_submission(tmp_path, monkeypatch):
    """evaluate --submit writes each QA task's file with its submit.answer_parsing (the paper configs: official)."""
    from recipes.vlbart import evaluate

    questions = tmp_path / "tvqa_test_release.jsonl"
    questions.write_text("".join(json.dumps({"qid": i, "vid_name": "v", "q": "q", "ts": "0-1",
                                             **{f"a{k}": "x" for k in range(5)}}) + "\n" for i in range(2)))
    submit = {"questions": str(questions)}
    config = {"tasks": {"tvqa": {"score": {"task": "tvqa"},
                                 "submit": dict(submit, file="t.json", answer_parsing="official")},
                        "how2qa": {"score": {"task": "how2qa"}, "submit": dict(submit, file="h.json")}}}
    monkeypatch.setattr(evaluate, "load_run", lambda run: (None, None, config))
    monkeypatch.setattr(evaluate, "predict", lambda model, tok, task, batch_size: [
        {"question_id": 0, "text": "a3."}, {"question_id": 1, "text": "a1"}])
    written = evaluate.write_submissions(tmp_path / "run", tmp_path / "out")
    assert json.loads((tmp_path / "out/tvqa/t.json").read_text()) == {"0": 3, "1": 1}
    assert json.loads((tmp_path / "out/how2qa/h.json").read_text()) == {"0": -1, "1": 1}  # no key: exact
    assert written["tvqa"]["answer_parsing"] == "official"


# ------------------------------------------------------------------------------------------------ the configs
IMAGE_CONFIGS = ["vlbart_image_dora", "vlbart_image_lora", "vlbart_image_full"]
VIDEO_CONFIGS = ["vlbart_video_dora", "vlbart_video_lora", "vlbart_video_full"]
OFFICIAL_PREDICT = {"vqa": GREEDY, "gqa": GREEDY, "nlvr": {"mode": "choose"}, "caption": BEAM,
                    "tvqa": BEAM, "how2qa": BEAM, "tvc": BEAM, "yc2c": BEAM}
# scripts/image/dora.sh, scripts/video/dora.sh (DoRA); scripts/{image,video}/{single_lora,full_finetuning}.sh
# (VL_adapter): --lr, --epochs
OFFICIAL_LR_EPOCHS = {"vlbart_image_dora": (1e-3, 20), "vlbart_image_lora": (1e-3, 20), "vlbart_image_full": (1e-4, 20),
                      "vlbart_video_dora": (2.4e-4, 7), "vlbart_video_lora": (3e-4, 7), "vlbart_video_full": (3e-5, 7)}


@pytest.mark.parametrize("name", IMAGE_CONFIGS + VIDEO_CONFIGS)
def test_vlbart_paper_config_is_the_official_run(name):
    from recipes.config import load_config
    from recipes.vlbart.tasks import task_configs

    config = load_config(ROOT / f"recipes/vlbart/configs/{name}.yaml")
    train = TrainConfig.from_dict(config["train"])
    # no --fp16 in any script: fp32 (precision auto would train bf16 on a bf16 GPU)
    assert (train.precision, config["model"]["dtype"]) == ("fp32", "fp32")
    # trainer_base.py: transformers.optimization.AdamW(groups, lr, eps=args.adam_eps), betas and correct_bias default;
    # get_linear_schedule_with_warmup; --warmup_ratio 0.1, --clip_grad_norm 5, weight_decay 0.01
    assert (train.optimizer, train.adam_eps, tuple(train.adam_betas)) == ("adamw_hf", 1e-6, (0.9, 0.999))
    assert (train.weight_decay, train.scheduler, train.warmup_ratio, train.max_grad_norm) == (0.01, "linear", 0.1, 5.0)
    assert train.warmup_rounding == "floor"  # warmup_iters = int(t_total * warmup_ratio)
    assert (train.lr, train.epochs) == OFFICIAL_LR_EPOCHS[name]
    tasks = task_configs(config)
    for task_name, task in tasks.items():
        assert task.predict == OFFICIAL_PREDICT[task_name], task_name
        # --use_tasks_prompts (every script but image full_finetuning.sh): multitask.py's prompts, GQA's typo included
        prompts = {"gqa": "gpa: "} if name != "vlbart_image_full" else {}
        want = "" if name == "vlbart_image_full" else prompts.get(task_name, f"{task_name}: ")
        assert task.prompt == want, task_name
    if name in IMAGE_CONFIGS:
        assert set(tasks) == {"vqa", "gqa", "nlvr", "caption"}
        # the paper's VQAv2 column: multitask.py's test path prints VQAEvaluator.evaluate_raw's overall
        assert tasks["vqa"].score["protocol"] == "vlt5"
        # vqa_clip_data.py: a label whose scores sum to 0 trains the answer '' with score 0
        assert tasks["vqa"].empty_labels == "zero_weight"
    else:
        assert set(tasks) == {"tvqa", "how2qa", "tvc", "yc2c"}
        # video/*_data.py: tokenizer.encode(f"{sent} {prompt}", max_length=600, truncation=True): the end is cut
        assert all((t.truncate, t.max_input_length) == ("right", 600) for t in tasks.values())
        # multitask_video.py: p = int(pred['answer'][1]), 0 when that fails
        assert tasks["tvqa"].submit["answer_parsing"] == tasks["how2qa"].submit["answer_parsing"] == "official"


def test_llava_keeps_bf16_where_the_official_script_used_it():
    """DoRA's visual_instruction_tuning/Dora_7b.sh trains with --bf16 True: only VL-BART moved to fp32."""
    from recipes.config import load_config
    assert load_config(ROOT / "recipes/llava/configs/llava_v1_5_7b_dora.yaml")["train"]["precision"] == "bf16"
