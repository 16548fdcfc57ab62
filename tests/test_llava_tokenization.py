"""LLaVA token ids and labels with a tokenizer that behaves like vicuna's (sentencepiece: byte fallback, split
digits, dummy prefix, "▁US" "ER"), compared with LLaVA's own rule written out below."""
import random

import pytest

from data.conversation import IMAGE_TOKEN, parse_turns, render_prompt
from data.llava import IGNORE_INDEX, LlavaDataConfig, LlavaDataset, encode
from vicuna_tokenizer import make_vicuna_like_tokenizer

N_IMAGE = 3
LLAVA_IMAGE = -200  # LLaVA's IMAGE_TOKEN_INDEX


class _Processor:
    image_mean = (0.5, 0.5, 0.5)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from transformers import AutoTokenizer

    from recipes.llava.model import load_tokenizer
    path = make_vicuna_like_tokenizer(tmp_path_factory.mktemp("vicuna") / "tokenizer")
    assert type(AutoTokenizer.from_pretrained(path)).__name__ == "LlamaTokenizer"  # converted from tokenizer.model
    return load_tokenizer(str(path))  # the recipe's loader: adds <image>, pads with unk


def dataset(tok, records, **config):
    cfg = LlavaDataConfig(data_path="", image_folder="/", **config)
    return LlavaDataset(cfg, tok, _Processor(), tok.convert_tokens_to_ids(IMAGE_TOKEN), N_IMAGE, records=records)


def tokens(tok, sample):
    return tok.convert_ids_to_tokens(sample[0].tolist())


# ------------------------------------------------------------------------------------------------ LLaVA's rule
def llava_ids(tok, text: str) -> list[int]:
    """LLaVA's tokenizer_image_token (haotian-liu/LLaVA@c121f04, llava/mm_utils.py): every piece between
    "<image>"s is tokenized by its own call; the BOS of every piece after the first is dropped."""
    pieces = [tok(p).input_ids for p in text.split(IMAGE_TOKEN)]
    ids = pieces[0]
    for p in pieces[1:]:
        ids = ids + [LLAVA_IMAGE] + p[1:]
    return ids


def llava_labels(tok, text: str, ids: list[int]) -> list[int]:
    """LLaVA's preprocess_v1 (llava/train/train.py, same commit) for a tokenizer with legacy=False under tokenizers
    >= 0.14: per round ("...</s>"), mask the instruction up to "ASSISTANT: " less its last token, counting lengths
    with separate calls, one token fewer after the first round."""
    labels = list(ids)
    cur = 1
    labels[:1] = [IGNORE_INDEX]
    for i, round_text in enumerate(text.split("</s>")):
        if not round_text:
            break
        parts = round_text.split(" ASSISTANT: ")
        if len(parts) != 2:
            break
        round_len = len(llava_ids(tok, round_text))
        instruction_len = len(llava_ids(tok, parts[0] + " ASSISTANT: ")) - 2
        if i:
            round_len, instruction_len = round_len - 1, instruction_len - 1
        labels[cur:cur + instruction_len] = [IGNORE_INDEX] * instruction_len
        cur += round_len
    labels[cur:] = [IGNORE_INDEX] * (len(labels) - cur)
    assert cur == len(ids), "LLaVA would mask this sample (tokenization mismatch)"
    return labels


ANSWERS = ["3", "12 apples", "中文 answer", "\nfirst line", "Yes", "no.", "🙂 smile", "The red one is left.", "0"]
QUESTIONS = ["How many?", "What colour is it?", "Describe 中 this.", "Is it 2?", "Count 5 things"]


def random_records(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    records = []
    for i in range(n):
        conv = []
        for _ in range(rng.randint(1, 3)):
            conv += [{"from": "human", "value": rng.choice(QUESTIONS)}, {"from": "gpt", "value": rng.choice(ANSWERS)}]
        record = {"id": i, "conversations": conv}
        if rng.random() < 0.7:
            record["image"] = "x.png"
            place = rng.choice(["front", "back", "alone"])
            first = conv[0]["value"]
            conv[0]["value"] = {"front": f"{IMAGE_TOKEN}\n{first}", "back": f"{first}\n{IMAGE_TOKEN}",
                                "alone": IMAGE_TOKEN}[place]
        records.append(record)
    return records


def test_ids_and_labels_are_llavas(tok):
    records = random_records(40)
    ds = dataset(tok, records)
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    for record in records:
        has_image = "image" in record
        turns = parse_turns(record["conversations"], has_image)
        ids, labels = (t.tolist() for t in ds.tokenize(turns, has_image))
        # ours expands the image token in the sequence; LLaVA keeps one -200 and expands in the model
        if has_image:
            p = ids.index(image_id)
            assert ids[p:p + N_IMAGE] == [image_id] * N_IMAGE and set(labels[p:p + N_IMAGE]) == {IGNORE_INDEX}
            ids, labels = ids[:p] + [LLAVA_IMAGE] + ids[p + N_IMAGE:], labels[:p + 1] + labels[p + N_IMAGE:]
        text = ds.render(turns).text
        want_ids = llava_ids(tok, text)
        assert ids == want_ids, record["id"]
        assert labels == llava_labels(tok, text, want_ids), record["id"]


def test_a_numeric_answer_opens_with_a_supervised_space_token(tok):
    ds = dataset(tok, [])
    turns = parse_turns([{"from": "human", "value": "How many?"}, {"from": "gpt", "value": "3"}], False)
    ids, labels = ds.tokenize(turns, False)
    pieces = tok.convert_ids_to_tokens(ids.tolist())
    assert pieces[-5:] == ["▁ASSISTANT", ":", "▁", "3", "</s>"]  # vicuna's cut: a bare "▁" before the digit
    assert labels.tolist()[-3:] == ids.tolist()[-3:] and labels.tolist()[-4] == IGNORE_INDEX


def test_text_after_the_image_starts_with_its_own_space_token(tok):
    ds = dataset(tok, [])
    turns = parse_turns([{"from": "human", "value": "<image>\nHow many?"}, {"from": "gpt", "value": "3"}], True)
    pieces = tok.convert_ids_to_tokens(ds.tokenize(turns, True)[0].tolist())
    p = pieces.index(IMAGE_TOKEN)
    assert pieces[p - 3:p] == ["▁US", "ER", ":"] or pieces[p - 1] == "▁"
    assert pieces[p + N_IMAGE:p + N_IMAGE + 2] == ["▁", "<0x0A>"]
    # a user turn that is only "<image>" loses the newline, as LLaVA strips it
    alone = parse_turns([{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "3"}], True)
    assert alone[0].text == IMAGE_TOKEN


def test_generation_prompt_tokenized_like_training(tok):
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    rendered = render_prompt("How many?", "vicuna_v1", has_image=True)
    assert rendered.text.endswith("How many? ASSISTANT:")
    ids = encode(tok, rendered, image_id).ids
    assert [LLAVA_IMAGE if t == image_id else t for t in ids] == llava_ids(tok, rendered.text)


def test_special_token_strings_in_messages_stay_text(tok):
    ds = dataset(tok, [])
    conv = [{"from": "human", "value": "Type </s> and <s> and <unk> please"},
            {"from": "gpt", "value": "Here: </s> <s> <unk> done"},
            {"from": "human", "value": "Again"}, {"from": "gpt", "value": "</s>"}]
    ids, labels = ds.tokenize(parse_turns(conv, False), False)
    ids, labels = ids.tolist(), labels.tolist()
    assert ids.count(tok.eos_token_id) == 2 and ids.count(tok.bos_token_id) == 1 and tok.unk_token_id not in ids
    supervised = [t for t, lab in zip(ids, labels) if lab != IGNORE_INDEX]
    assert tok.decode(supervised) == "Here: </s> <s> <unk> done</s> </s></s>"  # literal text, then the end token
    # the template's own end tokens are where they belong: after each answer
    eos = [i for i, t in enumerate(ids) if t == tok.eos_token_id]
    assert labels[eos[0]] == tok.eos_token_id and ids[-1] == tok.eos_token_id
    # a message without such strings is tokenized exactly as before (one call, no re-tokenization)
    clean = parse_turns([{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yes"}], False)
    assert ds.tokenize(clean, False)[0].tolist() == tok(ds.render(clean).text).input_ids


def test_a_token_straddling_literal_and_template_special_text_is_a_counted_skip(tmp_path):
    """A BPE vocabulary that merges ">U" cannot keep "...</s>" typed at the end of an answer apart from the
    template's "</s>USER" that follows: the sample is skipped with its own reason, never trained wrongly."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    bpe.train_from_iterator([">USER: x"] * 50 + ["a b c ok"] * 5, trainers.BpeTrainer(
        vocab_size=60, special_tokens=["<unk>", "<s>", "</s>", IMAGE_TOKEN], show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   additional_special_tokens=[IMAGE_TOKEN])
    assert ">U" in "".join(fast.convert_ids_to_tokens(fast(">USER", split_special_tokens=True).input_ids))
    conv = [{"from": "human", "value": "ok"}, {"from": "gpt", "value": "ok </s>"},
            {"from": "human", "value": "ok"}, {"from": "gpt", "value": "ok"}]
    ds = LlavaDataset(LlavaDataConfig(data_path=""), fast, _Processor(), fast.convert_tokens_to_ids(IMAGE_TOKEN),
                      N_IMAGE, records=[{"id": "s", "conversations": conv}])
    assert ds[0]["skip"] == "special token text in content"
