"""LLaVA-1.5 visual instruction tuning with DoRA (the paper's recipe), under DeepSpeed.

    deepspeed recipes/llava/train.py recipes/llava/configs/llava_v1_5_7b_dora.yaml [key=value ...]
    bash launch/llava_dora.sh [CONFIG] [key=value ...]

Reads the config top to bottom: build the model (model:), adapt it (dora:), read the data (data:), train
(train:), then write into train.output_dir: adapter/ (our format: A, B, magnitudes, projector), adapter_peft/
(PEFT's format), the tokenizer and image processor, config.yaml (resolved) and train_summary.json.
"""
from __future__ import annotations

import sys
from dataclasses import fields
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script by the deepspeed launcher
    sys.path.insert(0, str(ROOT))

from data.llava import DataFormatError, LlavaCollator, LlavaDataConfig, LlavaDataset  # noqa: E402
from dora import apply_dora  # noqa: E402
from recipes.config import ConfigError, load_config, save_config, section  # noqa: E402
from recipes.llava.model import LlavaModelConfig, build_llava  # noqa: E402
from recipes.preflight import check_data, check_file, check_folder, check_model, check_output  # noqa: E402
from recipes.quantization import check_zero_stage  # noqa: E402
from recipes.trainer import TooManySkipsError, TrainConfig, Trainer, write_summary  # noqa: E402


def llava_loss(engine, batch: dict):
    """Mean next-token loss of a micro-batch.

    Every rank must run the same modules in the same order, whatever its batch holds: ZeRO-3 gathers
    parameters module by module and ZeRO-2 reduces gradients in the order they become ready. So the embeddings,
    the vision tower and the projector always run, in that order, before the language model; a micro-batch
    without images (text-only, or all of its samples skipped) feeds the tower a blank image whose features enter
    with weight 0 (LLaVA's zero-image trick)."""
    model = engine.module
    device, dtype = engine.device, next(p for p in model.parameters() if p.is_floating_point()).dtype
    if batch.get("empty"):
        input_ids = torch.full((1, 1), model.config.text_config.bos_token_id or 0, device=device)
        attention_mask, labels, pixel_values = torch.ones_like(input_ids), None, None
    else:
        # counts are taken on the collator's CPU tensors: on a GPU, int() of a device tensor is a host sync that
        # stalls every micro-batch until the work queued before it is done
        image_tokens = int((batch["input_ids"] == model.config.image_token_id).sum())
        tokens = int(batch["attention_mask"].sum())
        input_ids = batch["input_ids"].to(device)
        attention_mask, labels = batch["attention_mask"].to(device), batch["labels"].to(device)
        pixel_values = batch["pixel_values"]
    embeds = model.get_input_embeddings()(input_ids)
    if pixel_values is None:
        size = model.config.vision_config.image_size
        blank = torch.zeros(1, 3, size, size, device=device, dtype=dtype)
        features = model.model.get_image_features(pixel_values=blank).pooler_output[0]
        embeds = embeds + 0.0 * features.sum()
    else:
        features = torch.cat(list(model.model.get_image_features(pixel_values=pixel_values.to(device, dtype))
                                  .pooler_output))
        if image_tokens != features.shape[0]:
            raise RuntimeError(f"{image_tokens} image tokens but {features.shape[0]} image features in a batch "
                               f"of {batch.get('ids')}")
        mask = (input_ids == model.config.image_token_id).unsqueeze(-1)
        embeds = embeds.masked_scatter(mask, features.to(embeds.dtype))
    out = engine(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels)
    if labels is None:
        return out.logits.sum() * 0.0, 0
    return out.loss, tokens


def build(config: dict):
    model_cfg = LlavaModelConfig(**section(config, "model", [f.name for f in fields(LlavaModelConfig)]))
    dora_cfg = section(config, "dora", ["rules", "train_fully"])
    data_cfg = LlavaDataConfig(**section(config, "data", [f.name for f in fields(LlavaDataConfig)]))
    for key in ("llava", "llm", "vision_tower"):  # everything the run reads, before any model is built
        check_model(f"model.{key}", getattr(model_cfg, key))
    check_file("model.projector", model_cfg.projector)
    check_data("data.data_path", data_cfg.data_path)
    check_folder("data.image_folder", data_cfg.image_folder)
    model, tokenizer, image_processor = build_llava(model_cfg)
    report = apply_dora(model, dora_cfg.get("rules", []), dora_cfg.get("train_fully", []), verbose=False)
    dataset = LlavaDataset(data_cfg, tokenizer, image_processor, model.config.image_token_id,
                           model.config.image_seq_length)
    return model, tokenizer, image_processor, dataset, report


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    argv = [a for a in argv if not a.startswith("--local_rank")]  # passed by the deepspeed launcher
    if not argv:
        print(__doc__)
        return 2
    config = load_config(argv[0], argv[1:], sections=("model", "dora", "data", "train"))
    train_cfg = TrainConfig.from_dict(section(config, "train", [f.name for f in fields(TrainConfig)]))
    check_output("train.output_dir", train_cfg.output_dir)
    check_zero_stage((config.get("model") or {}).get("quantization"), train_cfg.deepspeed)
    torch.manual_seed(train_cfg.seed)  # the adapter's initialisation (lora_A) is the same in every process and run
    model, tokenizer, image_processor, dataset, report = build(config)
    trainer = Trainer(train_cfg, model, dataset, LlavaCollator(tokenizer.pad_token_id), llava_loss,
                      lengths=dataset.modality_lengths, hidden_size=model.config.text_config.hidden_size)
    out = Path(train_cfg.output_dir)
    if trainer.is_main:
        print(report.table(), flush=True)
        print(f"{len(dataset)} samples, {trainer.plan()}", flush=True)
    result = trainer.run()
    if result.paused:
        return 0

    trainer.save_dora_adapter(out, {"recipe": "llava", "config": str(out / "config.yaml"), "steps": result.global_step})
    if trainer.is_main:
        tokenizer.save_pretrained(out / "tokenizer")
        image_processor.save_pretrained(out / "tokenizer")
        save_config(config, out / "config.yaml")
        write_summary(out, result, f"adapter in {out / 'adapter'}", trainable_parameters=report.trainable,
                      total_parameters=report.total)
    trainer.close()
    return 0


if __name__ == "__main__":
    from recipes.cli import exit_on_user_errors
    exit_on_user_errors(main, (ConfigError, DataFormatError, TooManySkipsError))
