"""The LLaVA train-step bench compares like with like: the Trainer + PEFT runs and our loop read the same batches
from the same plan, adapt the same modules with the same number of trainable parameters, and start from the same
loss (no timing here)."""
import importlib.util
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_llava_train", ROOT / "bench" / "llava_train.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


class Engine:
    """What llava_loss needs of a DeepSpeed engine, for one process without DeepSpeed."""

    def __init__(self, module):
        self.module, self.device = module, torch.device("cpu")

    def __call__(self, **kwargs):
        return self.module(**kwargs)


def test_methods_see_the_same_batches_and_start_from_the_same_loss(llava_assets, tmp_path):
    from peft import get_peft_model, inject_adapter_in_model

    from data.llava import LlavaCollator, LlavaDataConfig, LlavaDataset
    from data.sampling import ShuffledBatches
    from recipes.llava import train as recipe
    from recipes.llava.model import LlavaModelConfig, build_llava
    from recipes.trainer import TrainConfig

    bench = load_bench()
    shape = dict(bench.SHAPES["tiny"], micro=2)
    config = bench.recipe_config(llava_assets["root"], shape, total_steps=3, out=tmp_path / "run")
    train_cfg = TrainConfig.from_dict(config["train"])

    def base():
        torch.manual_seed(0)
        model, tokenizer, processor = build_llava(LlavaModelConfig(**config["model"]))
        dataset = LlavaDataset(LlavaDataConfig(**config["data"]), tokenizer, processor, model.config.image_token_id,
                               model.config.image_seq_length)
        return model, tokenizer, dataset

    torch.manual_seed(0)
    ours, tokenizer, _, dataset, _ = recipe.build(config)
    collator = LlavaCollator(tokenizer.pad_token_id)
    peft_dora = get_peft_model(base()[0], bench.peft_config(shape["rank"], True))
    bench.train_projector(peft_dora)
    ours_peft = base()[0]
    inject_adapter_in_model(bench.peft_config(shape["rank"], True), ours_peft)
    bench.train_projector(ours_peft, only_adapters=True)

    # the same trainable parameters: every targeted Linear in both (A, B, magnitude) and the projector
    counts = [sum(p.numel() for p in m.parameters() if p.requires_grad) for m in (ours, peft_dora, ours_peft)]
    assert counts[0] == counts[1] == counts[2] > 0

    # the Trainer's loader yields what our loop reads, rank by rank: the plan of our trainer (same seed, grouping)
    for rank in range(2):
        plan = ShuffledBatches(dataset.modality_lengths, shape["micro"], 1, rank, 2, seed=train_cfg.seed,
                               group_by_modality=train_cfg.group_by_modality_length)
        loader = bench.planned_loader(dataset, collator, shape["micro"], rank, 2)
        for indices, hf in zip(plan.micro_batches(0)[:2], loader):
            mine = collator([dataset[i] for i in indices])
            assert set(hf) == {"input_ids", "attention_mask", "labels", "pixel_values"}
            for key in hf:
                assert torch.equal(hf[key], mine[key])

    # the same first loss: B = 0 in every adapter, so each is the base model's loss on the batch
    batch = collator([dataset[i] for i in ShuffledBatches(dataset.modality_lengths, shape["micro"], 1, 0, 2,
                                                          seed=0, group_by_modality=True).micro_batches(0)[0]])
    with torch.no_grad():
        losses = [recipe.llava_loss(Engine(ours.eval()), batch)[0],
                  peft_dora.eval()(**bench.hf_batch(batch)).loss,
                  recipe.llava_loss(Engine(ours_peft.eval()), batch)[0]]
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(losses[2], losses[0], rtol=1e-5, atol=1e-5)
