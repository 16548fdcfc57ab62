"""The generic VLM recipe's built-in demo; `bash launch/vlm_dora.sh` with no config runs prepare, training, finish.

    python -m recipes.vlm.demo prepare [--root runs/vlm_demo]             # data and a tiny llava-1.5-hf checkpoint
    python -m recipes.vlm.demo finish  [--root runs/vlm_demo] [--run RUN]  # merge, answer, score, report

prepare writes the LLaVA demo's generated shapes data and parts (recipes/llava/demo.py) and assembles them into one
checkpoint as the hub ships llava-1.5-hf: LlavaForConditionalGeneration, its processor, and a chat template that
renders what llava-1.5-hf's renders (a space after every message, no end marker: the recipe then learns the EOS
after each answer and says so at start-up). The recipe reads it through the Auto classes and the processor alone,
as it reads any family. finish merges the run's adapter (`recipes.vlm.merge`), answers the held-out questions with
the checkpoint before training and with the merged model (`python -m eval generate --template processor`), scores
both with the VQA metric, prints a table and the results as JSON on its last line.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Optional

# llava-1.5-hf's chat template, as ours renders it: "USER: <image>\n{q} ASSISTANT: {a} USER: ..." (the generation
# prompt "ASSISTANT:" without the space that follows it inside a conversation). tests/vlm_families.py checks that it
# renders what the real checkpoint's template renders.
LLAVA_15_TEMPLATE = ("{% for m in messages %}"
                     "{% if m.role != 'system' %}{{ m.role | upper ~ ': ' }}{% endif %}"
                     "{% for c in m.content if c.type == 'image' %}{{ '<image>\\n' }}{% endfor %}"
                     "{% for c in m.content if c.type == 'text' %}{{ c.text ~ ' ' }}{% endfor %}"
                     "{% endfor %}"
                     "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")


def assemble_checkpoint(checkpoints: Path, out: Path, seed: int = 0) -> Path:
    """The LLaVA demo's parts (llm/, vision/, mm_projector.bin) as one llava-1.5-hf-shaped checkpoint in `out`."""
    import torch
    from transformers import LlavaProcessor

    from recipes.llava.model import LlavaModelConfig, build_llava

    torch.manual_seed(seed)
    model, tokenizer, image_processor = build_llava(LlavaModelConfig(
        llm=str(checkpoints / "llm"), vision_tower=str(checkpoints / "vision"),
        projector=str(checkpoints / "mm_projector.bin"), dtype="fp32"))
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    vision = model.config.vision_config
    LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=vision.patch_size,
                   vision_feature_select_strategy=model.config.vision_feature_select_strategy,
                   num_additional_image_tokens=1, chat_template=LLAVA_15_TEMPLATE).save_pretrained(out)
    return out


def prepare(root: Path) -> None:
    from recipes.llava.demo import prepare as prepare_llava_parts

    prepare_llava_parts(root)  # the generated data and the tiny LLM, CLIP tower and projector (kept if there)
    if not (root / "model" / "config.json").is_file():
        assemble_checkpoint(root / "checkpoints", root / "model")
        print(f"assembled a tiny llava-1.5-hf-shaped checkpoint in {root / 'model'}", flush=True)


def answer_and_score(model_dir: Path, root: Path, out: Path, name: str) -> dict:
    from recipes.llava.demo import _eval

    answers, scores = out / f"answers_{name}.jsonl", out / f"scores_{name}.json"
    _eval(["generate", "--template", "processor", "--model", str(model_dir), "--questions",
           str(root / "data" / "eval_questions.jsonl"), "--image-folder", str(root / "data" / "images"),
           "--out", str(answers), "--max-new-tokens", "8", "--restart"])
    _eval(["score", "vqav2", "--pred", str(answers), "--gt", str(root / "data" / "eval_annotations.json"),
           "--out", str(scores)])
    return json.loads(scores.read_text())


def finish(root: Path, run: Optional[Path] = None) -> dict:
    from recipes.llava.demo import report
    from recipes.vlm.merge import merge_run

    start = time.perf_counter()
    run = run or root / "run"
    merge_run(run, run / "merged")
    before = answer_and_score(root / "model", root, root, "before")
    after = answer_and_score(run / "merged", root, run, "after")
    return report(before, after, run, start)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recipes.vlm.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=["prepare", "finish"])
    parser.add_argument("--root", type=Path, default=Path("runs/vlm_demo"))
    parser.add_argument("--run", type=Path, help="the training run to finish (default: ROOT/run)")
    args = parser.parse_args(argv)
    if args.step == "prepare":
        prepare(args.root)
    else:
        finish(args.root, args.run)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
