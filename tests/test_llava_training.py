"""The LLaVA recipe end to end on CPU: DeepSpeed ZeRO-2/3 with 2 processes against 1, exact resume, the saved
adapter (ours and PEFT's), merge, generation and scoring."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
import subprocesses

ROOT = Path(__file__).resolve().parents[1]
STEPS = 6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(assets, out: Path, dropout: float = 0.0, **train) -> Path:
    config = yaml.safe_load((ROOT / "recipes/llava/configs/demo.yaml").read_text())
    config["dora"]["rules"][0]["dropout"] = dropout
    config["model"].update(llm=str(assets["llm"]), vision_tower=str(assets["vision"]),
                           projector=str(assets["projector"]), dtype="fp32")
    config["data"].update(data_path=str(assets["train"]), image_folder=str(assets["images"]))
    # SGD: with Adam, the rounding differences of other reduction orders are amplified in near-zero
    # gradients (lora_A's is exactly 0 at the first step), and a gradient scaled wrongly would go unseen.
    config["train"].update(output_dir=str(out), max_steps=STEPS, micro_batch_size=1, global_batch_size=4,
                           optimizer="sgd", lr=0.5, warmup_ratio=0.0, group_by_modality_length=False, save_steps=0,
                           **train)
    path = out.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(config))
    return path


def train(config: Path, processes: int = 1, *overrides: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT))
    script = str(ROOT / "recipes/llava/train.py")
    if processes == 1:
        cmd = [sys.executable, script, str(config), *overrides]
    else:
        launcher = Path(sys.executable).parent / "deepspeed"
        cmd = [str(launcher), "--num_gpus", str(processes), "--master_port", str(free_port()), script,
               str(config), *overrides]
    proc = subprocesses.run(cmd, what=f"LLaVA training, {processes} process(es)", timeout=600, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    out = Path(yaml.safe_load(config.read_text())["train"]["output_dir"])
    summary = out / "train_summary.json"
    return {"log": proc.stdout + proc.stderr,
            "summary": json.loads(summary.read_text()) if summary.is_file() else None}


@pytest.fixture(scope="module")
def single(llava_assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "single"
    return out, train(write_config(llava_assets, out, deepspeed="launch/zero2.json"))


def test_single_process_run_trains_and_writes_everything(single):
    out, result = single
    losses = result["summary"]["losses"]
    assert result["summary"]["steps"] == STEPS and len(losses) == STEPS
    assert "model\\.language_model" in result["log"] and "total" in result["log"]  # the rules report
    assert "skipped samples: none" in result["log"]
    for path in ("adapter/dora_config.json", "adapter/dora_adapter.safetensors", "adapter_peft/adapter_config.json",
                 "config.yaml", "tokenizer/tokenizer_config.json"):
        assert (out / path).is_file(), path


@pytest.mark.parametrize("stage", [2, 3])
def test_two_processes_match_one(llava_assets, single, tmp_path, stage):
    _, reference = single
    out = tmp_path / f"zero{stage}"
    result = train(write_config(llava_assets, out, deepspeed=f"launch/zero{stage}.json"), 2)
    assert result["summary"]["losses"] == pytest.approx(reference["summary"]["losses"], rel=1e-4)


def test_resume_continues_exactly(llava_assets, tmp_path):
    # with dropout, so that the RNG states must be restored too
    reference = train(write_config(llava_assets, tmp_path / "reference", dropout=0.1, deepspeed="launch/zero2.json"))
    out = tmp_path / "resumed"
    config = write_config(llava_assets, out, dropout=0.1, deepspeed="launch/zero2.json", pause_at_step=3)
    first = train(config)
    assert "paused at step 3" in first["log"] and first["summary"] is None
    assert (out / "checkpoints" / "latest").read_text() == "step-00000003"
    assert not list((out / "checkpoints").glob(".tmp-*"))  # the temporary name is gone once complete
    second = train(config)
    assert "resumed from" in second["log"]
    assert second["summary"]["losses"] == pytest.approx(reference["summary"]["losses"], rel=1e-6)


def test_merge_generate_and_score(llava_assets, single, tmp_path):
    out, _ = single
    env = dict(os.environ, PYTHONPATH=str(ROOT))

    def run(*args):
        proc = subprocesses.run([sys.executable, "-m", *args], what=f"python -m {args[0]}", timeout=600, cwd=ROOT,
                                env=env)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc.stdout

    run("recipes.llava.merge", str(out), "--out", str(tmp_path / "merged"))
    run("recipes.llava.merge", str(out), "--out", str(tmp_path / "base"), "--no-adapter")
    common = ["--questions", str(llava_assets["questions"]), "--image-folder", str(llava_assets["images"]),
              "--max-new-tokens", "6", "--batch-size", "5"]
    run("eval", "generate", "--model", str(tmp_path / "merged"), "--out", str(tmp_path / "merged.jsonl"), *common)
    run("eval", "generate", "--model", str(tmp_path / "base"), "--adapter", str(out / "adapter"),
        "--out", str(tmp_path / "adapter.jsonl"), *common)
    merged = [json.loads(line) for line in (tmp_path / "merged.jsonl").read_text().splitlines()]
    adapted = [json.loads(line) for line in (tmp_path / "adapter.jsonl").read_text().splitlines()]
    assert len(merged) == 12 and [a["text"] for a in merged] == [a["text"] for a in adapted]
    text = run("eval", "score", "vqav2", "--pred", str(tmp_path / "merged.jsonl"), "--gt",
               str(llava_assets["annotations"]), "--out", str(tmp_path / "scores.json"))
    assert "coverage: 12/12" in text
    assert 0.0 <= json.loads((tmp_path / "scores.json").read_text())["score"] <= 100.0


def test_peft_export_of_the_run_loads_in_peft(llava_assets, single, tmp_path):
    import torch
    from peft import PeftModel

    from dora import load_adapter
    from recipes.llava.merge import merge_run

    out, _ = single
    base_dir = merge_run(out, tmp_path / "base", with_adapter=False)
    from transformers import LlavaForConditionalGeneration
    ours = LlavaForConditionalGeneration.from_pretrained(base_dir).eval()
    load_adapter(ours, out / "adapter")
    theirs = PeftModel.from_pretrained(LlavaForConditionalGeneration.from_pretrained(base_dir),
                                       out / "adapter_peft").eval()
    ids = torch.tensor([[1] + [ours.config.image_token_id] * ours.config.image_seq_length + [5, 6, 7]])
    pixels = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        a = ours(input_ids=ids, pixel_values=pixels).logits
        b = theirs(input_ids=ids, pixel_values=pixels).logits
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_gradient_checkpointing_gives_the_same_losses(llava_assets, single, tmp_path):
    # activation checkpointing recomputes each layer's forward in backward (the DoRA norm cache is reused)
    _, reference = single
    config = write_config(llava_assets, tmp_path / "ckpt", deepspeed="launch/zero2.json")
    result = train(config, 1, "model.gradient_checkpointing=true")
    assert result["summary"]["losses"] == pytest.approx(reference["summary"]["losses"], rel=1e-6)


def run_train(config: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT))
    return subprocesses.run([sys.executable, str(ROOT / "recipes/llava/train.py"), str(config)],
                            what="LLaVA training, 1 process", timeout=600, cwd=ROOT, env=env)


def records_config(assets, out: Path, records: list, **train_options) -> Path:
    data = out.with_name(out.name + "_data.json")
    data.write_text(json.dumps(records))
    config = yaml.safe_load(write_config(assets, out, deepspeed="launch/zero2.json").read_text())
    config["data"]["data_path"] = str(data)
    config["train"].update(train_options)
    path = out.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(config))
    return path


def test_skipped_micro_batches_do_not_lower_the_reported_loss(llava_assets, tmp_path):
    # lr 0: every copy of one record has the same loss in every step; empty micro-batches must not count as 0
    good = json.loads(llava_assets["train"].read_text())[0]
    copies = [{**good, "id": f"good{i}"} for i in range(8)]
    bad = [{"id": f"bad{i}", "image": good["image"]} for i in range(4)]  # no conversations: a counted skip
    reference = train(records_config(llava_assets, tmp_path / "clean", copies, lr=0.0, max_steps=2))
    losses = reference["summary"]["losses"]
    assert len(losses) == 2 and losses[0] == losses[1]
    mixed = train(records_config(llava_assets, tmp_path / "mixed", copies[:4] + bad, lr=0.0, max_steps=2,
                                 max_skip_rate=1.0))
    assert mixed["summary"]["skipped"] == {"malformed record": 4}
    assert mixed["summary"]["losses"] == pytest.approx(losses, rel=1e-6)


def test_too_many_skipped_samples_stop_the_run(llava_assets, tmp_path):
    good = json.loads(llava_assets["train"].read_text())[0]
    records = [good, good] + [{**good, "id": f"gone{i}", "image": f"missing_{i}.png"} for i in range(6)]
    proc = run_train(records_config(llava_assets, tmp_path / "bad", records, skip_check_after=4))
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "more than train.max_skip_rate 1.0%" in proc.stderr and "missing image" in proc.stderr
    assert not (tmp_path / "bad" / "adapter").exists()  # no adapter written from a run on broken data
    folder = records_config(llava_assets, tmp_path / "nofolder", [good], **{})
    config = yaml.safe_load(folder.read_text())
    config["data"]["image_folder"] = str(tmp_path / "no_such_folder")
    folder.write_text(yaml.safe_dump(config))
    proc = run_train(folder)
    # named by the pre-flight, before any model is built
    assert proc.returncode == 2 and f"error: data.image_folder: folder {tmp_path / 'no_such_folder'} not found" \
        in proc.stderr, proc.stderr[-2000:]


def test_a_config_error_after_the_process_group_exists_exits_cleanly(llava_assets, tmp_path):
    # the trainer leaves the process group before the error ends the process: exit code 2, not an abort
    proc = run_train(records_config(llava_assets, tmp_path / "odd", json.loads(llava_assets["train"].read_text()),
                                    global_batch_size=3, micro_batch_size=2))
    assert proc.returncode == 2 and "not a multiple of micro_batch_size 2" in proc.stderr, proc.stderr[-2000:]


def test_analysis_reads_the_runs_adapters_against_the_llm_and_the_llava_base(llava_assets, single, tmp_path):
    """The LLaVA run's adapter names (model.language_model.layers...) against the LLM checkpoint it started from
    (model.layers...) and against the full base LLaVA checkpoint (language_model.model.layers..., beside the CLIP
    tower's own layers.0.self_attn.q_proj)."""
    from transformers import LlavaForConditionalGeneration

    from dora import load_adapter
    from dora_helpers import assert_analysis_reads_the_run
    from recipes.llava.merge import merge_run

    out, _ = single
    base = merge_run(out, tmp_path / "base", with_adapter=False)
    model = LlavaForConditionalGeneration.from_pretrained(base)
    load_adapter(model, out / "adapter")
    for start in (llava_assets["llm"], base):
        assert_analysis_reads_the_run(start, out, model)
