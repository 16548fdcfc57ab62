"""Answers from a LLaVA model for LLaVA's question files: batched greedy decoding, JSONL out.

    python -m eval generate --model MERGED_DIR --questions q.jsonl --image-folder images/ --out answers.jsonl
    python -m eval generate --model BASE_DIR --adapter RUN_DIR/adapter ...   # base + DoRA adapter (merged in memory)
    python -m eval generate ... --shard 0/4                                   # the first of 4 parts
    python -m eval merge --questions q.jsonl --out answers.jsonl part0.jsonl part1.jsonl part2.jsonl part3.jsonl

Questions are LLaVA's JSONL: {"question_id", "image" (optional), "text"}. Answers are LLaVA's answer-file
format: {"question_id", "prompt", "text", "model_id"}, which `python -m eval score` reads. Decoding is greedy
(temperature 0), as in the paper's evaluation, in batches of --batch-size questions, left-padded. Questions of
a batch about the same image (VQAv2's file lists ~3 per image one after the other) have their prompt up to the
image encoded once and share it (`shared_image_prefixes`; --no-shared-prefixes encodes every prompt whole). Either
way the answers are those of one question at a time up to floating-point rounding (equal in fp32, tested; in bf16
batching itself can flip a near-tie).

Each batch's answers are appended to --out as soon as they are decoded; rerunning the same command after a crash
continues where it stopped (eval/answer_log.py: what counts as "the same", and --restart).
"""
from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from data.conversation import render_prompt

from .answer_log import AnswerLog, file_digest, parse_shard, read_questions, shard_of, weights_fingerprint
from .files import InputError


def _load(model_class, model_dir: str, adapter: str | None, dtype: str, device: str | None):
    import torch

    if dtype == "auto":
        torch_dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    else:
        torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = model_class.from_pretrained(model_dir, dtype=torch_dtype).to(device).eval()
    if adapter:
        from dora import load_adapter, merge_dora
        load_adapter(model, adapter)
        merge_dora(model)  # one GEMM per layer at inference
    return model


def load_processor_model(model_dir: str, adapter: str | None = None, dtype: str = "auto",
                         device: str | None = None):
    """Any image-text-to-text model and its processor (the generic recipe's models: recipes/vlm)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = _load(AutoModelForImageTextToText, model_dir, adapter, dtype, device)
    processor = AutoProcessor.from_pretrained(model_dir)
    processor.tokenizer.padding_side = "left"
    return model, processor


def load_model(model_dir: str, adapter: str | None = None, dtype: str = "auto", device: str | None = None):
    from transformers import AutoImageProcessor, AutoTokenizer, LlavaForConditionalGeneration

    model = _load(LlavaForConditionalGeneration, model_dir, adapter, dtype, device)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    image_processor = AutoImageProcessor.from_pretrained(model_dir)
    return model, tokenizer, image_processor


def generate_answers(model, tokenizer, image_processor, questions: list[dict], image_folder: Path, *,
                     template: str = "vicuna_v1", batch_size: int = 16, max_new_tokens: int = 128,
                     image_aspect_ratio: str = "pad", model_id: str = "", progress: bool = True) -> list[dict]:
    """Answers to `questions`, in order (see `answer_batches`)."""
    return [a for batch in answer_batches(model, tokenizer, image_processor, questions, image_folder,
                                          template=template, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                          image_aspect_ratio=image_aspect_ratio, model_id=model_id, progress=progress)
            for a in batch]


def answer_batches(model, tokenizer, image_processor, questions: list[dict], image_folder: Path, *,
                   template: str = "vicuna_v1", batch_size: int = 16, max_new_tokens: int = 128,
                   image_aspect_ratio: str = "pad", model_id: str = "", progress: bool = True,
                   already_done: int = 0, share_prefixes: bool = True, open_image=None):
    """Yields the answers of each batch of `batch_size` questions as soon as it is decoded (greedy, left-padded).
    `already_done` only starts the progress bar there (the questions given are the ones still to answer).
    `share_prefixes`: questions of a batch about the same image have the prompt up to the image encoded once
    (`shared_image_prefixes`) where the model allows it (`prefix_sharing_supported`); False encodes every prompt
    whole. The answers are the same up to floating-point rounding. `open_image(question)` gives a question's image
    (a dataset row's) instead of reading `image_folder / question["image"]`."""
    import torch

    from data.llava import SampleError, encode, expand_image_tokens, load_image, process_image

    cfg = model.config
    share_prefixes = share_prefixes and prefix_sharing_supported(model)

    def apply(messages, add_generation_prompt=True):  # used by the "chat" template only
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    def prepare(batch: list[dict]):
        """Prompt ids (left-padded) and pixels of a batch, on the CPU: run in a thread while the model decodes the
        batch before (images are read and resized off the critical path, as LLaVA's DataLoader workers do)."""
        rows, image_files = [], []
        for q in batch:
            has_image = bool(q.get("image"))
            prompt = render_prompt(q["text"], template, has_image=has_image, apply_chat_template=apply)
            # the ids training used (LLaVA's tokenizer_image_token rule); chat templates write their own BOS
            try:
                ids = encode(tokenizer, prompt, cfg.image_token_id, add_special_tokens=template != "chat").ids
            except SampleError as e:
                raise InputError(f"question {q['question_id']}: {e}") from None
            rows.append(expand_image_tokens(ids, cfg.image_token_id, cfg.image_seq_length))
            image_files.append(q["image"] if has_image else None)

        def pixels(k):
            try:
                if open_image is not None:
                    return process_image(open_image(batch[k]), image_processor, image_aspect_ratio)
                return load_image(Path(image_folder) / image_files[k], image_processor, image_aspect_ratio)
            except SampleError as e:
                raise InputError(f"question {batch[k]['question_id']}: {e}") from None

        pad = tokenizer.pad_token_id
        shared = shared_image_prefixes(rows, image_files, cfg.image_token_id) if share_prefixes else None
        if shared is not None:
            return prefix_shared_inputs(rows, shared, pixels, pad)
        width = max(len(r) for r in rows)
        inputs = {"input_ids": torch.tensor([[pad] * (width - len(r)) + r for r in rows]),
                  "attention_mask": torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])}
        images = [pixels(k) for k, f in enumerate(image_files) if f]
        if images:
            inputs["pixel_values"] = torch.stack(images)
        return inputs

    yield from _decode(model, tokenizer, questions, prepare, batch_size=batch_size, max_new_tokens=max_new_tokens,
                       model_id=model_id, progress=progress, already_done=already_done)


PREFIX_KEYS = ("prefix_ids", "prefix_pixel_values", "prefix_of_row")  # prefix_shared_inputs' extra inputs


def prefix_sharing_supported(model) -> bool:
    """Whether a shared prefix cache gives this model's answers. Not with a sliding window: the padding between
    prefix and question takes cache slots, and a window counts slots, not positions, so a question would see less
    of its prefix than alone. Not with a `cache_implementation` in the generation config: generate then refuses a
    cache passed in."""
    text = model.config.get_text_config()
    window = getattr(text, "sliding_window", None) if getattr(text, "use_sliding_window", True) else None
    sliding = window is not None or "sliding_attention" in (getattr(text, "layer_types", None) or ())
    return not sliding and getattr(model.generation_config, "cache_implementation", None) is None


def shared_image_prefixes(rows: list[list[int]], image_files: list, image_token_id: int):
    """Which questions of a batch can share their prompt's prefix: LLaVA's prompts are the system text, the image's
    tokens, then the question, so the ids up to the last image token are the same for every question about that
    image (VQAv2 asks ~3 questions per image, GQA ~30, POPE 6 per split; their files list them one after the other).
    Returns (prefix length, prefix index of each row, the row each prefix is read from), or None when there is nothing to share or
    the layout does not allow it: a row without an image, prefixes of different lengths (they must all end where
    the cache ends), or no image asked about twice."""
    cut_at, groups, prefix_of_row, first_rows = set(), {}, [], []
    for k, (ids, image) in enumerate(zip(rows, image_files)):
        if not image or image_token_id not in ids:
            return None
        cut = len(ids) - ids[::-1].index(image_token_id)
        if cut == len(ids):  # nothing after the image: generate needs at least one id past the cache
            return None
        cut_at.add(cut)
        key = (image, tuple(ids[:cut]))
        if key not in groups:
            groups[key] = len(first_rows)
            first_rows.append(k)
        prefix_of_row.append(groups[key])
    if len(cut_at) != 1 or len(first_rows) == len(rows):
        return None
    return cut_at.pop(), prefix_of_row, first_rows


def prefix_shared_inputs(rows: list[list[int]], shared, pixels, pad: int) -> dict:
    """A batch laid out for a shared prefix cache: each row is its prefix (P ids, the same length for all), padding,
    then its ids after the image, so the cached prefixes fill positions 0..P-1 of every row. The padding sits between
    prefix and question, masked; generate counts positions from the mask, so each question is at the positions it
    has alone. Each distinct prefix's image is read once."""
    import torch

    cut, prefix_of_row, first_rows = shared
    tails = [r[cut:] for r in rows]
    width = max(len(t) for t in tails)
    return {"input_ids": torch.tensor([r[:cut] + [pad] * (width - len(t)) + t for r, t in zip(rows, tails)]),
            "attention_mask": torch.tensor([[1] * cut + [0] * (width - len(t)) + [1] * len(t) for t in tails]),
            "prefix_ids": torch.tensor([rows[k][:cut] for k in first_rows]),
            "prefix_pixel_values": torch.stack([pixels(k) for k in first_rows]),
            "prefix_of_row": torch.tensor(prefix_of_row)}


def prefix_cache(model, prefix_ids, prefix_pixel_values, prefix_of_row) -> dict:
    """generate's cache argument holding each distinct prefix encoded once (the language model's keys and values,
    no logits), copied to the rows that share it."""
    import inspect

    out = model.model(input_ids=prefix_ids, pixel_values=prefix_pixel_values, use_cache=True)
    # transformers 5 calls it `cache`, 4.x `past_key_values`
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    cache = getattr(out, name)
    cache.batch_select_indices(prefix_of_row)
    return {name: cache}


def _decode(model, tokenizer, questions: list[dict], prepare, *, batch_size: int, max_new_tokens: int, model_id: str,
            progress: bool, already_done: int):
    """Greedy answers, a batch at a time: `prepare(batch)` (the model's CPU inputs, left-padded) runs in a thread
    for the next batch while the model decodes this one (as LLaVA's DataLoader workers read images ahead)."""
    import torch
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    batches = [questions[i:i + batch_size] for i in range(0, len(questions), batch_size)]
    bar = tqdm(total=already_done + len(questions), initial=already_done, disable=not progress, desc="generate",
               unit="q")
    with ThreadPoolExecutor(max_workers=1) as pool:
        upcoming = pool.submit(prepare, batches[0]) if batches else None
        for k, batch in enumerate(batches):
            inputs = upcoming.result()
            # prepare may hand the rows to the model in another order: (inputs, original index of each row)
            inputs, order = inputs if isinstance(inputs, tuple) else (inputs, range(len(batch)))
            upcoming = pool.submit(prepare, batches[k + 1]) if k + 1 < len(batches) else None
            inputs = {key: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for key, v in inputs.items()}
            width = inputs["input_ids"].shape[1]
            with torch.no_grad():
                if "prefix_ids" in inputs:
                    inputs.update(prefix_cache(model, *(inputs.pop(key) for key in PREFIX_KEYS)))
                out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                     pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            texts = [""] * len(batch)
            for row, text in zip(order, tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)):
                texts[row] = text
            # "prompt" is the question text, as in LLaVA's answer files: TextVQA is matched on it
            yield [{"question_id": q["question_id"], "prompt": q["text"], "text": text.strip(), "model_id": model_id}
                   for q, text in zip(batch, texts)]
            bar.update(len(batch))
    bar.close()


def processor_answer_batches(model, processor, questions: list[dict], image_folder: Path, *, batch_size: int = 16,
                             max_new_tokens: int = 128, model_id: str = "", progress: bool = True,
                             already_done: int = 0, open_image=None):
    """As `answer_batches`, for any image-text-to-text model: each question becomes a user message (an image item,
    then the text) rendered by the processor's chat template with the generation prompt; the processor makes
    every input its model needs. Greedy, left-padded."""
    from PIL import Image

    from data.vlm_chat import add_special_tokens, builds_own_labels, image_rows_first, processor_batch

    prompt_only = builds_own_labels(processor)  # PaliGemma: the question after the image tokens, no chat template

    def prepare(batch: list[dict]):
        texts, images = [], []
        for q in batch:
            content = [{"type": "text", "text": q["text"]}]
            row = []
            if q.get("image"):
                content.insert(0, {"type": "image"})
                try:
                    if open_image is not None:
                        row.append(open_image(q))
                    else:
                        with Image.open(Path(image_folder) / q["image"]) as im:
                            row.append(im.convert("RGB"))
                except Exception as e:
                    raise InputError(f"question {q['question_id']}: image {q['image']}: {e}") from None
            if prompt_only:
                texts.append(getattr(processor, "image_token", "<image>") * len(row) + q["text"])
            else:
                texts.append(processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                           add_generation_prompt=True))
            images.append(row)
        order = image_rows_first(images)  # what every family's processor can batch (data/vlm_chat.py)
        texts, images = [texts[i] for i in order], [images[i] for i in order]
        return processor_batch(processor, texts, images,
                               add_special_tokens=add_special_tokens(processor.tokenizer, texts[0])), order

    yield from _decode(model, processor.tokenizer, questions, prepare, batch_size=batch_size,
                       max_new_tokens=max_new_tokens, model_id=model_id, progress=progress, already_done=already_done)


def run_settings(args) -> dict:
    """What the answers depend on; a resumed run must match it (see eval/answer_log.py)."""
    shard = parse_shard(args.shard)

    def where(path):  # a local path as an absolute one (the same run from another folder is the same run)
        return None if path is None else (os.path.abspath(path) if os.path.exists(path) else str(path))
    if args.dataset:
        from .dataset_splits import dataset_fingerprint
        source = {"dataset": where(args.dataset), "task": args.task, "dataset_split": args.dataset_split,
                  "dataset_config": args.dataset_config, "images": where(args.images),
                  "dataset_fingerprint": dataset_fingerprint(args.dataset, args.dataset_split, args.dataset_config,
                                                             args.task)}
    else:
        source = {"questions": where(args.questions), "questions_sha256": file_digest(args.questions)}
    return {**source,
            "shard": list(shard) if shard else None, "model": where(args.model),
            "model_files": weights_fingerprint(args.model), "adapter": where(args.adapter),
            "adapter_files": weights_fingerprint(args.adapter), "image_folder": where(args.image_folder or "."),
            "template": args.template, "max_new_tokens": args.max_new_tokens,
            "image_aspect_ratio": args.image_aspect_ratio, "dtype": args.dtype}


def _questions(args):
    """(questions, the function giving a question's image, or None: the image folder's files)."""
    if (args.questions is None) == (args.dataset is None):
        raise InputError("give the questions as --questions FILE (with --image-folder) or as --dataset SPLIT --task T")
    if args.dataset is None:
        return read_questions(Path(args.questions)), None
    if args.task is None:
        raise InputError("--dataset needs --task (which benchmark's layout to read: textvqa, vqav2, gqa, pope, "
                         "mmbench, scienceqa)")
    from .dataset_splits import read_questions as read_split_questions
    return read_split_questions(args.task, args.dataset, args.dataset_split, args.dataset_config, args.images)


def run(args) -> int:
    questions, open_image = _questions(args)
    questions = shard_of(questions, parse_shard(args.shard))
    with AnswerLog(args.out, questions, run_settings(args), restart=args.restart) as log:
        resumed = log.done
        todo = questions[resumed:]
        if todo and args.template == "processor":
            model, processor = load_processor_model(args.model, args.adapter, args.dtype)
            for batch in processor_answer_batches(model, processor, todo, Path(args.image_folder or "."),
                                                  batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                                                  model_id=Path(args.model).name, already_done=resumed,
                                                  open_image=open_image):
                log.append(batch)
        elif todo:
            model, tokenizer, image_processor = load_model(args.model, args.adapter, args.dtype)
            for batch in answer_batches(model, tokenizer, image_processor, todo, Path(args.image_folder or "."),
                                        template=args.template, batch_size=args.batch_size,
                                        max_new_tokens=args.max_new_tokens,
                                        image_aspect_ratio=args.image_aspect_ratio, model_id=Path(args.model).name,
                                        already_done=resumed, share_prefixes=not args.no_shared_prefixes,
                                        open_image=open_image):
                log.append(batch)
        answered = log.done
    print(json.dumps({"answers": answered, "resumed_after": resumed, "file": str(args.out)}))
    return 0


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="a transformers checkpoint (merged, or the base)")
    parser.add_argument("--adapter", help="a DoRA adapter directory to apply to --model")
    parser.add_argument("--questions", help="LLaVA question JSONL: question_id, image, text")
    from .dataset_splits import TASK_CHOICES, add_dataset_arguments
    add_dataset_arguments(parser, "the questions as a dataset split with its images, instead of --questions")
    parser.add_argument("--task", choices=TASK_CHOICES, help="with --dataset: the benchmark whose layout it has")
    parser.add_argument("--images", help="gqa with --dataset: the image table (testdev_balanced_images: id, image); "
                                         "default: the hub id's own")
    parser.add_argument("--image-folder", help="folder the questions' image paths are relative to")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--template", default="vicuna_v1", choices=["vicuna_v1", "plain", "chat", "processor"],
                        help="LLaVA's conversation templates for LLaVA checkpoints; processor: any image-text-to-text "
                             "model through its processor's chat template (models of recipes/vlm)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--no-shared-prefixes", action="store_true",
                        help="encode every prompt whole (by default questions of a batch about the same image share "
                             "the prompt up to the image; the answers are the same up to rounding)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--image-aspect-ratio", default="pad", choices=["pad", "none"])
    parser.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    parser.add_argument("--shard", help="i/n: answer every n-th question starting at i (run n of them in parallel, "
                                        "then `python -m eval merge`)")
    parser.add_argument("--restart", action="store_true",
                        help="start --out over instead of continuing the answers already in it")
