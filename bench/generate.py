"""`eval generate`: questions/s in batches of 16 against one question at a time (LLaVA's model_vqa_loader), and
whether the answers are the same.

    python bench/generate.py                 # a Llama of 4 layers, 512 wide, with a small CLIP tower
    python bench/generate.py --size tiny     # the demo's model (2 layers, 96 wide), for a smoke run

The model is a LLaVA built from configs (nothing can be downloaded here; random weights, see INIT_STD), or any
saved LLaVA with --model (and --questions-file, --image-folder). The questions are the shapes demo's: 3 per image,
one after the other, as LLaVA's VQAv2 test-dev file lists them (107,394 questions on 36,807 images). Three settings
run our `eval.generate.answer_batches` (greedy): batch 1 (the computation of LLaVA's loop, which feeds one question
per `generate` call), batches of 16 as `eval generate` runs them (the questions of a batch about one image share the
prompt's prefix up to the image, encoded once), and batches of 16 with every prompt encoded whole (left-padded).
Rounds alternate the order of the settings; a ratio is the median over rounds of the pair timed in the same round.
The answers of each setting are compared with batch 1's, question by question.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIZES = {"tiny": dict(hidden=96, layers=2), "mid": dict(hidden=512, layers=4)}
# Random weights drawn wide (std 0.2, not 0.02): the logits then have clear winners, so greedy answers are long,
# differ from question to question and image to image, and any change in what the model sees (a padding token
# attended to, a position shifted) changes them; a briefly pretrained model answered "yellow" to everything.
INIT_STD = 0.2


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def build_model(root: Path, size: str, seed: int = 0) -> Path:
    """A saved LLaVA (transformers format) and the demo's evaluation questions under `root`."""
    from data.demo_shapes import write_demo_dataset
    from recipes.llava.demo_models import corpus_from_llava_json, dialogues_from_llava_json, make_demo_checkpoints
    from recipes.llava.model import LlavaModelConfig, build_llava

    model_dir = root / f"llava_{size}"
    if (model_dir / "config.json").is_file():
        return model_dir
    data = write_demo_dataset(root / "data", n_train_images=120, n_eval_images=32, seed=seed)
    parts = make_demo_checkpoints(root / f"parts_{size}", corpus_from_llava_json(data["train"]),
                                  dialogues_from_llava_json(data["train"]), seed=seed, **SIZES[size])
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig.from_pretrained(parts["llm"])
    config.initializer_range = INIT_STD
    LlamaForCausalLM(config).save_pretrained(parts["llm"])
    torch.manual_seed(seed)
    model, tokenizer, image_processor = build_llava(LlavaModelConfig(
        llm=str(parts["llm"]), vision_tower=str(parts["vision"]), projector=str(parts["projector"]), dtype="fp32"))
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    image_processor.save_pretrained(model_dir)
    return model_dir


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="mid")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--questions", type=int, default=96, help="questions per setting and round")
    p.add_argument("--max-new-tokens", type=int, default=4, help="short workload (a word or two)")
    p.add_argument("--open-new-tokens", type=int, default=48, help="open workload")
    p.add_argument("--model", type=Path, help="a saved LLaVA (transformers format) instead of the random one")
    p.add_argument("--questions-file", type=Path, help="with --model: LLaVA question JSONL")
    p.add_argument("--image-folder", type=Path, help="with --model: the questions' images")
    p.add_argument("--workloads", nargs="+", choices=["short", "open"], default=["short", "open"])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: stable figures on shared cores)")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "bench_generate")
    p.add_argument("--out", type=Path, help="results JSON (default: bench/results_generate_<device>_<size>.json)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from eval.answer_log import read_questions
    from eval.generate import answer_batches, load_model

    before = load_average()
    if args.model:
        if not (args.questions_file and args.image_folder):
            p.error("--model needs --questions-file and --image-folder")
        model_dir, question_file, images = args.model, args.questions_file, args.image_folder
    else:
        model_dir = build_model(args.work, args.size)
        question_file, images = args.work / "data" / "eval_questions.jsonl", args.work / "data" / "images"
    model, tokenizer, image_processor = load_model(str(model_dir))
    device = next(model.parameters()).device
    base = read_questions(question_file)
    questions = [base[k % len(base)] for k in range(args.questions)]

    def answer(questions, batch_size: int, max_new_tokens: int, share: bool = True) -> tuple[float, list[str]]:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        texts = [a["text"] for batch in answer_batches(model, tokenizer, image_processor, questions, images,
                                                       batch_size=batch_size, max_new_tokens=max_new_tokens,
                                                       progress=False, share_prefixes=share) for a in batch]
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start, texts

    n = args.batch_size
    settings = {"batch_1": (1, True), f"batch_{n}": (n, True), f"batch_{n}_whole": (n, False)}

    def measure(questions, max_new_tokens: int) -> dict:
        answer(questions, n, max_new_tokens)  # warm-up (allocator, kernels)
        rounds = []
        for r in range(args.rounds):
            order = list(settings) if r % 2 == 0 else list(reversed(settings))
            timed = {name: answer(questions, settings[name][0], max_new_tokens, settings[name][1]) for name in order}
            rounds.append({f"seconds_{name}": timed[name][0] for name in settings}
                          | {"speedup": timed["batch_1"][0] / timed[f"batch_{n}"][0],
                             "speedup_whole": timed["batch_1"][0] / timed[f"batch_{n}_whole"][0]})
            texts = {name: timed[name][1] for name in settings}
        single = texts["batch_1"]
        differ = {name: [(q["question_id"], a, b) for q, a, b in zip(questions, single, texts[name]) if a != b]
                  for name in settings if name != "batch_1"}
        median = lambda key: statistics.median(r[key] for r in rounds)  # noqa: E731
        return {"max_new_tokens": max_new_tokens,
                **{f"questions_per_s_{name}": round(len(questions) / median(f"seconds_{name}"), 2)
                   for name in settings},
                "speedup_median": round(median("speedup"), 2), "speedup_whole_median": round(median("speedup_whole"), 2),
                "rounds": rounds, "identical_answers": {name: len(questions) - len(d) for name, d in differ.items()},
                "different_answers": {name: d[:20] for name, d in differ.items()},
                "distinct_answers": len(set(single)), "example_answers": single[:4]}

    results = {}
    for workload in args.workloads:
        # short: the benchmark prompts as LLaVA evaluates VQAv2 ("Answer ... single word or phrase"): the prompt's
        # prefill is most of the work. open: the same questions without that line, longer answers: decoding is.
        qs = questions if workload == "short" else [{**q, "text": q["text"].split("\n")[0]} for q in questions]
        tokens = args.max_new_tokens if workload == "short" else args.open_new_tokens
        results[workload] = measure(qs, tokens)
    result = {
        "setting": {"size": args.size, **SIZES[args.size], "device": device.type, "dtype": str(model.dtype),
                    "questions_per_image": round(len(questions) / len({q.get("image") for q in questions}), 2),
                    "threads": args.threads, "questions": args.questions, "batch_size": args.batch_size,
                    "rounds": args.rounds, "torch": torch.__version__, "load_average_before": before,
                    "load_average_after": load_average()},
        **results,
    }
    out = args.out or Path(__file__).with_name(f"results_generate_{device.type}_{args.size}.json")
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"model: {args.size} ({SIZES[args.size]['layers']} layers, {SIZES[args.size]['hidden']} wide), "
          f"{device.type} {model.dtype}, {args.threads} thread(s); {args.questions} questions per setting and round, "
          f"{args.rounds} rounds; load average {before} -> {result['setting']['load_average_after']}")
    print(f"{'workload':<8} {'new tokens':>10} {'batch 1 q/s':>12} {f'batch {n} q/s':>13} {'speedup':>8} "
          f"{'whole prompts q/s':>18} {'speedup':>8} {'identical answers':>18}")
    for workload, r in results.items():
        same = r["identical_answers"]
        print(f"{workload:<8} {r['max_new_tokens']:>10} {r['questions_per_s_batch_1']:>12.2f} "
              f"{r[f'questions_per_s_batch_{n}']:>13.2f} {r['speedup_median']:>7.2f}x "
              f"{r[f'questions_per_s_batch_{n}_whole']:>18.2f} {r['speedup_whole_median']:>7.2f}x "
              f"{same[f'batch_{n}']:>6}/{args.questions} {same[f'batch_{n}_whole']:>4}/{args.questions}   "
              f"e.g. {r['example_answers'][:2]}")
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
