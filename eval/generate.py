"""Answers from a LLaVA model for LLaVA's question files: batched greedy decoding, JSONL out.

    python -m eval generate --model MERGED_DIR --questions q.jsonl --image-folder images/ --out answers.jsonl
    python -m eval generate --model BASE_DIR --adapter RUN_DIR/adapter ...   # base + DoRA adapter (merged in memory)
    python -m eval generate ... --shard 0/4                                   # the first of 4 parts

Questions are LLaVA's JSONL: {"question_id", "image" (optional), "text"}. Answers are LLaVA's answer-file
format: {"question_id", "prompt", "text", "model_id"}, which `python -m eval score` reads. Decoding is greedy
(temperature 0), as in the paper's evaluation.
"""
from __future__ import annotations

import json
from pathlib import Path

from data.conversation import render_prompt

from .files import InputError, iter_jsonl, write_jsonl


def load_model(model_dir: str, adapter: str | None = None, dtype: str = "auto", device: str | None = None):
    import torch
    from transformers import AutoImageProcessor, AutoTokenizer, LlavaForConditionalGeneration

    if dtype == "auto":
        torch_dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    else:
        torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch_dtype).to(device).eval()
    if adapter:
        from dora import load_adapter, merge_dora
        load_adapter(model, adapter)
        merge_dora(model)  # one GEMM per layer at inference
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    image_processor = AutoImageProcessor.from_pretrained(model_dir)
    return model, tokenizer, image_processor


def read_questions(path: Path) -> list[dict]:
    questions = []
    for n, q in iter_jsonl(path):
        if "question_id" not in q or "text" not in q:
            raise InputError(f"{path}:{n}: a question needs 'question_id' and 'text'")
        questions.append(q)
    return questions


def generate_answers(model, tokenizer, image_processor, questions: list[dict], image_folder: Path, *,
                     template: str = "vicuna_v1", batch_size: int = 16, max_new_tokens: int = 128,
                     image_aspect_ratio: str = "pad", model_id: str = "", progress: bool = True) -> list[dict]:
    import torch
    from tqdm.auto import tqdm

    from data.llava import SampleError, encode, expand_image_tokens, load_image

    cfg = model.config
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype

    def apply(messages, add_generation_prompt=True):  # used by the "chat" template only
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    answers = []
    for start in tqdm(range(0, len(questions), batch_size), disable=not progress, desc="generate"):
        batch = questions[start:start + batch_size]
        rows, images = [], []
        for q in batch:
            has_image = bool(q.get("image"))
            prompt = render_prompt(q["text"], template, has_image=has_image, apply_chat_template=apply)
            # the ids training used (LLaVA's tokenizer_image_token rule); chat templates write their own BOS
            try:
                ids = encode(tokenizer, prompt, cfg.image_token_id, add_special_tokens=template != "chat").ids
            except SampleError as e:
                raise InputError(f"question {q['question_id']}: {e}") from None
            rows.append(expand_image_tokens(ids, cfg.image_token_id, cfg.image_seq_length))
            if has_image:
                try:
                    images.append(load_image(Path(image_folder) / q["image"], image_processor, image_aspect_ratio))
                except SampleError as e:
                    raise InputError(f"question {q['question_id']}: {e}") from None
        width = max(len(r) for r in rows)
        pad = tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)
        attention = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
        pixel_values = torch.stack(images).to(device, dtype) if images else None
        with torch.no_grad():
            out = model.generate(input_ids=input_ids, attention_mask=attention, pixel_values=pixel_values,
                                 max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                 pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
        texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
        for q, text in zip(batch, texts):
            # "prompt" is the question text, as in LLaVA's answer files: TextVQA is matched on it
            answers.append({"question_id": q["question_id"], "prompt": q["text"], "text": text.strip(),
                            "model_id": model_id})
    return answers


def run(args) -> int:
    questions = read_questions(Path(args.questions))
    if args.shard:
        index, count = (int(x) for x in args.shard.split("/"))
        if not 0 <= index < count:
            raise InputError(f"--shard {args.shard}: expected i/n with 0 <= i < n")
        questions = questions[index::count]
    model, tokenizer, image_processor = load_model(args.model, args.adapter, args.dtype)
    answers = generate_answers(model, tokenizer, image_processor, questions, Path(args.image_folder or "."),
                               template=args.template, batch_size=args.batch_size,
                               max_new_tokens=args.max_new_tokens, image_aspect_ratio=args.image_aspect_ratio,
                               model_id=Path(args.model).name)
    write_jsonl(args.out, answers)
    print(json.dumps({"answers": len(answers), "file": str(args.out)}))
    return 0


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="a transformers LLaVA checkpoint (merged, or the base)")
    parser.add_argument("--adapter", help="a DoRA adapter directory to apply to --model")
    parser.add_argument("--questions", required=True, help="LLaVA question JSONL: question_id, image, text")
    parser.add_argument("--image-folder", help="folder the questions' image paths are relative to")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--template", default="vicuna_v1", choices=["vicuna_v1", "plain", "chat"])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--image-aspect-ratio", default="pad", choices=["pad", "none"])
    parser.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    parser.add_argument("--shard", help="i/n: answer every n-th question starting at i (run n of them in parallel)")
